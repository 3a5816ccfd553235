"""An Iceberg run's one snapshot, made by one catalog commit (see `pipeline/output/iceberg/__init__.py`)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from pipeline.output.formats import RECORD_KEY, RUN_ID_KEY, Commit, record_json
from pipeline.output.iceberg.catalog import CatalogTable
from pipeline.output.iceberg.checks import add_new_columns, check_writable
from pipeline.output.iceberg.runs import RunCopies
from pipeline.output.iceberg.snapshots import committed_record
from pipeline.output.iceberg.upkeep import keep_copies, keep_own_copy, stage_expiry, warn
from pipeline.output.iceberg.write import DataFileWriter, discard


class IcebergCommitter:
    """Writes a run's data files, then adds them (or, for an overwrite, replaces every live file with them) in one
    snapshot carrying the run's record, expiring old snapshots in the same catalog commit (`upkeep`); returns the
    run's record when the table already holds it, or held it (a copy in `_pipeline/runs/`, its snapshot expired
    since)."""

    def __init__(self, catalog_table: CatalogTable, copies: RunCopies):
        self.catalog_table = catalog_table
        self.copies = copies

    def commit(self, commit: Commit) -> dict:
        table = self.catalog_table.load()
        if table is not None:
            done = committed_record(table, commit.run_id)
            if done is not None:
                _copy_what_is_missing(table, self.copies)  # a driver killed between its commit and its copy
                return done
            copy = self.copies.get(commit.run_id)
            if copy is not None and copy.get("table_uuid") == str(table.metadata.table_uuid):
                return {k: v for k, v in copy.items() if k != "table_uuid"} | {"files": []}
        else:
            table = self.catalog_table.create(commit.schema, commit.partitioning)
        check_writable(table, commit, self.catalog_table.identifier)
        table = add_new_columns(table, commit.schema)

        attempt = uuid.uuid4().hex[:8]
        data_files = []
        try:
            for data_file in DataFileWriter(table, commit, attempt).files():
                data_files.append(data_file)  # one by one: a failure midway still discards those written
            record = {**commit.record, "run_id": commit.run_id,
                      "mode": "overwrite" if commit.overwrite else "append"}
            record.setdefault("committed_at", datetime.now(timezone.utc).isoformat(timespec="microseconds"))
            tx = _transaction(table, commit, data_files, {RUN_ID_KEY: commit.run_id, RECORD_KEY: record_json(record)})
            stage_expiry(tx, table, self.copies, commit.fence)
            commit.fence()
        except BaseException:
            discard(table, data_files)
            raise
        from pyiceberg.exceptions import CommitFailedException, ValidationException

        try:
            table = tx.commit_transaction()
        except (CommitFailedException, ValidationException):
            discard(table, data_files)  # the commit did not land: these files are ours alone
            raise
        snapshot = table.current_snapshot()
        keep_own_copy(table, self.copies)
        return {**record, "snapshot_id": snapshot.snapshot_id, "metadata_location": table.metadata_location,
                "files": [{"path": f.file_path, "rows": f.record_count} for f in data_files]}


def _copy_what_is_missing(table, copies: RunCopies) -> None:
    try:
        keep_copies(table, copies)
    except Exception as exc:  # noqa: BLE001 - the run is committed; its snapshot holds the record
        warn("did not copy the runs' records", exc)


def _transaction(table, commit: Commit, data_files: list, properties: dict[str, str]):
    """The uncommitted transaction of the run's one snapshot: an append of `data_files`, or, for an overwrite of
    a table with rows, one `overwrite` snapshot replacing every live file with them."""
    tx = table.transaction()
    if commit.overwrite and table.current_snapshot() is not None:
        from pyiceberg.expressions import AlwaysTrue

        with tx.update_snapshot(snapshot_properties=properties).overwrite() as producer:
            producer.delete_by_predicate(AlwaysTrue())
            for task in table.scan().plan_files():
                producer.delete_data_file(task.file)
            for data_file in data_files:
                producer.append_data_file(data_file)
    else:
        with tx.update_snapshot(snapshot_properties=properties).merge_append() as producer:
            for data_file in data_files:
                producer.append_data_file(data_file)
    return tx
