"""What to process: the job's inputs as a stream of small Arrow blocks of `uri, size, etag, last_modified`.

Listing a prefix of 100M objects takes hours, so it must not happen before the first read (Ray issue #40686).
`InputListing.blocks` walks the listing page by page (S3's paginator, a local folder walk, or a manifest or an S3
Inventory read in record batches) and yields a block per page, the inputs earlier runs finished left out; the Ray
adapter (`pipeline.ray.datasource`) runs it as one read task and keeps its running counts. A listing that fails
once the run is under way (an inventory's data file gone, refused or not matching its manifest) raises
`ListingFailed`, one line: the run ends, its staged rows kept for the next run to resume after.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import pyarrow as pa

from pipeline.io.inventory import InventoryError, find_manifest, is_inventory
from pipeline.io.manifest import is_manifest, read_manifest
from pipeline.io.storage import ObjectInfo, Storage, extension
from pipeline.job.errors import JobFailed
from pipeline.job.rows import SOURCE_SCHEMA
from pipeline.job.stage import PageCounts, Resources, Source


class EarlierRuns(Protocol):
    """What earlier runs did (`pipeline.output.history.History`): loaded, the filter that leaves their inputs out."""
    pseudonymizer: object | None  # set: the inputs' paths are personal data, never quoted in a log line

    def load(self, storage: Storage) -> "SkipFilter": ...


class SkipFilter(Protocol):
    """The inputs of a page still to do (`pipeline.output.history.DoneFilter`)."""

    def todo(self, objects: list[ObjectInfo]) -> list[ObjectInfo]: ...


class ListingFailed(JobFailed):
    """The input's listing failed mid-run; the message is one line naming what and the fix."""


RESUMES = "rows so far stay staged and rerunning the job resumes after them"


class InputListing(Source):
    """The job's inputs, a page at a time; see the module docstring. One process lists, waiting on storage."""
    name = "ListInputs"
    resources = Resources(cpus=0, concurrency=1)

    def __init__(self, uri: str, storage: Storage, extensions: list[str] | None,
                 history: EarlierRuns | None = None, exclude: str | None = None, prefix: str | None = None):
        self.uri = uri
        self.prefix = prefix  # an inventory's: only keys that start with it
        self.storage = storage
        self.extensions = set(extensions) if extensions is not None else None
        self.history = history  # None: nothing is done yet
        # A manifest's entries are the inputs as named; an inventory lists a bucket, filtered as a folder is.
        self.takes_all = is_manifest(uri) and not is_inventory(uri)
        # The job's own output, when it sits inside the input folder, is never an input.
        self.exclude = exclude.rstrip("/") + "/" if exclude else None

    def blocks(self, counted: PageCounts | None = None) -> Iterator[pa.Table]:
        done = self.history.load(self.storage) if self.history is not None else None
        try:
            for page in self.pages():
                candidates, wanted = self.select(page)
                todo = done.todo(wanted) if done is not None else wanted
                if counted is not None:
                    counted(len(todo), len(candidates) - len(wanted), len(wanted) - len(todo), self._repeats)
                self._repeats = 0
                if todo:
                    yield to_block(todo)
        except InventoryError as exc:
            raise ListingFailed(f"input.uri: {exc}; {RESUMES}") from None
        except OSError as exc:
            why = f": {(str(exc).splitlines() or [''])[0][:200]}" if self.quotes_paths else ""
            raise ListingFailed(f"input.uri: listing the input failed ({type(exc).__name__}{why}); check the input "
                                f"and the credentials; {RESUMES}") from None

    def select(self, page: list[ObjectInfo]) -> tuple[list[ObjectInfo], list[ObjectInfo]]:
        """(the page's candidates, those of them wanted): the job's own output is not an input at all (neither
        listed nor counted as skipped); a candidate of another extension is skipped."""
        candidates = [o for o in page if not self._own_output(o)]
        return candidates, [o for o in candidates if self._has_wanted_extension(o)]

    def pages(self) -> Iterator[list[ObjectInfo]]:
        self._repeats = 0  # a manifest's entries dropped since the last page as repeats of an earlier one
        # A folder may be an inventory's config or delivery folder: its manifest.json is read, not the folder.
        manifest = self.uri if is_manifest(self.uri) else find_manifest(self.uri, self.storage)
        if manifest is not None:
            return read_manifest(manifest, self.storage, quote=self.quotes_paths, duplicates=self._count_repeats,
                                 prefix=self.prefix)
        return self.storage.list_pages(self.uri, quote_paths=self.quotes_paths)

    def _count_repeats(self, n: int) -> None:
        self._repeats += n

    @property
    def quotes_paths(self) -> bool:
        """Whether a log line may quote an input's path: not when the job pseudonymises them."""
        return self.history is None or self.history.pseudonymizer is None

    def _own_output(self, info: ObjectInfo) -> bool:
        return self.exclude is not None and info.uri.startswith(self.exclude)

    def _has_wanted_extension(self, info: ObjectInfo) -> bool:
        return self.extensions is None or self.takes_all or extension(info.uri) in self.extensions


def to_block(objects: list[ObjectInfo]) -> pa.Table:
    return pa.table({
        "uri": [o.uri for o in objects],
        "size": [o.size for o in objects],
        "etag": [o.etag for o in objects],
        "last_modified": [o.last_modified for o in objects],
    }, schema=SOURCE_SCHEMA)
