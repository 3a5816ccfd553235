"""output.format: delta — committed runs' rows as a Delta Lake table at output.uri, written by delta-rs (no JVM,
no service).

    <output.uri>/
      _delta_log/<version>.json                 one Delta commit per run: its add (and, for an overwrite, remove)
                                                actions, and a commitInfo holding the run's record
      _delta_log/<version>.checkpoint.parquet   every 100 versions, written by delta-rs itself (see below)
      [run_date=YYYY-MM-DD/ or <column>=<value>/]part-*.parquet   data files; only those the log names are live

A run commits as ONE Delta commit (`write_deltalake`, appending or, for output.overwrite, replacing every
row and the schema in one atomic commit). The staged rows stream into it (a RecordBatchReader): nothing is
materialised. The commit carries
  - commitInfo custom metadata `pipeline.record` (the run's record as JSON) and `pipeline.run_id`: `committed()`
    reads them back from the table's history, so the log is the one source of truth for what is done;
  - an app transaction `pipeline-run-<run_id>` (version 1): it is how a retried commit finds that its run is
    already in the table (`DeltaTable.transaction_version`). delta-rs's conflict checker does NOT refuse a
    second commit carrying it (seen with 1.6.6: a retried append landed at the next version, the run twice).
    App transactions survive overwrites and checkpoints.
Data files written before a commit that then fails (a crash, rows that raise midway, a lost lease) are never
named by the log, so readers never see them; `vacuum` deletes them.

Commit safety on S3, as found with deltalake 1.6.6 (delta-rs) against moto:
  - Without a locking provider or `copy_if_not_exists`, delta-rs 1.x uses its default log store, which writes
    `_delta_log/<version>.json` with ONE conditional PUT, `If-None-Match: *` (object_store's conditional put,
    S3ConditionalPut::ETagMatch, its default since AWS S3 supports it, Aug 2024). There is no temporary file and
    no rename. The S3 server refuses the PUT with 412 when that version exists. delta-rs would then retry at the
    next version by itself, without our lease check, so that a driver frozen inside `write_deltalake` past its
    lease would, thawed, commit its run a second time (tests/test_late_write.py); we set `max_commit_retries=0`
    and retry in commit.py, checking the lease and the run's app transaction first (two appends of different
    runs both land, at different versions).
  - We set `conditional_put: etag` explicitly anyway, so a change of library default cannot silently drop it.
  - `AWS_S3_ALLOW_UNSAFE_RENAME` is NOT needed and we never set it: in 1.6 it no longer changes the commit path
    (the same conditional PUT is sent with or without it). DynamoDB (`AWS_S3_LOCKING_PROVIDER=dynamodb`) is only
    for S3-compatible stores without conditional writes. Such a store ignoring If-None-Match would make two
    racing commits of one version overwrite each other: use a store that enforces it (AWS S3, MinIO, R2, moto
    do). tests/test_format_delta.py races two commits for one version through a proxy to moto and checks that
    both runs survive at different versions.
  - The lease (`Commit.fence`) still keeps two drivers from committing to one output at once; conditional
    puts make the log safe even when a lease is lost.

Checkpoints and maintenance:
  - delta-rs writes a checkpoint by itself after every `delta.checkpointInterval` (default 100) commits, in the
    post-commit hook of `write_deltalake` (seen: `00000000000000000099.checkpoint.parquet` after 100 commits), so
    opening the table never replays more than 100 JSON commits; we do not create checkpoints ourselves.
  - Our commits turn OFF expired-log cleanup (`cleanup_expired_logs=False`): by default delta-rs deletes commit
    JSONs older than `delta.logRetentionDuration` (30 days) at each checkpoint, and with them the run records that
    `committed()` and `live()` read. Another writer (Spark, `DeltaTable.cleanup_metadata()`) may still delete them:
    then those functions see only the runs whose commits remain (app transactions, in checkpoints, still make
    retries idempotent).
  - What users must schedule themselves, as for any Delta table: `DeltaTable.optimize.compact()` (each run adds
    its own files, so many small runs make many small files), then `DeltaTable.vacuum(retention_hours=...)` to
    delete files that overwrites, compaction or failed commits left unreferenced (time travel to versions older
    than the retention stops working once vacuumed).
  - `committed()` reads one commitInfo per version (`DeltaTable.history()`: ~0.7 s for 100 versions on moto,
    10 ms locally); a DeltaFormat keeps what it read and later reads only the versions added since.
  - rows_per_file does not apply: delta-rs sizes data files by bytes (its target_file_size).
  - `data_files(run_ids)` picks files by their run_id min/max statistics in the log: compaction merges runs into
    one file, which is then returned for each of them (readers filter rows by run_id).

The parts, which `DeltaFormat` composes: `delta_table` (the table's location, delta-rs options, the Delta
schema), `delta_log` (run records and data files, read from the log), `delta_checks` (before a run),
`delta_commit` (the commit), `delta_rows` (the live rows, read by delta-rs's scan).
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.io.storage import Storage, absolute, is_s3
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
        super().__init__(storage, uri.rstrip("/") if is_s3(uri) else absolute(uri))
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
