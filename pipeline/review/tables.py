"""STAND-IN until helper "dedup"'s `pipeline/review/tables.py` lands in main (then this file is replaced by it).

A sibling table lives beside an output in the output's own format: `<output uri>_<kind>` (a Parquet folder, a Delta
table at that URI, or an Iceberg table `<output.table>_<kind>` in the output's catalog, located at that URI)."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.storage import Storage, join
from pipeline.report.outputs import open_output_for_reading


class SiblingTable:
    """A small table beside an output: appended to, overwritten, read whole."""

    def __init__(self, storage: Storage, uri: str, fmt, identifier: str | None = None):
        self.storage, self.uri, self.format, self.identifier = storage, uri, fmt, identifier

    @classmethod
    def for_output(cls, storage: Storage, output_uri: str, kind: str, catalog: dict | None = None,
                   table: str | None = None) -> "SiblingTable":
        output = open_output_for_reading(storage, output_uri, catalog, table or "default.predictions")
        uri = output.uri.rstrip("/") + f"_{kind}"
        return cls(storage, uri, output, f"{output.identifier}_{kind}" if output.name == "iceberg" else None)

    def append(self, rows: pa.Table) -> None:
        self._write(rows, "append")

    def overwrite(self, rows: pa.Table) -> None:
        self._write(rows, "overwrite")

    def read(self) -> pa.Table | None:
        """Every row, or None when nothing was written yet."""
        if self.format.name == "delta":
            from pipeline.output.delta.rows import DeltaRows
            from pipeline.output.delta.table import DeltaLocation

            found = DeltaLocation(self.storage, self.uri).table()
            if found is None:
                return None
            names = [f.name for f in found.schema().fields]
            return pa.Table.from_batches(list(DeltaRows(self.uri).batches(self.storage, names)))
        if self.format.name == "iceberg":
            found = self._iceberg().load()
            return found.scan().to_arrow() if found is not None else None
        files = [o.uri for page in self.storage.list_pages(self.uri) for o in page if o.uri.endswith(".parquet")]
        if not files:
            return None
        return pa.concat_tables([pq.read_table(pa.BufferReader(self.storage.read_bytes(f))) for f in sorted(files)])

    def _write(self, rows: pa.Table, mode: str) -> None:
        if self.format.name == "delta":
            from deltalake import write_deltalake
            from pipeline.output.delta.table import storage_options

            write_deltalake(self.uri, rows, mode=mode, storage_options=storage_options(self.storage, self.uri))
        elif self.format.name == "iceberg":
            from pipeline.output.formats import Partitioning

            catalog = self._iceberg()
            found = catalog.load() or catalog.create(rows.schema, Partitioning())
            found.append(rows) if mode == "append" else found.overwrite(rows)
        else:
            if mode == "overwrite":
                self.storage.delete([o.uri for page in self.storage.list_pages(self.uri) for o in page])
            sink = pa.BufferOutputStream()
            pq.write_table(rows, sink)
            self.storage.write_bytes(join(self.uri, f"part-{uuid.uuid4().hex}.parquet"), sink.getvalue().to_pybytes())

    def _iceberg(self):
        from pipeline.output.iceberg.catalog import CatalogTable

        name, props = self.format.catalog_properties()
        return CatalogTable(self.storage, self.uri, {"name": name, **props}, self.identifier)
