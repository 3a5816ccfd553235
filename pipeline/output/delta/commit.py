"""A run's one Delta commit: how it is made atomic and idempotent is told in `pipeline/output/delta/__init__.py`."""

from __future__ import annotations

import datetime
from typing import Iterator

import pyarrow as pa

from pipeline.output.delta.checks import check_partitioning
from pipeline.output.delta.log import DeltaHistory
from pipeline.output.delta.table import (RUN_DATE, TABLE_CONFIGURATION, DeltaLocation, app_id, delta_schema,
                                         partition_by, with_run_date_field)
from pipeline.output.formats import RECORD_KEY, RUN_ID_KEY, Commit, record_json
from pipeline.job.errors import JobFailed

COMMIT_ATTEMPTS = 10  # a version taken by another writer is retried at the next, the lease checked before each


class DeltaCommitter:
    """Commits a run's staged rows as one `write_deltalake` call carrying its record and app transaction, or
    returns the run's record when the table already holds it."""

    def __init__(self, location: DeltaLocation, history: DeltaHistory):
        self.location = location
        self.history = history

    def commit(self, commit: Commit) -> dict:
        from deltalake import CommitProperties, Transaction, write_deltalake
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import PostCommitHookProperties

        table = self.location.table()
        if table is not None and table.transaction_version(app_id(commit.run_id)) is not None:
            return self.history.committed_record(table, commit.run_id)

        mode = "overwrite" if commit.overwrite else "append"
        if table is not None and not commit.overwrite:
            check_partitioning(table, self.location.uri, commit.partitioning)
        record = {"committed_at": _now_precise(), **commit.record, "run_id": commit.run_id, "mode": mode}
        schema = delta_schema(commit.schema)
        schema = with_run_date_field(schema) if commit.partitioning.run_date else schema
        for _ in range(COMMIT_ATTEMPTS):
            failure: list[BaseException] = []  # what our reader raised: delta-rs reports it as a DeltaError
            reader = pa.RecordBatchReader.from_batches(schema, _batches(commit, schema, failure))
            commit.fence()
            try:
                # No retry inside delta-rs: its retry would commit at the next version without our fence, so a
                # driver frozen past its lease mid-write would, thawed, commit its run a second time.
                write_deltalake(
                    self.location.uri, reader, mode=mode, schema_mode=_schema_mode(table, schema, commit.overwrite),
                    partition_by=partition_by(commit.partitioning) or None, storage_options=self.location.options,
                    configuration=TABLE_CONFIGURATION if table is None else None,
                    commit_properties=CommitProperties(
                        custom_metadata={RUN_ID_KEY: commit.run_id, RECORD_KEY: record_json(record)},
                        app_transactions=[Transaction(app_id=app_id(commit.run_id), version=1)],
                        max_commit_retries=0),
                    post_commithook_properties=PostCommitHookProperties(create_checkpoint=True,
                                                                        cleanup_expired_logs=False))
            except Exception as exc:
                if failure:
                    raise failure[0] from None
                table = self.location.table()  # a racing commit of this same run won: it is committed, once
                if table is not None and table.transaction_version(app_id(commit.run_id)) is not None:
                    return self.history.committed_record(table, commit.run_id)
                if not isinstance(exc, CommitFailedError):
                    raise
                continue  # another writer took the version: check the lease again, then retry at the next
            return self.history.committed_record(self.location.table(), commit.run_id)
        raise JobFailed(f"run {commit.run_id}: other writers took {COMMIT_ATTEMPTS} table versions in a row before "
                        "this commit; nothing was committed, and a rerun resumes the run")


def _batches(commit: Commit, schema: pa.Schema, failure: list[BaseException]) -> Iterator[pa.RecordBatch]:
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


def _schema_mode(table, schema: pa.Schema, overwrite: bool) -> str | None:
    """An overwrite replaces the schema; an append to a table written before the job's ADDED_COLUMNS merges them
    in (the checks refused any other difference before the run)."""
    if overwrite:
        return "overwrite"
    if table is not None and not set(schema.names) <= {f.name for f in table.schema().fields}:
        return "merge"
    return None


def _now_precise() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
