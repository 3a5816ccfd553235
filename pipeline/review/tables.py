"""Sibling tables: `<output>_dedup` and `<output>_truth`, kept beside an output in the output's own format (a
Parquet folder, a Delta table at that URI, or an Iceberg table `<output.table>_<kind>` in the output's catalog,
located at that URI). Each `overwrite` replaces the whole table in one commit; each `append` adds rows in one.

The Parquet folder cannot swap a set of objects at once, so it keeps its own strict list, `_table.json`, changed
only by compare-and-swap: an overwrite writes its rows as ONE new part (whole or absent, as every object is), then
points the list at it, then deletes the parts it replaced. A `*.parquet` glob may briefly see the old parts beside
the new one, never half of either; `read()` (and any reader of `_table.json`) sees exactly one version."""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.storage import Storage, is_remote, join, read_versioned
from pipeline.job.errors import JobFailed, UserError
from pipeline.output.formats import OutputFormat
from pipeline.output.publish import CAS_ATTEMPTS, parquet_bytes
from pipeline.output.rows import plain
from pipeline.report.outputs import open_output_for_reading

KINDS = ("dedup", "truth")
TABLE_LIST = "_table.json"


def sibling_uri(output_uri: str, kind: str) -> str:
    """`<output uri without trailing slash>_<kind>`."""
    if kind not in KINDS:
        raise ValueError(f"sibling table kind {kind!r}: one of {', '.join(KINDS)}")
    return output_uri.rstrip("/") + "_" + kind


class SiblingTable(ABC):
    """A table beside an output, in its format: `overwrite`, `append`, `read`."""
    format: str

    def __init__(self, storage: Storage, uri: str):
        self.storage = storage
        self.uri = uri

    @staticmethod
    def for_output(storage: Storage, output_uri: str, kind: str, catalog: dict[str, str] | None = None,
                   table: str | None = None) -> "SiblingTable":
        """The `kind` table ('dedup' or 'truth') of the output at `output_uri` (its format told by what is there;
        an Iceberg output's `catalog` and `table` as `pipeline report` takes them)."""
        output = open_output_for_reading(storage, output_uri, catalog, table or "default.predictions")
        return sibling_of(output, kind)

    @abstractmethod
    def overwrite(self, rows: pa.Table) -> None:
        """Replace the whole table by `rows`, in one commit."""

    @abstractmethod
    def append(self, rows: pa.Table) -> None:
        """Add `rows` in one commit; creates the table if there is none."""

    @abstractmethod
    def read(self) -> pa.Table:
        """Every row of the current version; a table with no columns when nothing was written yet."""

    def describe(self) -> str:
        return self.uri


def sibling_of(output: OutputFormat, kind: str) -> SiblingTable:
    """The `kind` table beside an opened output."""
    uri = sibling_uri(output.uri, kind)
    if output.name == "delta":
        return DeltaSibling(output.storage, uri)
    if output.name == "iceberg":
        return IcebergSibling(output.storage, uri, output.catalog, f"{output.identifier}_{kind}")
    return ParquetSibling(output.storage, uri)


class ParquetSibling(SiblingTable):
    """A folder of parts and `_table.json`, the strict list of the current version's parts."""
    format = "parquet"

    def overwrite(self, rows: pa.Table) -> None:
        part = self._put_part(rows)
        replaced = self._swap(lambda files: [part])
        self.storage.delete([join(self.uri, name) for name in replaced if name != part])

    def append(self, rows: pa.Table) -> None:
        part = self._put_part(rows)
        self._swap(lambda files: files + [part])

    def read(self) -> pa.Table:
        current = read_versioned(self.storage, join(self.uri, TABLE_LIST))
        files = json.loads(current[0])["files"] if current else []
        tables = [pq.read_table(pa.BufferReader(self.storage.read_bytes(join(self.uri, name)))) for name in files]
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

    def _put_part(self, rows: pa.Table) -> str:
        name = f"part-{uuid.uuid4().hex}.parquet"
        data = parquet_bytes(rows)
        self.storage.write_atomic(join(self.uri, name), lambda f: f.write(data), if_absent=True)
        return name

    def _swap(self, change) -> list[str]:
        """Point `_table.json` at `change(current files)` by compare-and-swap; returns the files it listed before."""
        uri = join(self.uri, TABLE_LIST)
        for _ in range(CAS_ATTEMPTS):
            current = read_versioned(self.storage, uri)
            files = json.loads(current[0])["files"] if current else []
            data = json.dumps({"files": change(files)}, indent=1).encode()
            try:
                self.storage.write_atomic(uri, lambda f: f.write(data), if_absent=current is None,
                                          if_match=current[1] if current else None)
                return files
            except FileExistsError:
                continue  # another writer changed the list between our read and our write: read it again
        raise JobFailed(f"{uri} kept changing while this command wrote it; another command writes the same table: "
                        "try again when it is done")


class DeltaSibling(SiblingTable):
    """A Delta table written by delta-rs: each call one table version."""
    format = "delta"

    def overwrite(self, rows: pa.Table) -> None:
        self._write(rows, "overwrite")

    def append(self, rows: pa.Table) -> None:
        self._write(rows, "append")

    def _write(self, rows: pa.Table, mode: str) -> None:
        from deltalake import write_deltalake

        from pipeline.output.delta import delta_schema, storage_options

        write_deltalake(self.uri, rows.cast(delta_schema(rows.schema)), mode=mode,
                        schema_mode="overwrite" if mode == "overwrite" else None,
                        storage_options=storage_options(self.storage, self.uri))

    def read(self) -> pa.Table:
        from pipeline.output.delta.table import DeltaLocation

        table = DeltaLocation(self.storage, self.uri).table()
        if table is None:
            return pa.table({})
        return plain_table(pa.RecordBatchReader.from_stream(table.scan()))


def plain_table(reader: pa.RecordBatchReader) -> pa.Table:
    """What a table format's reader streams, in the plain Arrow types the pipeline writes (no views, no large)."""
    batches = [plain(batch) for batch in reader]
    if batches:
        return pa.Table.from_batches(batches)
    return plain(pa.RecordBatch.from_pylist([], reader.schema)).schema.empty_table()


class IcebergSibling(SiblingTable):
    """An Iceberg table in the output's catalog, located at `uri`: each call one snapshot."""
    format = "iceberg"

    def __init__(self, storage: Storage, uri: str, catalog, identifier: str):
        super().__init__(storage, uri)
        self.catalog = catalog
        self.identifier = identifier

    def overwrite(self, rows: pa.Table) -> None:
        table = self._table(rows.schema)
        if table.current_snapshot() is None:  # nothing to replace (pyiceberg would warn of a delete matching nothing)
            table.append(rows)
        else:
            table.overwrite(rows)

    def append(self, rows: pa.Table) -> None:
        self._table(rows.schema).append(rows)

    def read(self) -> pa.Table:
        table = self._load()
        if table is None:
            return pa.table({})
        return plain_table(table.scan().to_arrow_batch_reader())

    def describe(self) -> str:
        return f"{self.identifier} at {self.uri}"

    def _load(self):
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        try:
            return self.catalog.load_table(self.identifier)
        except (NoSuchTableError, NoSuchNamespaceError):
            return None

    def _table(self, schema: pa.Schema):
        from pyiceberg.exceptions import TableAlreadyExistsError

        table = self._load()
        if table is not None:
            return table
        self.catalog.create_namespace_if_not_exists(self.identifier.rpartition(".")[0])
        try:
            return self.catalog.create_table(self.identifier, schema=schema, location=self.uri)
        except TableAlreadyExistsError:
            return self.catalog.load_table(self.identifier)
