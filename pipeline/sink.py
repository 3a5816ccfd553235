"""Sink: prediction rows -> Parquet files under the output folder, each file whole or invisible.

Rows are buffered and written as one file per `rows_per_file` rows or `flush_seconds`, whichever comes
first, with the explicit OUTPUT_SCHEMA and zstd. Files are named part-<run_id>-<seq>.parquet, so two runs
never collide, and each is made visible atomically (see Storage.write_atomic).
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.rows import OUTPUT_SCHEMA
from pipeline.storage import Storage, join


class ParquetSink:
    def __init__(self, storage: Storage, output_uri: str, run_id: str, provenance: dict[str, str],
                 rows_per_file: int, flush_seconds: float):
        self.storage = storage
        self.output_uri = output_uri
        self.run_id = run_id
        self.provenance = provenance  # constant columns: model, weights, run_id
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.files: list[dict] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_flush = time.monotonic()

    def add(self, batch: pa.Table) -> None:
        batch = to_output_table(batch, self.provenance)  # batches differ in inferred types; the output does not
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)
        if self._pending_rows and time.monotonic() - self._last_flush >= self.flush_seconds:
            self._flush(self._pending_rows)

    def close(self) -> list[dict]:
        if self._pending_rows:
            self._flush(self._pending_rows)
        return self.files

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        head, rest = table.slice(0, rows), table.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self._last_flush = time.monotonic()
        uri = join(self.output_uri, f"part-{self.run_id}-{len(self.files):05d}.parquet")
        self.storage.write_atomic(uri, lambda f: pq.write_table(head, f, compression="zstd"))
        self.files.append({"uri": uri, "rows": head.num_rows})


def to_output_table(batch: pa.Table, provenance: dict[str, str]) -> pa.Table:
    """Columns in schema order and type; provenance added; a failed row has no score."""
    n = batch.num_rows
    failed = pc.is_valid(batch["error"])
    columns = {}
    for field in OUTPUT_SCHEMA:
        if field.name in provenance:
            columns[field.name] = pa.array([provenance[field.name]] * n, field.type)
        elif field.name in batch.column_names:
            columns[field.name] = _cast(batch[field.name], field.type)
        else:
            columns[field.name] = pa.nulls(n, field.type)
    columns["score"] = pc.if_else(failed, pa.scalar(None, pa.float32()), columns["score"])
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def _cast(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """Numpy batches turn nulls into float NaN (a column of nothing but nulls, even a string one); undo that."""
    if pa.types.is_floating(column.type) and not pa.types.is_floating(target):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return column.cast(target)
