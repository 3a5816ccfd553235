"""Source stage: what to process, as a stream of small blocks of `uri, size, etag, last_modified`.

Listing a prefix of 100M objects takes hours, so it must not happen before the first read (Ray issue
#40686). A single Ray read task walks the listing page by page (S3's paginator, a local folder walk, or a
manifest read in record batches) and yields a block per page; Ray's streaming executor hands the blocks on
(see runner.BLOCK_BYTES) while the listing goes on. A small actor keeps the running counts so
the driver can show progress and, once listing ends, what remains.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.output.history import History
from pipeline.progress import ListingCounts
from pipeline.manifest import is_manifest, read_manifest
from pipeline.rows import SOURCE_SCHEMA
from pipeline.storage import ObjectInfo, Storage, extension


ListingTally = ray.remote(num_cpus=0)(ListingCounts)  # on its own, for a dataset built without the runner


class InputListing(Datasource):
    """One read task that streams the job's inputs; see the module docstring."""

    def __init__(self, uri: str, storage: Storage, extensions: list[str] | None, tally=None,
                 history: History | None = None, exclude: str | None = None):
        super().__init__()
        self.uri = uri
        self.storage = storage
        self.extensions = set(extensions) if extensions is not None else None
        self.tally = tally
        self.history = history or History()
        # The job's own output, when it sits inside the input folder, is never an input.
        self.exclude = exclude.rstrip("/") + "/" if exclude else None

    def get_name(self) -> str:
        return "ListInputs"

    @property
    def supports_distributed_reads(self) -> bool:
        # False makes Ray run the listing task on the driver's node. On a worker node that died, Ray would
        # rerun it from the first page, and a long listing would stall the job meanwhile. (Passing a
        # scheduling_strategy to read_datasource is silently ignored in Ray 2.60.)
        return False

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(self._blocks, metadata, schema=SOURCE_SCHEMA, per_task_row_limit=per_task_row_limit)]

    def _blocks(self) -> Iterator[pa.Table]:
        done = self.history.load(self.storage)
        for page in self.pages():
            # The job's own output is not an input at all: neither listed nor counted as skipped.
            candidates = [o for o in page if not self._own_output(o)]
            wanted = [o for o in candidates if self._has_wanted_extension(o)]
            todo = done.todo(wanted)
            if self.tally is not None:
                self.tally.listing_add.remote(len(todo), len(candidates) - len(wanted), len(wanted) - len(todo))
            if todo:
                yield to_block(todo)
        if self.tally is not None:
            ray.get(self.tally.listing_finished.remote())

    def pages(self) -> Iterator[list[ObjectInfo]]:
        if is_manifest(self.uri):
            return read_manifest(self.uri, self.storage, quote=self.quotes_paths)
        return self.storage.list_pages(self.uri, quote_paths=self.quotes_paths)

    @property
    def quotes_paths(self) -> bool:
        """Whether a log line may quote an input's path: not when the job pseudonymises them."""
        return self.history.pseudonymizer is None

    def _own_output(self, info: ObjectInfo) -> bool:
        return self.exclude is not None and info.uri.startswith(self.exclude)

    def _has_wanted_extension(self, info: ObjectInfo) -> bool:
        return self.extensions is None or is_manifest(self.uri) or extension(info.uri) in self.extensions


def to_block(objects: list[ObjectInfo]) -> pa.Table:
    return pa.table({
        "uri": [o.uri for o in objects],
        "size": [o.size for o in objects],
        "etag": [o.etag for o in objects],
        "last_modified": [o.last_modified for o in objects],
    }, schema=SOURCE_SCHEMA)
