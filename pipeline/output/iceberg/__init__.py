"""output.format: iceberg: committed runs' rows as an Apache Iceberg table, written by pyiceberg through a catalog.
A run is ONE snapshot made by ONE catalog commit (a fast append, or one `overwrite` snapshot), its record in the
snapshot summary and, once committed, in a copy beside the table (`_pipeline/runs/<run_id>.json`), so that
snapshots can be expired with each commit as the table's `history.expire.*` properties say (`upkeep.py`); data
files are named per attempt and invisible until a snapshot names them. Why it writes its own files, catalogs,
metadata growth and what users schedule: docs/commit-protocol.md ("Delta and Iceberg, in detail", "Table
upkeep")."""

from __future__ import annotations

import pyarrow as pa

from pipeline.io.storage import Storage, absolute
from pipeline.output.formats import Commit, OutputFormat, Partitioning
from pipeline.output.iceberg.catalog import DEFAULT_NAMESPACE, FSSPEC_IO, RUN_DATE, TABLE_PROPERTIES, CatalogTable, iceberg_location
from pipeline.output.iceberg.checks import IcebergChecks, IcebergRecovery, schema_problem
from pipeline.output.iceberg.commit import IcebergCommitter
from pipeline.output.iceberg.rows import IcebergRows
from pipeline.output.iceberg.runs import RunCopies
from pipeline.output.iceberg.snapshots import IcebergSnapshots

__all__ = ["DEFAULT_NAMESPACE", "FSSPEC_IO", "RUN_DATE", "TABLE_PROPERTIES", "IcebergFormat", "schema_problem"]


class IcebergFormat(OutputFormat):
    """The Iceberg output: its parts (the catalog's table, its snapshots, the checks, recovery, the commit) share
    one CatalogTable."""
    name = "iceberg"

    def __init__(self, storage: Storage, uri: str, catalog: dict[str, str] | None, table: str,
                 schema: pa.Schema | None = None, partitioning: Partitioning | None = None):
        """`schema` (the job's rows) and `partitioning`, when given, let `check_existing` refuse a table that an
        append could not go into."""
        super().__init__(storage, iceberg_location(absolute(uri)))  # one spelling for the table and us
        self.uri = self.uri.rstrip("/")
        self.schema = schema
        self._catalog_config = dict(catalog) if catalog else None
        self._catalog_table = CatalogTable(storage, self.uri, catalog, table)
        self._copies = RunCopies(storage, self.uri)
        self._snapshots = IcebergSnapshots(self._catalog_table, self._copies)
        self._checks = IcebergChecks(self._catalog_table, schema, partitioning)
        self._recovery = IcebergRecovery(self._catalog_table, self._snapshots)
        self._committer = IcebergCommitter(self._catalog_table, self._copies)

    # --- catalog and table -----------------------------------------------------------------------------
    @property
    def namespace(self) -> str:
        return self._catalog_table.namespace

    @property
    def identifier(self) -> str:
        return self._catalog_table.identifier

    def catalog_properties(self) -> tuple[str, dict[str, str]]:
        """(catalog name, pyiceberg properties): the job's catalog, or the embedded SQLite of a local output."""
        return self._catalog_table.catalog_properties()

    @property
    def catalog(self):
        return self._catalog_table.catalog

    def load(self):
        """The table, refreshed from the catalog; None if it does not exist yet."""
        return self._catalog_table.load()

    @property
    def metadata_location(self) -> str | None:
        """The current metadata JSON (what DuckDB's iceberg_scan reads); None before the first commit."""
        table = self.load()
        return table.metadata_location if table is not None else None

    # --- what is committed -----------------------------------------------------------------------------
    def committed(self) -> list[dict]:
        return self._snapshots.committed()

    def data_files(self, run_ids: set[str] | None = None) -> list[str]:
        """Absolute URIs of the current snapshot's data files, all of them: a file compacted by another engine
        holds rows of several runs, so readers of the skip set filter rows by run_id instead."""
        return self._snapshots.data_files()

    def rows(self, run_ids: list[str] | None = None) -> IcebergRows:
        """The current snapshot's rows (of `run_ids`), read by pyiceberg's scan: its deletes applied."""
        return IcebergRows(self.uri, self.identifier, self._catalog_config,
                           None if run_ids is None else tuple(run_ids))

    def describe(self, record: dict) -> str:
        files = record.get("files")
        tail = f" ({len(files)} data file(s))" if files is not None else ""
        return (f"Iceberg snapshot {record.get('snapshot_id')} of {self.identifier} in catalog "
                f"'{self._catalog_table.name}'{tail}")

    # --- before and during a run -----------------------------------------------------------------------
    def check_existing(self, overwrite: bool) -> None:
        self._checks.check_existing(overwrite)

    def recover(self, staged_run_ids: set[str]) -> None:
        """Delete data files of staged runs that never committed (an attempt killed before its commit)."""
        self._recovery.recover(staged_run_ids)

    def commit(self, commit: Commit) -> dict:
        return self._committer.commit(commit)
