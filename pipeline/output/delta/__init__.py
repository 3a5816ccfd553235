"""output.format: delta: committed runs' rows as a Delta Lake table at output.uri, written by delta-rs (no JVM,
no service). A run is ONE Delta commit (append, or for output.overwrite one atomic replace of rows and schema)
whose commitInfo holds the run's record and whose app transaction `pipeline-run-<run_id>` makes a retry find it.
Why it is safe on S3, what delta-rs does by itself and what users schedule: docs/commit-protocol.md ("Delta and
Iceberg, in detail", "Table upkeep")."""

from __future__ import annotations

import pyarrow as pa

from pipeline.io.storage import Storage, absolute, is_remote
from pipeline.output.delta.checks import DeltaChecks
from pipeline.output.delta.commit import DeltaCommitter
from pipeline.output.delta.log import DeltaFiles, DeltaHistory
from pipeline.output.delta.rows import DeltaRows
from pipeline.output.delta.table import APP_ID_PREFIX, RUN_DATE, DeltaLocation, app_id, delta_schema, storage_options
from pipeline.output.formats import Commit, OutputFormat, Partitioning

__all__ = ["APP_ID_PREFIX", "RUN_DATE", "DeltaFormat", "app_id", "delta_schema", "storage_options"]


class DeltaFormat(OutputFormat):
    """The Delta output: its parts (the log's records and files, the checks, the commit) share one location."""
    name = "delta"

    def __init__(self, storage: Storage, uri: str, schema: pa.Schema | None = None,
                 partitioning: Partitioning | None = None):
        """`schema` (the job's rows) and `partitioning`, when given, let `check_existing` refuse a table that an
        append could not go into."""
        super().__init__(storage, uri.rstrip("/") if is_remote(uri) else absolute(uri))
        self.schema = schema
        self.partitioning = partitioning
        self._location = DeltaLocation(storage, self.uri)
        self._files = DeltaFiles(self._location)
        self._history = DeltaHistory(self._location, self._files)
        self._checks = DeltaChecks(self._location, schema, partitioning)
        self._committer = DeltaCommitter(self._location, self._history)

    @property
    def options(self) -> dict[str, str] | None:
        return self._location.options

    def table(self, version: int | None = None):
        """The DeltaTable at `uri` (its latest version, or `version`), or None when there is none yet."""
        return self._location.table(version)

    def committed(self) -> list[dict]:
        return self._history.committed()

    def live(self) -> list[dict]:
        """Runs since the last overwrite, ours or another tool's (a foreign overwrite leaves no run live)."""
        return self._history.live()

    def data_files(self, run_ids: set[str] | None = None) -> list[str]:
        """Absolute URIs of the current version's data files; with `run_ids`, those that may hold those runs'
        rows (by the log's run_id statistics: a compacted file that spans several runs is kept)."""
        return self._files.current(run_ids)

    def rows(self, run_ids: list[str] | None = None) -> DeltaRows:
        """The current version's rows (of `run_ids`), read by delta-rs: partition values, deletion vectors."""
        return DeltaRows(self.uri, None if run_ids is None else tuple(run_ids))

    def describe(self, record: dict) -> str:
        files = record.get("files") or []
        return f"Delta table version {record.get('version')}" + (f" ({len(files)} file(s))" if files else "")

    def check_existing(self, overwrite: bool) -> None:
        self._checks.check_existing(overwrite)

    def commit(self, commit: Commit) -> dict:
        return self._committer.commit(commit)
