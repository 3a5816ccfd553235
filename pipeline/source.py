"""Source stage: what to process, as a stream of small blocks of `uri, size, etag, last_modified`.

Listing a prefix of 100M objects takes hours, so it must not happen before the first read (Ray issue
#40686). A single Ray read task walks the listing page by page (S3's paginator, a local folder walk, or a
manifest read in record batches) and yields a block per page; Ray's streaming executor hands the blocks on
(see runner.BLOCK_BYTES) while the listing goes on. A small actor keeps the running counts so
the driver can show progress and, once listing ends, what remains.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.history import History
from pipeline.rows import SOURCE_SCHEMA
from pipeline.storage import ObjectInfo, Storage, extension, is_s3

logger = logging.getLogger(__name__)

@ray.remote(num_cpus=0)
class ListingTally:
    """How many inputs the listing has produced, skipped and found already done, and whether it has finished."""

    def __init__(self):
        self.listed = 0
        self.skipped = 0
        self.already_done = 0
        self.done = False

    def add(self, listed: int, skipped: int, already_done: int = 0) -> None:
        self.listed += listed
        self.skipped += skipped
        self.already_done += already_done

    def finish(self) -> None:
        self.done = True

    def get(self) -> dict:
        return {"listed": self.listed, "skipped": self.skipped, "already_done": self.already_done,
                "done": self.done}


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
            wanted = [o for o in page if self._wanted(o)]
            todo = done.todo(wanted)
            if self.tally is not None:
                self.tally.add.remote(len(todo), len(page) - len(wanted), len(wanted) - len(todo))
            if todo:
                yield to_block(todo)
        if self.tally is not None:
            ray.get(self.tally.finish.remote())

    def pages(self) -> Iterator[list[ObjectInfo]]:
        if is_manifest(self.uri):
            return read_manifest(self.uri, self.storage, quote=self.quotes_paths)
        return self.storage.list_pages(self.uri, quote_paths=self.quotes_paths)

    @property
    def quotes_paths(self) -> bool:
        """Whether a log line may quote an input's path: not when the job pseudonymises them."""
        return self.history.pseudonymizer is None

    def _wanted(self, info: ObjectInfo) -> bool:
        if self.exclude and info.uri.startswith(self.exclude):
            return False
        return self.extensions is None or is_manifest(self.uri) or extension(info.uri) in self.extensions


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith((".parquet", ".csv"))


def to_block(objects: list[ObjectInfo]) -> pa.Table:
    return pa.table({
        "uri": [o.uri for o in objects],
        "size": [o.size for o in objects],
        "etag": [o.etag for o in objects],
        "last_modified": [o.last_modified for o in objects],
    }, schema=SOURCE_SCHEMA)


def read_manifest(uri: str, storage: Storage, quote: bool = True) -> Iterator[list[ObjectInfo]]:
    """Rows of a Parquet or CSV manifest, a record batch at a time.

    The `uri` column is required; optional `etag`, `size` and `last_modified` columns are carried into the
    output and let incremental runs notice changed objects. Relative entries are taken relative to the
    manifest's own folder.
    """
    fs, path = storage.fs(uri)
    base = posixpath.dirname(uri)
    with fs.open(path, "rb") as f:
        for batch in manifest_batches(f, uri, quote):
            columns = {name: batch.column(name).to_pylist() if name in batch.schema.names else [None] * batch.num_rows
                       for name in SOURCE_SCHEMA.names}
            yield [ObjectInfo(uri=_resolve(str(u).strip(), base), size=size, etag=etag, last_modified=mtime)
                   for u, size, etag, mtime in zip(*(columns[n] for n in ("uri", "size", "etag", "last_modified")))
                   if u is not None and str(u).strip()]


def manifest_batches(f, uri: str, quote: bool = True) -> Iterator[pa.RecordBatch]:
    if uri.lower().endswith(".parquet"):
        parquet = pq.ParquetFile(f)
        columns = [name for name in SOURCE_SCHEMA.names if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=1000, columns=columns):
            yield pa.RecordBatch.from_arrays(
                [batch.column(n).cast(SOURCE_SCHEMA.field(n).type) for n in columns], names=columns)
    else:
        convert = pacsv.ConvertOptions(include_columns=SOURCE_SCHEMA.names, include_missing_columns=True,
                                       column_types={f.name: f.type for f in SOURCE_SCHEMA})
        # A row with the wrong number of fields is skipped, not fatal; its line is logged.
        parse = pacsv.ParseOptions(invalid_row_handler=_skip_bad_row if quote else _skip_bad_row_unquoted)
        yield from pacsv.open_csv(f, convert_options=convert, parse_options=parse)


def _skip_bad_row(row) -> str:
    logger.warning("manifest line %s skipped: %s (quote values that contain commas)", row.number, row.text)
    return "skip"


def _skip_bad_row_unquoted(row) -> str:
    logger.warning("manifest line %s skipped (quote values that contain commas)", row.number)
    return "skip"


def manifest_columns(uri: str, storage: Storage) -> list[str]:
    """Column names of a manifest, read from its header only (for up-front validation)."""
    fs, path = storage.fs(uri)
    with fs.open(path, "rb") as f:
        if uri.lower().endswith(".parquet"):
            return pq.ParquetFile(f).schema_arrow.names
        return pacsv.open_csv(f).schema.names


def _resolve(entry: str, base: str) -> str:
    if is_s3(entry) or entry.startswith("/"):
        return entry
    if entry.startswith("file://"):
        return entry.removeprefix("file://")
    if is_s3(base):
        return f"{base}/{posixpath.normpath(entry)}"
    return posixpath.normpath(posixpath.join(base, entry))
