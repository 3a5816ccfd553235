"""After each run's commit: copy the run records that have no copy yet (`runs.py`), then expire the snapshots that
Iceberg's own table properties say are old, so that metadata.json stays as small as a few snapshots make it
(docs/commit-protocol.md, "Table upkeep"). Data files are not deleted: that is `remove_orphan_files`' job."""

from __future__ import annotations

import logging
import time
from typing import Callable

from pyiceberg.table.refs import SnapshotRefType

from pipeline.output.iceberg.runs import RunCopies
from pipeline.output.iceberg.snapshots import ancestry, record_of, rolled_back

logger = logging.getLogger(__name__)

MAX_SNAPSHOT_AGE_MS = "history.expire.max-snapshot-age-ms"
MIN_SNAPSHOTS_TO_KEEP = "history.expire.min-snapshots-to-keep"
DEFAULT_MAX_SNAPSHOT_AGE_MS = 5 * 24 * 3600 * 1000  # Iceberg's defaults
DEFAULT_MIN_SNAPSHOTS_TO_KEEP = 1


def after_commit(table, copies: RunCopies, fence: Callable[[], None]) -> None:
    """Best effort: the run is committed whatever happens here; what fails is retried after the next commit."""
    try:
        keep_copies(table, copies)
        expired = expirable(table.metadata, int(time.time() * 1000))
        if expired:
            fence()  # an expiry is a visible write: not by a driver that lost the output's lease
            forget_rolled_back(table, copies, set(expired))
            table.maintenance.expire_snapshots().by_ids(expired).commit()
    except Exception as exc:  # noqa: BLE001 - a failed upkeep never fails a committed run
        logger.warning("table upkeep after the commit did not finish (%s: %s); the next commit tries again",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


def keep_copies(table, copies: RunCopies) -> None:
    """A copy of every run record in the ancestry that has none (this run's, and any whose driver was killed
    between its commit and its copy), before any snapshot can be expired."""
    have = copies.listed()
    for record in [r for s in ancestry(table) if (r := record_of(s)) is not None]:
        if record["run_id"] not in have:
            copies.keep(record, str(table.metadata.table_uuid))


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
