"""A Delta output's live rows, read by delta-rs as every Delta reader reads them (see `pipeline/output/rows.py`).

`DeltaTable.scan` (delta-rs's DataFusion engine, deltalake >= 1.2) streams record batches of the asked columns,
with partition values from the log and deletion vectors applied; `to_pyarrow_dataset` would refuse a table with
deletion vectors, and the data files alone hold neither. A `DELETE` by delta-rs (1.6) rewrites files instead;
both read the same here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from pipeline.io.storage import Storage
from pipeline.output.delta.table import DeltaLocation
from pipeline.output.rows import TableRows, plain


@dataclass(frozen=True)
class DeltaRows(TableRows):
    uri: str  # the table's location, as DeltaFormat holds it
    run_ids: tuple[str, ...] | None = None  # None: every live row

    def batches(self, storage: Storage, columns: list[str]) -> Iterator[pa.RecordBatch]:
        table = DeltaLocation(storage, self.uri).table()
        if table is None:
            return
        names = {field.name for field in table.schema().fields}
        wanted = [c for c in dict.fromkeys(columns) if c in names]
        reader = pa.RecordBatchReader.from_stream(table.scan(columns=wanted, predicate=self._predicate(names)))
        for batch in reader:
            if batch.num_rows:
                yield plain(batch)

    def _predicate(self, names: set[str]) -> str | None:
        """The runs' rows only (a file compacted by another engine holds several runs'): DataFusion SQL."""
        if self.run_ids is None or "run_id" not in names:
            return None
        if not self.run_ids:
            return "FALSE"
        return f"run_id IN ({', '.join(_sql_string(r) for r in self.run_ids)})"


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
