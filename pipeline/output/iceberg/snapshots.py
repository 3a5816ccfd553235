"""What an Iceberg output's snapshots say: each run is one snapshot whose summary holds its record (see
`pipeline/output/iceberg/__init__.py`)."""

from __future__ import annotations

import json

from pipeline.output.formats import RECORD_KEY, RUN_ID_KEY
from pipeline.output.iceberg.catalog import CatalogTable


class IcebergSnapshots:
    """The committed runs' records and the live data files, read from the table's current snapshot and its
    ancestry."""

    def __init__(self, catalog_table: CatalogTable):
        self.catalog_table = catalog_table

    def committed(self) -> list[dict]:
        table = self.catalog_table.load()
        if table is None:
            return []
        return [r for s in ancestry(table) if (r := _record(s)) is not None]

    def data_files(self) -> list[str]:
        """Absolute URIs of the current snapshot's data files, all of them: a file compacted by another engine
        holds rows of several runs, so readers of the skip set filter rows by run_id instead."""
        table = self.catalog_table.load()
        if table is None or table.current_snapshot() is None:
            return []
        return sorted(task.file.file_path for task in table.scan().plan_files())


def committed_record(table, run_id: str) -> dict | None:
    """The record of run `run_id` if a snapshot in `table`'s ancestry committed it, with the files it added."""
    for snapshot in ancestry(table):
        if snapshot.summary is not None and snapshot.summary.additional_properties.get(RUN_ID_KEY) == run_id:
            record = _record(snapshot) or {"run_id": run_id}
            return {**record, "metadata_location": table.metadata_location, "files": _added_files(table, snapshot)}
    return None


def ancestry(table) -> list:
    """Snapshots of the table's current state, oldest first (a rolled-back snapshot is not one)."""
    from pyiceberg.table.snapshots import ancestors_of

    return list(reversed(list(ancestors_of(table.current_snapshot(), table.metadata))))


def _record(snapshot) -> dict | None:
    summary = snapshot.summary.additional_properties if snapshot.summary is not None else {}
    if RECORD_KEY not in summary:
        return None
    record = json.loads(summary[RECORD_KEY])
    record["snapshot_id"] = snapshot.snapshot_id
    return record


def _added_files(table, snapshot) -> list[dict]:
    from pyiceberg.manifest import ManifestEntryStatus

    files = []
    for manifest in snapshot.manifests(table.io):
        if manifest.added_snapshot_id != snapshot.snapshot_id:
            continue
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            if entry.status == ManifestEntryStatus.ADDED and entry.snapshot_id == snapshot.snapshot_id:
                files.append({"path": entry.data_file.file_path, "rows": entry.data_file.record_count})
    return files
