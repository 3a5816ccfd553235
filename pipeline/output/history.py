"""What earlier runs already did, as compact sets of input keys the listing filters against: 16-byte digests
in sorted numpy arrays. A *version* key (uri + ETag + last-modified + size) skips unchanged inputs of earlier
committed runs of the same model; a *uri* key skips what an interrupted attempt of this run already staged.
Each committed run's keys are read from what its commit kept (`output/run_keys.py`) while the table holds exactly
that run's rows; otherwise its rows are read through the output's format (`OutputFormat.rows`) and hashed.
docs/commit-protocol.md (step 5) and docs/design-notes.md ("What is done") say more."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.storage import ObjectInfo, Storage
from pipeline.privacy.pseudonyms import Pseudonymizer
from pipeline.output.rows import TableRows
from pipeline.output.run_keys import read_into, rows_per_run, stored_keys

KEY_DTYPE = "S16"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _fields_digest(*parts: object) -> bytes:
    """16 bytes for an object's fields (None as empty), the form the output's done-sets keep."""
    return hashlib.blake2b("\0".join("" if p is None else str(p) for p in parts).encode(), digest_size=16).digest()


def uri_key(uri: str) -> bytes:
    return _fields_digest(uri)


def version_key(uri: str, etag: str | None, last_modified_us: int | None, size: int | None) -> bytes:
    if etag is None and last_modified_us is None:
        return _fields_digest(uri)
    return _fields_digest(uri, etag, last_modified_us, size)


def micros(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return (value - _EPOCH) // _MICROSECOND


_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc) - _EPOCH


def object_keys(info: ObjectInfo, written_uri: str | None = None) -> tuple[bytes, bytes]:
    """(uri key, version key) of a listed input; `written_uri`: what its row holds instead, if not the uri."""
    uri = written_uri or info.uri
    return uri_key(uri), version_key(uri, info.etag, micros(info.last_modified), info.size)


def table_keys(table: pa.Table, kind: str) -> np.ndarray:
    """Keys of output rows (uri, etag, last_modified, size columns)."""
    uris = table["uri"].to_pylist()
    if kind == "uri":
        return np.array([uri_key(u) for u in uris], dtype=KEY_DTYPE)
    etags = table["etag"].to_pylist()
    mtimes = table["last_modified"].cast(pa.int64()).to_pylist()
    sizes = table["size"].to_pylist()
    return np.array([version_key(*row) for row in zip(uris, etags, mtimes, sizes)], dtype=KEY_DTYPE)


class KeySet:
    """Sorted distinct keys. Sorts the array it is given in place and keeps it (callers hand over a fresh
    concatenation): 16 bytes a key held and ~32 at the peak with the caller's parts, where `np.unique` took ~120
    and ten times as long (docs/performance.md, "Growth to 100M inputs")."""

    def __init__(self, keys: np.ndarray):
        keys = keys.astype(KEY_DTYPE, copy=False)
        keys.sort()
        if len(keys) > 1:
            repeats = np.flatnonzero(keys[1:] == keys[:-1])
            if len(repeats):
                keys = np.delete(keys, repeats + 1)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.keys) or not len(keys):
            return np.zeros(len(keys), dtype=bool)
        at = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return self.keys[at] == keys


@dataclass
class History:
    """What to learn from; picklable, built into KeySets where the listing runs."""
    committed: TableRows | None = None  # earlier runs' rows, same model and weights (`OutputFormat.rows`)
    committed_runs: list[str] = field(default_factory=list)  # those runs
    staged_files: list[str] = field(default_factory=list)  # the interrupted attempt being resumed
    reprocess_errors: bool = False
    pseudonymizer: Pseudonymizer | None = None  # the rows' uri is the listed uri's token
    keys_at: str | None = None  # the output, where committed runs' keys are kept (None: always hash the rows)

    def load(self, storage: Storage) -> "DoneFilter":
        versions = committed_keys(storage, self.committed, self.keys_at, with_errors=not self.reprocess_errors)
        uris = [table_keys(t, "uri") for t in _read_chunks(storage, self.staged_files)]
        return DoneFilter(KeySet(versions), KeySet(_concat(uris)), self.pseudonymizer)


def committed_keys(storage: Storage, committed: TableRows | None, keys_at: str | None,
                   with_errors: bool) -> np.ndarray:
    """Version keys of the committed rows that count as done: each run's kept keys where the table holds exactly
    the rows they were kept for (counted through the format), the other runs' rows hashed."""
    if committed is None:
        return _concat([])
    counts = rows_per_run(committed.batches(storage, ["run_id"])) if keys_at is not None else None
    if counts is None:
        return _concat([table_keys(rows, "version") for rows in done_rows(storage, committed, with_errors)])
    kept = stored_keys(storage, keys_at)
    stored = {run: kept[(run, rows)] for run, rows in counts.items() if (run, rows) in kept}
    rest = set(counts) - set(stored)
    keys = np.empty(sum(s.count(with_errors) for s in stored.values()) + sum(counts[r] for r in rest), KEY_DTYPE)
    at = read_into(storage, list(stored.values()), with_errors, keys, 0)
    if rest:
        for rows in done_rows(storage, committed, with_errors, runs=rest):
            hashed = table_keys(rows, "version")
            keys[at:at + len(hashed)] = hashed
            at += len(hashed)
    return keys[:at]


def split_done(rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Version keys of a run's rows that count as done: (those without error, those with a lasting error)."""
    failed = rows["error"].is_valid()
    lasting = pc.and_(failed, pc.invert(pc.is_in(rows["error_type"], pa.array(TRANSIENT_ERRORS))))
    return table_keys(rows.filter(pc.invert(failed)), "version"), table_keys(rows.filter(lasting), "version")


KEY_COLUMNS = ["uri", "etag", "last_modified", "size", "error", "error_type"]
# Failures that say nothing about the input itself: the next run tries such inputs again by default.
# A copy of a duplicate whose source failed, or was gone when it was looked up (run/reuse.py), is one too.
TRANSIENT_ERRORS = ["read.io_error", "model.duplicate_failed", "model.reuse_source_missing"]


def done_rows(storage: Storage, committed: TableRows | None, with_errors: bool,
              runs: set[str] | None = None) -> Iterator[pa.Table]:
    """The key columns of earlier runs' rows (of `runs` only) that count as done, a batch at a time: error rows too
    when `with_errors`, but never a transient failure."""
    if committed is None:
        return
    for batch in committed.batches(storage, KEY_COLUMNS + (["run_id"] if runs is not None else [])):
        rows = pa.Table.from_batches([batch])
        if runs is not None:
            rows = rows.filter(pc.is_in(rows["run_id"], pa.array(sorted(runs), pa.string())))
        if not with_errors:
            yield rows.filter(rows["error"].is_null())
        else:
            yield rows.filter(pc.invert(pc.is_in(rows["error_type"], pa.array(TRANSIENT_ERRORS))))


def _read_chunks(storage: Storage, uris: list[str], fetch: int = 32) -> Iterator[pa.Table]:
    """Staged chunks are small and many: fetch them `fetch` at a time concurrently."""
    for start in range(0, len(uris), fetch):
        for data in storage.read_many(uris[start:start + fetch]):
            if isinstance(data, Exception):
                raise data
            yield pq.read_table(pa.BufferReader(data), columns=KEY_COLUMNS)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.array([], dtype=KEY_DTYPE)


class DoneFilter:
    def __init__(self, done_versions: KeySet, done_uris: KeySet, pseudonymizer: Pseudonymizer | None = None):
        self.done_versions = done_versions
        self.done_uris = done_uris
        self.pseudonymizer = pseudonymizer

    def __len__(self) -> int:
        return len(self.done_versions) + len(self.done_uris)

    def todo(self, objects: list[ObjectInfo]) -> list[ObjectInfo]:
        """The objects neither set holds. Each key is hashed only when its set has keys: a nightly run has no
        interrupted attempt, so its listing hashes each object once, not twice."""
        if not len(self) or not objects:
            return objects
        uris = [(self.pseudonymizer.token(o.uri) if self.pseudonymizer else None) or o.uri for o in objects]
        done = np.zeros(len(objects), dtype=bool)
        if len(self.done_versions):
            done |= self.done_versions.contains(np.array(
                [version_key(u, o.etag, micros(o.last_modified), o.size) for u, o in zip(uris, objects)], KEY_DTYPE))
        if len(self.done_uris):
            done |= self.done_uris.contains(np.array([uri_key(u) for u in uris], dtype=KEY_DTYPE))
        return [o for o, d in zip(objects, done) if not d]
