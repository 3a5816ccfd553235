"""Read stage: fetch each row's bytes from storage, 64 at a time, concurrently within the batch."""

from __future__ import annotations

from functools import partial

import numpy as np

from pipeline.io.storage import BODY_READ_ATTEMPTS, Storage, is_transient
from pipeline.job.rows import StageFailure, error_columns, fail
from pipeline.job.stage import Batch, Resources, Stage
from pipeline.privacy.safe_errors import exception_text


# A read task fetches its batch's objects concurrently; the memory it reserves is roughly what it holds in flight.
READ_BATCH = 64
READ_MEMORY = 256 * 2**20


class Reader(Stage):
    """Adds `bytes`, `error`, `error_type` to rows of `uri` (and listed `size`).
    `safe_errors` (privacy.pseudonymize): messages built from known-safe parts only (privacy/safe_errors.py).
    Reading waits on storage, so it holds no logical CPU: `processes` bounds it instead."""
    name = "read"

    def __init__(self, storage: Storage, max_file_bytes: int, safe_errors: bool = False, processes: int = 2):
        self.storage = storage
        self.max_file_bytes = max_file_bytes
        self.describe = partial(describe_read_error, safe=safe_errors)
        self.resources = Resources(cpus=0, memory=READ_MEMORY, batch_size=READ_BATCH, concurrency=processes)

    def process(self, batch: Batch) -> Batch:
        n = len(batch["uri"])
        errors, error_types = error_columns(batch)  # a row that failed upstream is passed on, not read
        data = np.full(n, b"", dtype=object)
        # Listed sizes; unknown (NaN or None) for manifest entries until the bytes are read.
        sizes = np.array([None if _missing(s) else int(s) for s in batch["size"]], dtype=object)
        versioned = [not (_missing(e) and _missing(m)) for e, m in zip(batch["etag"], batch["last_modified"])]
        wanted = []
        for i in range(n):
            if errors[i] is not None:
                continue
            if sizes[i] is not None and sizes[i] > self.max_file_bytes:
                errors[i], error_types[i] = fail("read", self._too_large(sizes[i]), self.describe)
            else:
                wanted.append(i)
        fetched = self.storage.read_many([str(batch["uri"][i]) for i in wanted]) if wanted else []
        for i, result in zip(wanted, fetched):
            if isinstance(result, Exception):
                errors[i], error_types[i] = fail("read", result, self.describe)
            elif len(result) > self.max_file_bytes:
                errors[i], error_types[i] = fail("read", self._too_large(len(result)), self.describe)
            else:
                data[i] = result
                # An entry listed with an ETag or mtime keeps its listed size, even none: the incremental
                # version key (history.version_key) of its output row must equal the listing's.
                if sizes[i] is None and not versioned[i]:
                    sizes[i] = len(result)
        batch.update(bytes=data, size=sizes, error=errors, error_type=error_types)
        return batch

    def _too_large(self, size: int) -> StageFailure:
        return StageFailure("too_large", f"object is {size:,} bytes, over input.max_file_bytes={self.max_file_bytes:,}")


def _missing(value) -> bool:
    """None, or what a null becomes in a numpy batch: NaN or NaT, the values unequal to themselves."""
    return value is None or bool(value != value)


def describe_read_error(exc: Exception, safe: bool = False) -> tuple[str, str]:
    """(kind, message); `safe`: no library text, which may quote the object's key (botocore's endpoint URL)."""
    if isinstance(exc, FileNotFoundError):
        return "not_found", "object not found"
    if isinstance(exc, PermissionError):
        return "access_denied", "access denied"
    if isinstance(exc, IsADirectoryError):
        return "not_a_file", "is a folder, not a file"
    # Storage.read_many tries a read that may yet succeed until its last attempt: one still failing had them all.
    tries = (f"tried {BODY_READ_ATTEMPTS} times",) if is_transient(exc) else ()
    return "io_error", exception_text(exc, safe, tries)
