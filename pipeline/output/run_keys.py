"""Each committed run's skip-set keys, kept beside the output, so that a nightly run reads its skip set instead of
hashing every row the table holds (1.3-1.6 s per million rows; minutes at 100M).

`_pipeline/keys/<run_id>-<rows>/` holds the sorted 16-byte version keys (`history.version_key`) of the run's rows
that count as done, in parts of at most `PART_KEYS`, and an `index.json` written last. They are written as the
commit reads the run's staged rows, before the format makes the run visible. A run's keys are used only while the
table holds exactly `<rows>` rows of that run, counted through the format's own reader: when another engine deleted
some of them, a kill left the keys unwritten, or the run predates them, its rows are read and hashed instead.
docs/design-notes.md ("What is done").
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.storage import Storage, join

logger = logging.getLogger(__name__)

KEYS_FOLDER = "_pipeline/keys"
PART_KEYS = 4_000_000  # 64 MB a part: what the driver holds of a big run's keys while it commits
_INDEX = re.compile(r"/(?P<run_id>[^/]+)-(?P<rows>\d+)/index\.json$")


def keys_folder(output_uri: str, run_id: str, rows: int) -> str:
    return join(output_uri, f"{KEYS_FOLDER}/{run_id}-{rows}")


@dataclass(frozen=True)
class StoredKeys:
    """One run's kept keys: where, and how many of each kind."""
    folder: str
    parts: tuple[str, ...]
    done: int  # keys of rows without error
    failed: int  # keys of rows with a lasting error (a transient one is never done)

    def count(self, with_errors: bool) -> int:
        return self.done + (self.failed if with_errors else 0)


class KeysRecorder:
    """Watches a run's rows as its commit reads them; once the last one has passed, and before the format commits,
    writes the run's keys (`fence` first: only the lease's holder writes). Each pass of the commit starts afresh."""

    def __init__(self, storage: Storage, output_uri: str, run_id: str, fence: Callable[[], None],
                 split: Callable[[pa.Table], tuple[np.ndarray, np.ndarray]]):
        self.storage = storage
        self.output_uri = output_uri
        self.run_id = run_id
        self.fence = fence
        self.split = split  # rows -> (keys of done rows, keys of failed rows)

    def watch(self, tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
        parts = _Parts()
        rows = 0
        for table in tables:
            done, failed = self.split(table)
            parts.add(done, failed)
            rows += table.num_rows
            yield table
        self.fence()
        try:
            parts.write(self.storage, keys_folder(self.output_uri, self.run_id, rows))
        except Exception as exc:  # only a cost: the next run hashes this run's rows instead
            logger.warning("run %s: its skip-set keys were not kept (%s: %s)", self.run_id, type(exc).__name__, exc)


class _Parts:
    """Keys gathered into sorted parts of at most PART_KEYS."""

    def __init__(self):
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.full: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, done: np.ndarray, failed: np.ndarray) -> None:
        self.pending.append((done, failed))
        if sum(len(d) + len(f) for d, f in self.pending) >= PART_KEYS:
            self._seal()

    def _seal(self) -> None:
        if self.pending:
            done, failed = (np.sort(np.concatenate(arrays)) for arrays in zip(*self.pending))
            self.full.append((done, failed))
            self.pending = []

    def write(self, storage: Storage, folder: str) -> None:
        self._seal()
        names = []
        for i, (done, failed) in enumerate(self.full):
            buffer = io.BytesIO()
            np.savez(buffer, done=done, failed=failed)
            names.append(f"part-{i:05d}.npz")
            storage.write_bytes(join(folder, names[-1]), buffer.getvalue())
        index = {"parts": names, "done": sum(len(d) for d, _ in self.full),
                 "failed": sum(len(f) for _, f in self.full)}
        storage.write_bytes(join(folder, "index.json"), json.dumps(index).encode())


def stored_keys(storage: Storage, output_uri: str) -> dict[tuple[str, int], StoredKeys]:
    """Every run's kept keys under the output, by (run_id, rows); an unreadable index counts as none."""
    folder = join(output_uri, KEYS_FOLDER)
    indexes: dict[tuple[str, int], str] = {}
    try:
        for page in storage.list_pages(folder, quote_paths=False):
            for info in page:
                if (match := _INDEX.search(info.uri)) is not None:
                    indexes[(match["run_id"], int(match["rows"]))] = info.uri
    except FileNotFoundError:
        return {}
    found: dict[tuple[str, int], StoredKeys] = {}
    uris = list(indexes.values())
    for key, uri, data in zip(indexes, uris, storage.read_many(uris)):
        try:
            index = json.loads(data)
            folder = uri.rsplit("/", 1)[0]
            found[key] = StoredKeys(folder, tuple(index["parts"]), int(index["done"]), int(index["failed"]))
        except Exception:  # a read that failed, a file cut short: hash that run's rows instead
            continue
    return found


def drop_all_but(storage: Storage, output_uri: str, run_id: str) -> None:
    """After an overwrite, the keys of the runs it replaced are of no use: deleted (a failure is only a cost)."""
    prefix = join(output_uri, KEYS_FOLDER) + "/"
    try:
        stale = [info.uri for page in storage.list_pages(prefix, quote_paths=False) for info in page
                 if not info.uri.removeprefix(prefix).startswith(f"{run_id}-")]
        storage.delete(stale)
    except FileNotFoundError:
        pass
    except Exception as exc:
        logger.warning("the keys of runs replaced by run %s were not deleted (%s)", run_id, type(exc).__name__)


def read_into(storage: Storage, stored: list[StoredKeys], with_errors: bool, keys: np.ndarray, at: int) -> int:
    """Copies the kept keys into `keys` from position `at`, a few parts at a time; returns the position after."""
    uris = [join(s.folder, name) for s in stored for name in s.parts]
    for start in range(0, len(uris), 4):
        for data in storage.read_many(uris[start:start + 4]):
            if isinstance(data, Exception):
                raise data
            with np.load(io.BytesIO(data)) as part:
                for kind in ("done", "failed") if with_errors else ("done",):
                    values = part[kind]
                    keys[at:at + len(values)] = values
                    at += len(values)
    return at


def rows_per_run(batches: Iterator[pa.RecordBatch]) -> dict[str, int] | None:
    """How many rows each run has, from batches of the run_id column; None when the rows have no run_id."""
    counts: dict[str, int] = {}
    for batch in batches:
        if "run_id" not in batch.schema.names:
            return None
        for entry in pc.value_counts(batch.column("run_id")).to_pylist():
            counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
    return counts
