"""Before an Iceberg run: refuse a table this job must not write to, and delete what killed attempts left."""

from __future__ import annotations

import logging

import pyarrow as pa

from pipeline.io.storage import join
from pipeline.job.rows import ADDED_COLUMNS
from pipeline.output.formats import Commit, Partitioning
from pipeline.output.iceberg.catalog import RUN_DATE, CatalogTable
from pipeline.output.iceberg.snapshots import IcebergSnapshots
from pipeline.output.iceberg.write import FILE_RE
from pipeline.job.errors import UserError

logger = logging.getLogger(__name__)


class IcebergChecks:
    """Refuses, with a UserError naming the fix, an output whose table is missing from the catalog, lives
    elsewhere, or has a schema the job's rows (when given) cannot be written to."""

    def __init__(self, catalog_table: CatalogTable, schema: pa.Schema | None,
                 partitioning: Partitioning | None = None):
        self.catalog_table = catalog_table
        self.schema = schema
        self.partitioning = partitioning

    def check_existing(self, overwrite: bool) -> None:
        uri, identifier = self.catalog_table.uri, self.catalog_table.identifier
        table = self.catalog_table.load()
        if table is None:
            if self.catalog_table.storage.exists(join(uri, "metadata")):
                raise UserError(f"output.uri: {uri} already holds Iceberg metadata, but output.catalog has no "
                                f"table {identifier}; register it in the catalog (catalog.register_table) or "
                                "choose another output.uri")
            return
        location = table.location().rstrip("/").removeprefix("file://")
        if location != uri.removeprefix("file://"):
            raise UserError(f"output.table: {identifier} already exists at {location}, not at output.uri "
                            f"{uri}; set output.uri to its location or choose another output.table")
        if self.partitioning is not None:  # an overwrite too: its snapshot cannot change the table's spec
            check_partitioning(table, self.partitioning, identifier)
        if self.schema is not None:
            problem = schema_problem(table.schema(), self.schema)
            if problem:
                raise UserError(f"output.table: {identifier} has a schema this job cannot write ({problem}); "
                                "choose another output.table, or drop the table to start over")


class IcebergRecovery:
    """Deletes the data files of staged runs that never committed (an attempt killed before its commit)."""

    def __init__(self, catalog_table: CatalogTable, snapshots: IcebergSnapshots):
        self.catalog_table = catalog_table
        self.snapshots = snapshots

    def recover(self, staged_run_ids: set[str]) -> None:
        if not staged_run_ids:
            return
        table = self.catalog_table.load()
        done = {r["run_id"] for r in self.snapshots.committed()} if table is not None else set()
        pending = staged_run_ids - done
        if not pending:
            return
        live = set(self.snapshots.data_files())
        storage = self.catalog_table.storage
        stale = [obj.uri for page in storage.list_pages(join(self.catalog_table.uri, "data")) for obj in page
                 if (m := FILE_RE.search(obj.uri)) and m["run_id"] in pending and obj.uri not in live]
        if stale:
            logger.info("deleting %d data file(s) of uncommitted attempts", len(stale))
            storage.delete(stale)


def check_writable(table, commit: Commit, identifier: str) -> None:
    """Refuse to commit `commit` to `table` when it is partitioned otherwise or cannot take its rows."""
    check_partitioning(table, commit.partitioning, identifier)
    problem = schema_problem(table.schema(), commit.schema, extra=(RUN_DATE,))
    if problem:
        raise UserError(f"output.table: {identifier} has a schema this job cannot write ({problem}); "
                        "choose another output.table, or drop the table to start over")


def check_partitioning(table, layout: Partitioning, identifier: str) -> None:
    """Refuse a table partitioned otherwise than `layout`."""
    wanted = [RUN_DATE] if layout.run_date else [layout.column] if layout.column else []
    actual = [table.schema().find_column_name(f.source_id) for f in table.spec().fields]
    if actual != wanted:
        raise UserError(f"output.partitioning: table {identifier} is partitioned by "
                        f"{', '.join(actual) or 'nothing'}, the job asks for {', '.join(wanted) or 'none'}; "
                        "partition it the way it was created, or choose another output.table")


def schema_problem(table_schema, job_schema: pa.Schema, extra: tuple[str, ...] = ()) -> str | None:
    """Why rows of `job_schema` cannot be written to an Iceberg table of `table_schema` (None: they can). The
    ADDED_COLUMNS a table lacks are no reason: the commit adds them (`add_new_columns`)."""
    from pyiceberg.io.pyarrow import pyarrow_to_schema

    table_names = {f.name for f in table_schema.fields}
    job_schema = pa.schema([f for f in job_schema if f.name in table_names or f.name not in ADDED_COLUMNS])
    missing = [n for n in job_schema.names if n not in table_names]
    if missing:
        return f"it has no column {', '.join(missing[:5])}"
    try:
        job = pyarrow_to_schema(job_schema, name_mapping=table_schema.name_mapping)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    wrong = []
    for field in job.fields:
        existing = table_schema.find_field(field.name)
        if existing.field_type != field.field_type:
            wrong.append(f"{field.name} is {existing.field_type}, the job writes {field.field_type}")
        elif existing.required and not field.required:
            wrong.append(f"{field.name} is required, the job's may be null")
    unfilled = [f.name for f in table_schema.fields
                if f.required and f.name not in job_schema.names and f.name not in extra]
    if unfilled:
        wrong.append(f"required column(s) {', '.join(unfilled[:5])} are not in the job's rows")
    return "; ".join(wrong[:3]) or None


def add_new_columns(table, job_schema: pa.Schema):
    """`table` with the ADDED_COLUMNS it lacks, added as optional columns in a schema update of their own ahead of
    the run's snapshot (older data files read them as null); the table itself when it has them all."""
    from pyiceberg.types import LongType, StringType

    types = {pa.string(): StringType(), pa.int64(): LongType()}  # those of the ADDED_COLUMNS
    have = {f.name for f in table.schema().fields}
    new = [f for f in job_schema if f.name in ADDED_COLUMNS and f.name not in have]
    if not new:
        return table
    with table.update_schema() as update:
        for field in new:
            update.add_column(field.name, types[field.type])
    return table.refresh()
