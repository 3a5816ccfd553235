"""Where copies of exact duplicates come from, on the output side: the content this model identity already predicted
(its committed runs' rows and this run's interrupted attempt's staged rows, those without error), as sorted 16-byte
hashes for the model processes (`known_content`), and those rows themselves, found by content hash for the driver
to copy from (`find`). Both read through the format's own reader (`TableRows`) and the staged Parquet chunks."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import chain
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.storage import Storage
from pipeline.output.history import KeySet
from pipeline.output.rows import TableRows

HASH_DTYPE = "S16"
MAX_KNOWN = 20_000_000  # 320 MB in each model process
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
log = logging.getLogger(__name__)
PLAIN_HASH = "^[0-9a-f]{32}$"  # decode/hashes.content_hash: BLAKE2b-128 in hex


@dataclass
class ReuseSources:
    """Earlier rows of the same model identity a duplicate may copy (built from `RunOutput.history`)."""
    committed: TableRows | None = None
    staged_files: list[str] = field(default_factory=list)

    def known_content(self, storage: Storage, limit: int = MAX_KNOWN) -> np.ndarray:
        """Sorted distinct 16-byte content hashes of the rows without error; none past `limit` rows (every model
        process holds the array: copies across runs give way to memory, copies within the run stay)."""
        parts, count = [], 0
        for rows in self._good_rows(storage, ["content_hash"]):
            parts.append(digests(rows["content_hash"]))
            count += len(parts[-1])
            if count > limit:
                log.warning("exact duplicates: over %d contents predicted before; copies from earlier runs are off "
                            "for this run (copies within it stay)", limit)
                return np.array([], dtype=HASH_DTYPE)
        return KeySet(np.concatenate(parts) if parts else np.array([], dtype=HASH_DTYPE)).keys

    def find(self, storage: Storage, hashes: set[str], columns: list[str]) -> pa.Table | None:
        """One row without error per content hash asked for (`uri`, `run_id`, `content_hash` and `columns`)."""
        wanted = pa.array(sorted(hashes), pa.string())
        found: list[pa.Table] = []
        seen: set[str] = set()
        for rows in self._good_rows(storage, ["uri", "run_id", "content_hash", *columns]):
            rows = rows.filter(pc.is_in(rows["content_hash"], wanted))
            if rows.num_rows:
                keep = [i for i, h in enumerate(rows["content_hash"].to_pylist()) if not (h in seen or seen.add(h))]
                found.append(rows.take(keep).select(["uri", "run_id", "content_hash", *columns]))
            if len(seen) == len(hashes):
                break
        return pa.concat_tables(found, promote_options="permissive") if found else None

    def _good_rows(self, storage: Storage, columns: list[str]) -> Iterator[pa.Table]:
        """The sources' rows without error and with a content hash (older rows have none), `columns` only."""
        wanted = list(dict.fromkeys([*columns, "error", "content_hash"]))
        committed = self.committed.batches(storage, wanted) if self.committed is not None else iter(())
        for rows in chain((pa.Table.from_batches([b]) for b in committed), self._staged(storage, wanted)):
            if "content_hash" not in rows.column_names or any(c not in rows.column_names for c in columns):
                continue
            # A pseudonymised job's hashes are tokens (privacy/pseudonyms.py): never a source of copies.
            plain = pc.match_substring_regex(rows["content_hash"], PLAIN_HASH)
            yield rows.filter(pc.and_(rows["error"].is_null(), pc.fill_null(plain, False)))

    def _staged(self, storage: Storage, columns: list[str]) -> Iterator[pa.Table]:
        for data in storage.read_many(self.staged_files):
            if isinstance(data, Exception):
                raise data
            table = pq.read_table(pa.BufferReader(data))
            yield table.select([c for c in columns if c in table.column_names])


def digests(hashes: pa.ChunkedArray) -> np.ndarray:
    """32-character hex hashes as 16-byte digests ("S16"), decoded without a Python object per row."""
    column = hashes.combine_chunks().cast(pa.string())  # delta-rs may hand large or view strings
    if not len(column):
        return np.array([], dtype=HASH_DTYPE)
    offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset:column.offset + len(column) + 1]
    data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(len(column), 32)
    nibbles = _HEX[data]
    return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).astype(np.uint8).copy().view(HASH_DTYPE).ravel()
