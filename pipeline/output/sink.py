"""Sink: prediction rows -> staged chunks of the run, each durable as a whole (the resume checkpoint).

The driver adds every batch it drains; a chunk is written every `checkpoint_rows` rows or
`checkpoint_seconds`, whichever comes first, with the job's explicit schema (rows.output_schema). Chunks
become visible only when the run commits (output/__init__.py).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import pipeline.output.failpoints as failpoints
from pipeline.output.staging import RunStats, Staging
from pipeline.job.errors import JobFailed
from pipeline.job.rows import OUTPUT_SCHEMA


class StagingSink:
    def __init__(self, staging: Staging, run_id: str, provenance: dict[str, str], first_chunk: int,
                 checkpoint_rows: int, checkpoint_seconds: float, schema: pa.Schema = OUTPUT_SCHEMA,
                 before_chunk: Callable[[int], None] | None = None, stats: RunStats | None = None):
        self.staging = staging
        self.stats = stats or RunStats()  # of every row staged for the run, an interrupted attempt's included
        self.run_id = run_id
        self.provenance = provenance  # constant columns: model, weights, run_id
        self.schema = schema
        self.next_chunk = first_chunk
        self.checkpoint_rows = checkpoint_rows
        self.checkpoint_seconds = checkpoint_seconds
        self.before_chunk = before_chunk  # called with a chunk's number before it is written (pseudonym map)
        self.written: list[str] = []  # chunk URIs, in order
        self.rows_written = 0
        self._pending: list[pa.Table] = []
        self._partial: dict[str, list[pa.Table]] = {}  # rows of multi-frame inputs still arriving, by uri
        self._pending_rows = 0
        self._last_flush = time.monotonic()

    def add(self, batch: pa.Table) -> pa.Table:
        """Stages the batch's rows; returns those of inputs whose every row has arrived (what is now counted).

        A multi-frame DICOM file makes a row per frame (`rows_of_input` says how many), and Ray may hand them
        over in two batches: they wait here until all have come, so a chunk, the unit of resume, never holds
        part of a file."""
        batch = self._complete_inputs(batch)
        released = batch
        batch = to_output_table(batch, self.provenance, self.schema)  # batches differ in inferred types; the output does not
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        failpoints.hit("batch_drained")
        if self._pending_rows >= self.checkpoint_rows or time.monotonic() - self._last_flush >= self.checkpoint_seconds:
            self.flush()
        return released

    def _complete_inputs(self, batch: pa.Table) -> pa.Table:
        if "rows_of_input" not in batch.column_names:
            return batch
        counts = pc.fill_null(batch["rows_of_input"], 1).to_numpy()
        if (counts <= 1).all() and not self._partial:
            return batch
        complete = [batch.filter(pa.array(counts <= 1))]
        multi = batch.filter(pa.array(counts > 1))
        uris, expected = multi["uri"].to_pylist(), multi["rows_of_input"].to_pylist()
        for uri in dict.fromkeys(uris):
            rows = multi.filter(pc.equal(multi["uri"], uri))
            held = self._partial.pop(uri, []) + [rows]
            if sum(t.num_rows for t in held) >= expected[uris.index(uri)]:
                complete.extend(held)
            else:
                self._partial[uri] = held
        return pa.concat_tables(complete, promote_options="permissive")

    def staged(self) -> list[str]:
        """The chunks of every row added so far (what is pending flushed first)."""
        self.flush()
        return list(self.written)

    def release_partial(self) -> pa.Table | None:
        """At the end of the stream: rows of inputs still incomplete (none, unless a frame was lost)."""
        held = [t for tables in self._partial.values() for t in tables]
        self._partial = {}
        if not held:
            return None
        table = pa.concat_tables(held, promote_options="permissive")
        self._pending.append(to_output_table(table, self.provenance, self.schema))
        self._pending_rows += table.num_rows
        return table

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending)
        if self.before_chunk is not None:
            self.before_chunk(self.next_chunk)
        try:
            uri = self.staging.write_chunk(self.run_id, self.next_chunk, table)
        except FileExistsError:
            raise JobFailed(f"run {self.run_id}: chunk {self.next_chunk} was staged by another driver running this "
                            "same run; this one stops without committing (check that one run at a time runs the "
                            "job)") from None
        self.stats.add(table)
        self._pending, self._pending_rows = [], 0
        self.next_chunk += 1
        self.written.append(uri)
        self.rows_written += table.num_rows
        failpoints.hit("chunk_written")


def to_output_table(batch: pa.Table, provenance: dict[str, str], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """Columns in schema order and type; provenance added; a failed row has no score or embedding."""
    n = batch.num_rows
    failed = pc.is_valid(batch["error"])
    columns = {}
    for field in schema:
        if field.name in provenance:
            columns[field.name] = pa.array([provenance[field.name]] * n, field.type)
        elif field.name in batch.column_names:
            columns[field.name] = _cast(batch[field.name], field.type)
        else:
            columns[field.name] = pa.nulls(n, field.type)
    for name in ("score", "embedding"):
        if name in columns:
            columns[name] = pc.if_else(failed, pa.scalar(None, schema.field(name).type), columns[name])
    return pa.table(columns, schema=schema)


def _cast(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """Numpy batches turn nulls into float NaN (a column of nothing but nulls, even a string one); undo that."""
    if pa.types.is_fixed_size_list(target) and isinstance(column.type, pa.ExtensionType):
        return _vectors(column, target)  # Ray's tensor column: an (N, D) array
    if pa.types.is_floating(column.type) and not pa.types.is_floating(target):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return column.cast(target)


def _vectors(column: pa.ChunkedArray, target: pa.FixedSizeListType) -> pa.Array:
    values = np.concatenate([chunk.to_numpy() for chunk in column.chunks]).astype(np.float32, copy=False)
    values = values.reshape(len(values), target.list_size)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.float32()), target.list_size)
