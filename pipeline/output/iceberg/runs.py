"""Run records kept beside an Iceberg table, `<table>/_pipeline/runs/<run_id>.json`, so that a run stays known
after its snapshot is expired (why, and what another engine's expiry does: docs/commit-protocol.md, "Table upkeep").

A copy is the run's snapshot record (what `snapshots.record_of` reads from its summary) plus the table's uuid,
written create-only once the snapshot is committed: every writer of a run's copy writes the same bytes, so a late
or repeated write changes nothing. `_`-prefixed folders are hidden from Iceberg's `remove_orphan_files`.
"""

from __future__ import annotations

import json
import posixpath

from pipeline.io.storage import Storage, join

RUNS = "_pipeline/runs"


class RunCopies:
    """The `_pipeline/runs/` folder of the table at `uri`; copies read once are kept (they never change)."""

    def __init__(self, storage: Storage, uri: str):
        self.storage = storage
        self.folder = join(uri, RUNS)
        self._read: dict[str, dict] = {}

    def uri_of(self, run_id: str) -> str:
        return join(self.folder, f"{run_id}.json")

    def listed(self) -> set[str]:
        """Run ids that have a copy (one listing of the folder)."""
        return {posixpath.basename(obj.uri)[:-len(".json")] for page in self.storage.list_pages(self.folder)
                for obj in page if obj.uri.endswith(".json")}

    def keep(self, record: dict, table_uuid: str) -> None:
        """Write the copy of `record` (a snapshot's record: run_id, snapshot_id, ...) if there is none yet."""
        data = json.dumps({**record, "table_uuid": table_uuid}, sort_keys=True, indent=1, default=str).encode()
        try:
            self.storage.write_atomic(self.uri_of(record["run_id"]), lambda f: f.write(data), if_absent=True)
        except FileExistsError:
            pass  # written before: after this run's commit, or by a later commit that found it missing

    def read(self, run_ids: set[str]) -> dict[str, dict]:
        """The copies of `run_ids` (each with its `table_uuid`), fetched together where not read before."""
        wanted = sorted(r for r in run_ids if r not in self._read)
        for run_id, data in zip(wanted, self.storage.read_many([self.uri_of(r) for r in wanted])):
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, Exception):
                raise OSError(f"cannot read {self.uri_of(run_id)}: {data}")
            self._read[run_id] = json.loads(data)
        return {r: self._read[r] for r in run_ids if r in self._read}

    def get(self, run_id: str) -> dict | None:
        return self.read({run_id}).get(run_id)
