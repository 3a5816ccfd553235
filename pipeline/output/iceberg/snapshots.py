"""What an Iceberg output's snapshots say: each run is one snapshot whose summary holds its record (see
`pipeline/output/iceberg/__init__.py`); a run whose snapshot was expired is known by its copy in
`_pipeline/runs/` (`runs.py`), unless it was rolled back."""

from __future__ import annotations

import json

from pipeline.output.formats import RECORD_KEY, RUN_ID_KEY
from pipeline.output.iceberg.catalog import CatalogTable
from pipeline.output.iceberg.runs import RunCopies


class IcebergSnapshots:
    """The committed runs' records, read from the table's current snapshot and its ancestry and from the copies
    of earlier runs; the live data files, read from the current snapshot."""

    def __init__(self, catalog_table: CatalogTable, copies: RunCopies):
        self.catalog_table = catalog_table
        self.copies = copies

    def committed(self) -> list[dict]:
        """Runs whose snapshots are gone or out of the ancestry (by their copies, oldest first), then the
        ancestry's runs."""
        table = self.catalog_table.load()
        if table is None:
            return []
        lineage = ancestry(table)
        live = [r for s in lineage if (r := record_of(s)) is not None]
        return earlier_runs(table, self.copies, lineage, {r["run_id"] for r in live}) + live

    def data_files(self) -> list[str]:
        """Absolute URIs of the current snapshot's data files, all of them: a file compacted by another engine
        holds rows of several runs, so readers of the skip set filter rows by run_id instead."""
        table = self.catalog_table.load()
        if table is None or table.current_snapshot() is None:
            return []
        return sorted(task.file.file_path for task in table.scan().plan_files())


def earlier_runs(table, copies: RunCopies, lineage: list, in_lineage: set[str]) -> list[dict]:
    """Records of the runs with a copy whose snapshots are not in the ancestry: expired, or older than its first
    snapshot (whose parent was expired), by commit time. Not a run: a copy of another table once at this location
    (another uuid), nor one whose snapshot was rolled back (`rolled_back`)."""
    names = copies.listed() - in_lineage
    if not names:
        return []
    skip, uuid = rolled_back(table, lineage), str(table.metadata.table_uuid)
    found = [c for c in copies.read(names).values()
             if c.get("table_uuid", uuid) == uuid and c.get("snapshot_id") not in skip]
    return [{k: v for k, v in c.items() if k != "table_uuid"}
            for c in sorted(found, key=lambda c: (str(c.get("committed_at", "")), c["run_id"]))]


def rolled_back(table, lineage: list) -> set[int]:
    """Snapshots out of the ancestry but newer than its first one: rolled back, or on another branch. (Older ones
    were cut off from it by an expiry, which leaves their children without a parent: a tagged one, say.)"""
    if not lineage:
        return set()
    first, ids = lineage[0].sequence_number or 0, {s.snapshot_id for s in lineage}
    return {s.snapshot_id for s in table.metadata.snapshots
            if s.snapshot_id not in ids and (s.sequence_number or 0) > first}


def committed_record(table, run_id: str) -> dict | None:
    """The record of run `run_id` if a snapshot in `table`'s ancestry committed it, with the files it added."""
    for snapshot in ancestry(table):
        if snapshot.summary is not None and snapshot.summary.additional_properties.get(RUN_ID_KEY) == run_id:
            record = record_of(snapshot) or {"run_id": run_id}
            return {**record, "metadata_location": table.metadata_location, "files": _added_files(table, snapshot)}
    return None


def ancestry(table) -> list:
    """Snapshots of the table's current state, oldest first (a rolled-back snapshot is not one)."""
    from pyiceberg.table.snapshots import ancestors_of

    return list(reversed(list(ancestors_of(table.current_snapshot(), table.metadata))))


def record_of(snapshot) -> dict | None:
    """The run record a snapshot's summary holds, with the snapshot's id; None for another engine's snapshot."""
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
