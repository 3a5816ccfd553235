"""The driver's half of exact-duplicate reuse (the model process's half: models/reuse.py). A row the model process
left for it (`reused_from` = COMMITTED: content this model identity predicted in a committed run or this run's
interrupted attempt) is held back, at most HOLD_ROWS of them, then filled in one pass over those sources: the
earlier row's predictions, `reused_from` its uri, `reused_run` its run. A source gone since (another engine
deleted it) makes an error row the next run retries. It also counts what reuse saved (`ReuseCounts`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.storage import Storage
from pipeline.models.reuse import COMMITTED, MODEL_SECONDS
from pipeline.output.reuse import ReuseSources

HOLD_ROWS = 65_536  # rows waiting for a source (~300 bytes each), filled together in one pass over the sources
SOURCE_MISSING = "model.reuse_source_missing"


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
    """Turns the model's batches into rows to stage: copies filled, the model's timing column counted and dropped."""

    def __init__(self, sources: ReuseSources | None, storage: Storage, run_id: str, columns: list[str]):
        self.sources = sources
        self.storage = storage
        self.run_id = run_id
        self.columns = columns  # the prediction columns of this job's rows
        self.counts = ReuseCounts()
        self._held: list[pa.Table] = []

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
        return ready + self.release() if sum(t.num_rows for t in self._held) >= HOLD_ROWS else ready

    def release(self) -> list[pa.Table]:
        """The held rows, filled from their sources."""
        if not self._held:
            return []
        held = pa.concat_tables(self._held, promote_options="permissive")
        self._held = []
        found = self.sources.find(self.storage, set(held["content_hash"].to_pylist()), self.columns)
        index = {h: i for i, h in enumerate(found["content_hash"].to_pylist())} if found is not None else {}
        at = pa.array([index.get(h) for h in held["content_hash"].to_pylist()], pa.int64())
        if found is not None:
            sources = found.take(at)
            for name in [*self.columns, "reused_from", "reused_run"]:
                column = sources["uri" if name == "reused_from" else "run_id" if name == "reused_run" else name]
                held = _set(held, name, column)
        missing = at.is_null()
        held = _set(held, "error", pc.if_else(missing, pa.scalar("model: the earlier row with the same content was "
                                                              "gone when its prediction was copied; the next run "
                                                              "predicts this input"), held["error"].cast(pa.string())))
        held = _set(held, "error_type", pc.if_else(missing, pa.scalar(SOURCE_MISSING),
                                                   held["error_type"].cast(pa.string())))
        return [self._counted(held, own_run=False)]

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
