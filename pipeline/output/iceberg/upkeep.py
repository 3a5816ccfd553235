"""With each run's commit: the snapshots that Iceberg's own table properties say are old are expired in the run's
own catalog commit (one metadata version a run, as before), after the records of the runs they hold are copied
(`runs.py`), so that metadata.json stays as small as a few snapshots make it (docs/commit-protocol.md, "Table
upkeep"). Data files are not deleted: that is `remove_orphan_files`' job."""

from __future__ import annotations

import logging
import time
from typing import Callable

from pyiceberg.table.refs import SnapshotRefType
from pyiceberg.table.update.snapshot import ExpireSnapshots

from pipeline.output.iceberg.runs import RunCopies
from pipeline.output.iceberg.snapshots import ancestry, record_of, rolled_back

logger = logging.getLogger(__name__)

MAX_SNAPSHOT_AGE_MS = "history.expire.max-snapshot-age-ms"
MIN_SNAPSHOTS_TO_KEEP = "history.expire.min-snapshots-to-keep"
DEFAULT_MAX_SNAPSHOT_AGE_MS = 5 * 24 * 3600 * 1000  # Iceberg's defaults
DEFAULT_MIN_SNAPSHOTS_TO_KEEP = 1


def stage_expiry(tx, table, copies: RunCopies, fence: Callable[[], None]) -> None:
    """Stage into `tx` (the run's transaction on `table`, its snapshot staged) the expiry of the snapshots that
    are old by the table's properties, once every record they hold has a copy. Best effort: whatever fails here,
    the run commits, and the next run's commit expires them."""
    try:
        expired = expirable(tx.table_metadata, int(time.time() * 1000))
        if expired:
            keep_copies(table, copies)
            fence()  # before the one delete: a driver that lost the output's lease deletes nothing
            forget_rolled_back(table, copies, set(expired))
            ExpireSnapshots(transaction=tx).by_ids(expired).commit()  # staged: tx is not autocommitted
    except Exception as exc:  # noqa: BLE001 - the run's commit never depends on its upkeep
        warn("expired nothing", exc)


def keep_own_copy(table, copies: RunCopies) -> None:
    """After the run's commit: the copy of its record (best effort: the next commit copies what is missing)."""
    try:
        record = record_of(table.current_snapshot())
        if record is not None:
            copies.keep(record, str(table.metadata.table_uuid))
    except Exception as exc:  # noqa: BLE001 - the run is committed; its snapshot holds the record
        warn("did not copy the run's record", exc)


def keep_copies(table, copies: RunCopies) -> None:
    """A copy of every run record in the ancestry that has none (a driver killed between its commit and its
    copy), before any snapshot can be expired."""
    have = copies.listed()
    for record in [r for s in ancestry(table) if (r := record_of(s)) is not None]:
        if record["run_id"] not in have:
            copies.keep(record, str(table.metadata.table_uuid))


def warn(what: str, exc: BaseException) -> None:
    logger.warning("Iceberg table upkeep %s (%s: %s); the next commit tries again", what, type(exc).__name__,
                   str(exc).splitlines()[0] if str(exc) else "")


def forget_rolled_back(table, copies: RunCopies, expired: set[int]) -> None:
    """Delete the copies of rolled-back runs whose snapshots are about to go (unless the run was committed again
    since): once the snapshot is gone, its copy would make the run look committed (`snapshots.earlier_runs`)."""
    lineage = ancestry(table)
    again = {r["run_id"] for s in lineage if (r := record_of(s)) is not None}
    gone = rolled_back(table, lineage) & expired
    runs = [r["run_id"] for s in table.metadata.snapshots
            if s.snapshot_id in gone and (r := record_of(s)) is not None and r["run_id"] not in again]
    if runs:
        copies.storage.delete([copies.uri_of(r) for r in runs])


def expirable(metadata, now_ms: int) -> list[int]:
    """Ids of the snapshots Iceberg's `expire_snapshots` would expire now by the table's properties: each branch
    keeps its newest `min-snapshots-to-keep` ancestors and those younger than `max-snapshot-age-ms` (a branch's
    own settings first), a tag keeps its snapshot, and a snapshot on no branch goes once it is that old."""
    props = metadata.properties
    max_age = int(props.get(MAX_SNAPSHOT_AGE_MS, DEFAULT_MAX_SNAPSHOT_AGE_MS))
    min_keep = int(props.get(MIN_SNAPSHOTS_TO_KEEP, DEFAULT_MIN_SNAPSHOTS_TO_KEEP))
    by_id = {s.snapshot_id: s for s in metadata.snapshots}
    keep = {s.snapshot_id for s in metadata.snapshots if s.timestamp_ms >= now_ms - max_age}
    for ref in metadata.refs.values():
        keep.add(ref.snapshot_id)
        if ref.snapshot_ref_type != SnapshotRefType.BRANCH:
            continue
        oldest = now_ms - (ref.max_snapshot_age_ms or max_age)
        at_least = max(1, ref.min_snapshots_to_keep or min_keep)
        snapshot, kept = by_id.get(ref.snapshot_id), 0
        while snapshot is not None and (kept < at_least or snapshot.timestamp_ms >= oldest):
            keep.add(snapshot.snapshot_id)
            kept += 1
            snapshot = by_id.get(snapshot.parent_snapshot_id)
    return sorted(set(by_id) - keep)
