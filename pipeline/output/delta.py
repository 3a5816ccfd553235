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
    already in the table (`DeltaTable.transaction_version`), and delta-rs's conflict checker refuses a second
    commit carrying it. App transactions survive overwrites and checkpoints.
Data files written before a commit that then fails (a crash, rows that raise midway, a lost lease) are never
named by the log, so readers never see them; `vacuum` deletes them.

Commit safety on S3, as found with deltalake 1.6.6 (delta-rs) against moto:
  - Without a locking provider or `copy_if_not_exists`, delta-rs 1.x uses its default log store, which writes
    `_delta_log/<version>.json` with ONE conditional PUT, `If-None-Match: *` (object_store's conditional put,
    S3ConditionalPut::ETagMatch, its default since AWS S3 supports it, Aug 2024). There is no temporary file and
    no rename. The S3 server refuses the PUT with 412 when that version exists; delta-rs then rereads the log,
    checks for conflicts and retries at the next version (two appends both land, at different versions) or fails.
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
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Iterator
from urllib.parse import unquote

import pyarrow as pa

from pipeline.spec.errors import JobFailed, UserError
from pipeline.output.formats import RECORD_KEY, RUN_ID_KEY, Commit, OutputFormat, Partitioning, record_json
from pipeline.io.storage import Storage, absolute, is_s3, join, split_s3

RUN_DATE = "run_date"
APP_ID_PREFIX = "pipeline-run-"
# Operations of other tools that replace a table's rows: the runs before them are no longer live.
_REPLACING_OPERATIONS = {"CREATE OR REPLACE TABLE", "REPLACE TABLE", "CREATE OR REPLACE TABLE AS SELECT",
                         "REPLACE TABLE AS SELECT", "TRUNCATE"}


def app_id(run_id: str) -> str:
    return f"{APP_ID_PREFIX}{run_id}"


def storage_options(storage: Storage, uri: str) -> dict[str, str] | None:
    """delta-rs's options for `uri`: None for a local path. Credentials come from the environment only if set
    there (else delta-rs's own chain: profile, web identity, instance role); callers never log these."""
    if not is_s3(uri):
        return None
    options = {"conditional_put": "etag"}  # see the module docstring: safe commits without DynamoDB
    if storage.endpoint_url:
        options["AWS_ENDPOINT_URL"] = storage.endpoint_url
        if storage.endpoint_url.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if storage.region:
        options["AWS_REGION"] = storage.region
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(name):
            options[name] = os.environ[name]
    return options


class DeltaFormat(OutputFormat):
    name = "delta"

    def __init__(self, storage: Storage, uri: str, schema: pa.Schema | None = None,
                 partitioning: Partitioning | None = None):
        """`schema` (the job's rows) and `partitioning`, when given, let `check_existing` refuse a table that an
        append could not go into."""
        super().__init__(storage, uri.rstrip("/") if is_s3(uri) else absolute(uri))
        self.schema = schema
        self.partitioning = partitioning
        self._history: dict[int, dict] = {}  # version -> the parts of its commitInfo we use

    # --- the table ---------------------------------------------------------------------------------------
    @property
    def options(self) -> dict[str, str] | None:
        return storage_options(self.storage, self.uri)

    def table(self, version: int | None = None):
        """The DeltaTable at `uri` (its latest version, or `version`), or None when there is none yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.uri, version=version, storage_options=self.options)
        except TableNotFoundError:
            return None

    def _log(self, table) -> list[dict]:
        """Every version's commitInfo (what we use of it), oldest first; only versions added since the last call
        are read."""
        version = table.version()
        newest = max(self._history, default=-1)
        if newest > version:  # the table was replaced by a younger one: read it afresh
            self._history.clear()
            newest = -1
        if newest < version:
            entries = table.history() if newest < 0 else table.history(version - newest)
            for entry in entries:
                if "version" in entry:
                    self._history[entry["version"]] = {
                        "version": entry["version"], "operation": entry.get("operation"),
                        "parameters": entry.get("operationParameters") or {},
                        RECORD_KEY: entry.get(RECORD_KEY), RUN_ID_KEY: entry.get(RUN_ID_KEY)}
        return [self._history[v] for v in sorted(self._history)]

    @staticmethod
    def _record(entry: dict) -> dict | None:
        raw = entry.get(RECORD_KEY)
        if raw is None:
            return None
        try:
            record = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (TypeError, ValueError):
            return None
        return {**record, "version": entry["version"]}

    @staticmethod
    def _replaces_all(entry: dict) -> bool:
        """Whether a commit another tool made replaced every row of the table."""
        if entry["operation"] in _REPLACING_OPERATIONS:
            return True
        params = entry["parameters"]
        return (entry["operation"] == "WRITE" and str(params.get("mode", "")).lower() == "overwrite"
                and not params.get("predicate"))

    # --- what is committed ---------------------------------------------------------------------------------
    def committed(self) -> list[dict]:
        table = self.table()
        if table is None:
            return []
        return [record for entry in self._log(table) if (record := self._record(entry)) is not None]

    def live(self) -> list[dict]:
        """Runs since the last overwrite, ours or another tool's (a foreign overwrite leaves no run live)."""
        table = self.table()
        if table is None:
            return []
        runs: list[dict] = []
        for entry in self._log(table):
            record = self._record(entry)
            if record is None:
                if self._replaces_all(entry):
                    runs = []
                continue
            runs = [record] if record.get("mode") == "overwrite" else runs + [record]
        return runs

    def data_files(self, run_ids: set[str] | None = None) -> list[str]:
        """Absolute URIs of the current version's data files; with `run_ids`, those that may hold those runs'
        rows, told by each file's run_id min/max statistics in the log (no extra reads): a file one run wrote
        has min = max = its run_id, a file another engine compacted spans several and is kept."""
        table = self.table()
        if table is None:
            return []
        if run_ids is None:
            return [uri if is_s3(uri) else absolute(uri) for uri in table.file_uris()]
        actions = pa.table(table.get_add_actions(flatten=True))
        paths = actions["path"].to_pylist()
        if "min.run_id" in actions.column_names and "max.run_id" in actions.column_names:
            ranges = zip(actions["min.run_id"].to_pylist(), actions["max.run_id"].to_pylist())
            paths = [path for path, (low, high) in zip(paths, ranges) if low is None or high is None or any(
                low <= r and (r <= high or r.startswith(high)) for r in run_ids)]  # a max may be truncated
        return [join(self.uri, unquote(path)) for path in paths]

    def describe(self, record: dict) -> str:
        files = record.get("files") or []
        return f"Delta table version {record.get('version')}" + (f" ({len(files)} file(s))" if files else "")

    # --- before a run ------------------------------------------------------------------------------------
    def check_existing(self, overwrite: bool) -> None:
        table = self.table()
        if table is None:
            if self._holds_parquet():
                raise UserError(f"output.uri: {self.uri} holds Parquet files but no Delta table (no _delta_log); "
                                "choose another output.uri or output.format: parquet")
            return
        if overwrite:
            return  # one atomic commit replaces rows, schema and partitioning
        if self.partitioning is not None:
            want = self._partition_by(self.partitioning)
            have = list(table.metadata().partition_columns)
            if want != have:
                raise UserError(f"output.uri: the Delta table at {self.uri} is partitioned by {have or 'nothing'}, "
                                f"this job by {want or 'nothing'}; set output.partitioning to match, use "
                                "--overwrite (output.overwrite: true) to replace the table, or choose another output.uri")
        if self.schema is not None:
            problem = self._schema_problem(table)
            if problem:
                raise UserError(f"output.uri: the Delta table at {self.uri} cannot take this job's rows ({problem}); "
                                "pass --overwrite (output.overwrite: true) to replace it, or choose another output.uri")

    def _holds_parquet(self) -> bool:
        """Whether any Parquet file is under uri (hidden and `_` folders, such as our staging, aside)."""
        if not is_s3(self.uri) and not os.path.isdir(self.uri):
            return False
        prefix = self.uri.rstrip("/") + "/"
        for page in self.storage.list_pages(self.uri):
            for obj in page:
                parts = obj.uri.removeprefix(prefix).split("/")
                if obj.uri.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts):
                    return True
        return False

    def _schema_problem(self, table) -> str | None:
        from deltalake import Schema

        expected = delta_schema(self.schema)
        partitioning = self.partitioning
        have = {f.name: f.type for f in table.schema().fields}
        if (partitioning is None and RUN_DATE in have and RUN_DATE not in expected.names) or (
                partitioning is not None and partitioning.run_date):
            expected = _with_run_date_field(expected)
        want = {f.name: f.type for f in Schema.from_arrow(expected).fields}
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        differ = [n for n in want if n in have and want[n] != have[n]]
        parts = []
        if missing:
            parts.append(f"it lacks column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"it has column(s) {', '.join(extra)} the job does not write")
        if differ:
            parts.append("column(s) " + ", ".join(f"{n} (the table has {_type_name(have[n])}, the job writes "
                                                  f"{_type_name(want[n])})" for n in differ)
                         + " differ in type")
        return "; ".join(parts) or None

    # --- a run -------------------------------------------------------------------------------------------
    def commit(self, commit: Commit) -> dict:
        from deltalake import CommitProperties, Transaction, write_deltalake
        from deltalake.transaction import PostCommitHookProperties

        table = self.table()
        if table is not None and table.transaction_version(app_id(commit.run_id)) is not None:
            return self._committed_record(table, commit.run_id)

        mode = "overwrite" if commit.overwrite else "append"
        if table is not None and not commit.overwrite:
            want, have = self._partition_by(commit.partitioning), list(table.metadata().partition_columns)
            if want != have:
                raise UserError(f"output.uri: the Delta table at {self.uri} is partitioned by {have or 'nothing'}, "
                                f"this job by {want or 'nothing'}; set output.partitioning to match, use "
                                "--overwrite (output.overwrite: true) to replace the table, or choose another output.uri")
        record = {"committed_at": _now_precise(), **commit.record, "run_id": commit.run_id, "mode": mode}
        schema = delta_schema(commit.schema)
        schema = _with_run_date_field(schema) if commit.partitioning.run_date else schema
        failure: list[BaseException] = []  # what our reader raised: delta-rs reports it as a DeltaError
        reader = pa.RecordBatchReader.from_batches(schema, self._batches(commit, schema, failure))

        commit.fence()
        try:
            write_deltalake(
                self.uri, reader, mode=mode, schema_mode="overwrite" if commit.overwrite else None,
                partition_by=self._partition_by(commit.partitioning) or None, storage_options=self.options,
                commit_properties=CommitProperties(
                    custom_metadata={RUN_ID_KEY: commit.run_id, RECORD_KEY: record_json(record)},
                    app_transactions=[Transaction(app_id=app_id(commit.run_id), version=1)]),
                post_commithook_properties=PostCommitHookProperties(create_checkpoint=True,
                                                                    cleanup_expired_logs=False))
        except Exception:
            if failure:
                raise failure[0] from None
            table = self.table()  # a racing commit of this same run won: it is committed, once
            if table is not None and table.transaction_version(app_id(commit.run_id)) is not None:
                return self._committed_record(table, commit.run_id)
            raise
        return self._committed_record(self.table(), commit.run_id)

    def _batches(self, commit: Commit, schema: pa.Schema, failure: list[BaseException]) -> Iterator[pa.RecordBatch]:
        """The staged rows as batches of `schema`; then, as the last thing before delta-rs commits, the row count
        and the fence are checked: raising here aborts the write with nothing visible."""
        run_date = datetime.date.fromisoformat(commit.partitioning.run_date) if commit.partitioning.run_date else None
        rows = 0
        try:
            for table in commit.rows():
                if run_date is not None:
                    dates = pa.repeat(pa.scalar(run_date, pa.date32()), table.num_rows)
                    table = (table.set_column(table.schema.get_field_index(RUN_DATE), RUN_DATE, dates)
                             if RUN_DATE in table.schema.names else table.append_column(RUN_DATE, dates))
                if not table.schema.equals(schema):
                    table = table.select(schema.names).cast(schema)
                rows += table.num_rows
                yield from table.to_batches()
            expected = commit.record.get("rows")
            if expected is not None and rows != expected:
                raise JobFailed(f"run {commit.run_id}: its staged rows number {rows:,}, but {expected:,} were staged; "
                                "nothing was committed, and a rerun resumes the run")
            commit.fence()
        except GeneratorExit:  # delta-rs dropped the reader (its own write failed): its error is the one to raise
            raise
        except BaseException as exc:
            failure.append(exc)
            raise

    def _committed_record(self, table, run_id: str) -> dict:
        """A committed run's record, with its version and the files its commit added."""
        def find(entries) -> dict | None:
            for entry in entries:
                if entry.get(RUN_ID_KEY) == run_id and (record := self._record(entry)) is not None:
                    return {**record, "files": self._added_files(entry["version"])}
            return None

        found = None
        if not self._history:  # a fresh DeltaFormat: the run is most likely one of the last few versions
            found = find({"version": e["version"], RECORD_KEY: e.get(RECORD_KEY), RUN_ID_KEY: e.get(RUN_ID_KEY)}
                         for e in table.history(8) if "version" in e)
        found = found or find(reversed(self._log(table)))
        # Committed (its app transaction is in the table), but its commit JSON is gone (log cleanup).
        return found or {"run_id": run_id, "version": None, "files": []}

    def _added_files(self, version: int) -> list[dict]:
        """[{path (relative to uri), rows}] of what one commit added: one read of its JSON in _delta_log."""
        entry = join(self.uri, f"_delta_log/{version:020d}.json")
        try:
            if is_s3(entry):
                bucket, key = split_s3(entry)
                data = self.storage.s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
            else:
                with open(entry, "rb") as f:
                    data = f.read()
        except Exception:  # gone (log cleanup) or unreadable: the files are a nicety of the summary
            return []
        files = []
        for line in data.decode().splitlines():
            add = json.loads(line).get("add") if line.strip() else None
            if add:
                stats = json.loads(add["stats"]) if add.get("stats") else {}
                files.append({"path": unquote(add["path"]), "rows": stats.get("numRecords")})
        return files

    @staticmethod
    def _partition_by(partitioning: Partitioning) -> list[str]:
        if partitioning.run_date:
            return [RUN_DATE]
        return [partitioning.column] if partitioning.column else []


def delta_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` in the Arrow types that Delta's types read back as: the Parquet files keep their Arrow schema, and
    a reader (Polars) that finds a fixed-size list there where the log says list refuses the file."""
    return pa.schema([field.with_type(_delta_type(field.type)) for field in schema], metadata=schema.metadata)


def _delta_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_delta_type(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_delta_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_delta_type(t.key_type)), t.item_field.with_type(_delta_type(t.item_type)))
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC" if t.tz else None)  # Delta: timestamp (UTC) or timestamp_ntz, in µs
    return t


def _type_name(t) -> str:
    """A Delta type as its log writes it: float, array<string>, struct<...>."""
    if type(t).__name__ == "PrimitiveType":
        return t.type
    if type(t).__name__ == "ArrayType":
        return f"array<{_type_name(t.element_type)}>"
    return t.type if isinstance(t.type, str) else str(t)


def _with_run_date_field(schema: pa.Schema) -> pa.Schema:
    field = pa.field(RUN_DATE, pa.date32())
    if RUN_DATE in schema.names:
        return schema.set(schema.get_field_index(RUN_DATE), field)
    return schema.append(field)


def _now_precise() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
