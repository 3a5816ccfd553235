"""An Iceberg output's live rows, read by pyiceberg's scan as every Iceberg reader reads them (see
`pipeline/output/rows.py`): the current snapshot's data files with their position and equality deletes applied,
and only the columns asked for.

pyiceberg's own `to_arrow_batch_reader` reads every planned file at once in its thread pool and holds each
file's batches until they are taken, i.e. the whole projection in memory; here its reader (`ArrowScan`) gets a
few files at a time, so at most those files' projected rows are held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa

from pipeline.io.storage import Storage
from pipeline.output.iceberg.catalog import CatalogTable
from pipeline.output.rows import TableRows, plain

FILES_AT_ONCE = 4


@dataclass(frozen=True)
class IcebergRows(TableRows):
    uri: str  # the table's location, as IcebergFormat holds it
    table: str  # namespace.name
    catalog: dict[str, str] | None = field(default=None, hash=False)  # output.catalog; None: the embedded one
    run_ids: tuple[str, ...] | None = None  # None: every live row

    def batches(self, storage: Storage, columns: list[str]) -> Iterator[pa.RecordBatch]:
        from pyiceberg.expressions import AlwaysFalse, AlwaysTrue, In
        from pyiceberg.io.pyarrow import ArrowScan

        table = CatalogTable(storage, self.uri, self.catalog, self.table).load()
        if table is None or table.current_snapshot() is None:
            return
        names = table.schema().column_names
        wanted = tuple(c for c in dict.fromkeys(columns) if c in names)
        row_filter = AlwaysTrue()
        if self.run_ids is not None and "run_id" in names:
            row_filter = In("run_id", set(self.run_ids)) if self.run_ids else AlwaysFalse()
        scan = table.scan(row_filter=row_filter, selected_fields=wanted)
        tasks = list(scan.plan_files())
        for start in range(0, len(tasks), FILES_AT_ONCE):
            reader = ArrowScan(scan.table_metadata, scan.io, scan.projection(), scan.row_filter, scan.case_sensitive)
            for batch in reader.to_record_batches(tasks[start:start + FILES_AT_ONCE]):
                if batch.num_rows:
                    yield plain(batch)
