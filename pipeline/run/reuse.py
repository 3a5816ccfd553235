"""The driver's half of exact-duplicate reuse (the model process's half: models/reuse.py). A row the model process
left for it (`reused_from` = COMMITTED: content this model identity predicted in a committed run or this run's
interrupted attempt, or claimed first by another model process of this run) is held back, at most HOLD_ROWS of them,
then filled in one pass over those sources and this run's staged rows: the earlier row's predictions, `reused_from`
its uri, `reused_run` its run. A source that failed, or is gone since (another engine deleted it), makes an error
row the next run retries. It also counts what reuse saved (`ReuseCounts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.storage import Storage
from pipeline.models.reuse import COMMITTED, MODEL_SECONDS
from pipeline.output.reuse import ReuseSources

HOLD_ROWS = 65_536  # rows waiting for a source (~300 bytes each), filled together in one pass over the sources
SOURCE_MISSING = "model.reuse_source_missing"
NO_SOURCE = ("model: no row of this model with the same content could be copied (it failed, or is gone); the next "
             "run predicts this input")


@dataclass
class ReuseCounts:
    """Rows copied from an earlier row, and the model's own time per predicted row (from its batches)."""
    reused: int = 0
    predicted: int = 0
    model_seconds: float = 0.0

    @property
    def seconds_saved(self) -> float:
        """The model time the copies did not take: mean model seconds per predicted input x copies."""
        return self.model_seconds / self.predicted * self.reused if self.predicted else 0.0


class ReuseFiller:
    """Turns the model's batches into rows to stage: copies filled, the model's timing column counted and dropped.
    `own_chunks`: this run's rows staged so far (the sink flushed first), where a content another model process
    claimed was predicted."""

    def __init__(self, sources: ReuseSources | None, storage: Storage, run_id: str, columns: list[str],
                 own_chunks: Callable[[], list[str]] = list):
        self.sources = sources
        self.storage = storage
        self.run_id = run_id
        self.columns = columns  # the prediction columns of this job's rows
        self.own_chunks = own_chunks
        self.counts = ReuseCounts()
        self._held: list[pa.Table] = []
        self._limit = HOLD_ROWS

    def __call__(self, batch: pa.Table) -> list[pa.Table]:
        batch = self._timed(batch)
        if "reused_from" not in batch.column_names or pa.types.is_null(batch["reused_from"].type):
            return [self._counted(batch)]
        waiting = pc.fill_null(pc.equal(batch["reused_from"], COMMITTED), False)
        if not pc.any(waiting).as_py():
            return [self._counted(batch)]
        self._held.append(batch.filter(waiting))
        rest = batch.filter(pc.invert(waiting))
        ready = [self._counted(rest)] if rest.num_rows else []
        return ready + self.release(final=False) if sum(t.num_rows for t in self._held) >= self._limit else ready

    def release(self, final: bool = True) -> list[pa.Table]:
        """The held rows filled from their sources; before the end, those whose source has not come yet (another
        process's row of this run) stay held. At the end, a row without a source is an error row."""
        if not self._held:
            return []
        held = pa.concat_tables(self._held, promote_options="permissive")
        committed, staged = (self.sources.committed, self.sources.staged_files) if self.sources else (None, [])
        found = ReuseSources(committed, staged + self.own_chunks()).find(
            self.storage, set(held["content_hash"].to_pylist()), self.columns)
        index = {h: i for i, h in enumerate(found["content_hash"].to_pylist())} if found is not None else {}
        at = pa.array([index.get(h) for h in held["content_hash"].to_pylist()], pa.int64())
        self._held, self._limit = [], HOLD_ROWS
        if not final:  # a source of this run may still come
            self._held = [held.filter(at.is_null())]
            self._limit += self._held[0].num_rows
            held, at = held.filter(at.is_valid()), at.drop_null()
        return [self._counted(self._filled(held, found, at), own_run=False)] if held.num_rows else []

    def _filled(self, held: pa.Table, found: pa.Table | None, at: pa.Array) -> pa.Table:
        """`held` with each row's source's predictions (`at`: its row in `found`); a row without one: an error."""
        copied = found.take(at) if found is not None else None
        for name, source in [*((c, c) for c in self.columns), ("reused_from", "uri"), ("reused_run", "run_id")]:
            held = _set(held, name, copied[source] if copied is not None else pa.nulls(held.num_rows))
        missing = at.is_null()
        error = pc.if_else(missing, pa.scalar(NO_SOURCE), held["error"].cast(pa.string()))
        kind = pc.if_else(missing, pa.scalar(SOURCE_MISSING), held["error_type"].cast(pa.string()))
        return _set(_set(held, "error", error), "error_type", kind)

    def _timed(self, batch: pa.Table) -> pa.Table:
        if MODEL_SECONDS not in batch.column_names:
            return batch
        seconds = batch[MODEL_SECONDS].to_numpy(zero_copy_only=False).astype(float)
        timed = seconds[~np.isnan(seconds)]
        self.counts.predicted += len(timed)
        self.counts.model_seconds += float(timed.sum())
        return batch.drop_columns([MODEL_SECONDS])

    def _counted(self, batch: pa.Table, own_run: bool = True) -> pa.Table:
        """Counts the copies; a copy made in the model process is of this run's row."""
        if "reused_from" not in batch.column_names:
            return batch
        copies = batch["reused_from"].is_valid()
        self.counts.reused += int(pc.sum(pc.and_(copies, batch["error"].is_null())).as_py() or 0)
        if own_run:
            run = pa.array([self.run_id] * batch.num_rows, pa.string())
            batch = _set(batch, "reused_run", pc.if_else(copies, run, pa.scalar(None, pa.string())))
        return batch


def _set(table: pa.Table, name: str, column) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)
