"""What a Delta output's log says: the committed runs' records (`DeltaHistory`) and the data files
(`DeltaFiles`). The log is the one source of truth for what is done: see `pipeline/output/delta/__init__.py`."""

from __future__ import annotations

import json
from typing import Iterable
from urllib.parse import unquote

import pyarrow as pa

from pipeline.io.storage import absolute, join
from pipeline.output.delta.table import DeltaLocation
from pipeline.output.formats import RECORD_KEY, RUN_ID_KEY

# Operations of other tools that replace a table's rows: the runs before them are no longer live.
_REPLACING_OPERATIONS = {"CREATE OR REPLACE TABLE", "REPLACE TABLE", "CREATE OR REPLACE TABLE AS SELECT",
                         "REPLACE TABLE AS SELECT", "TRUNCATE"}


class DeltaFiles:
    """The table's data files: those of its current version, and those one commit added."""

    def __init__(self, location: DeltaLocation):
        self.location = location

    def current(self, run_ids: set[str] | None = None) -> list[str]:
        """Absolute URIs of the current version's data files; with `run_ids`, those that may hold those runs'
        rows, told by each file's run_id min/max statistics in the log (no extra reads): a file one run wrote
        has min = max = its run_id, a file another engine compacted spans several and is kept."""
        table = self.location.table()
        if table is None:
            return []
        if run_ids is None:
            return [absolute(uri) for uri in table.file_uris()]
        actions = pa.table(table.get_add_actions(flatten=True))
        paths = actions["path"].to_pylist()
        if "min.run_id" in actions.column_names and "max.run_id" in actions.column_names:
            ranges = zip(actions["min.run_id"].to_pylist(), actions["max.run_id"].to_pylist())
            paths = [path for path, (low, high) in zip(paths, ranges) if low is None or high is None or any(
                low <= r and (r <= high or r.startswith(high)) for r in run_ids)]  # a max may be truncated
        return [join(self.location.uri, unquote(path)) for path in paths]

    def added(self, version: int) -> list[dict]:
        """[{path (relative to uri), rows}] of what one commit added: one read of its JSON in _delta_log."""
        entry = join(self.location.uri, f"_delta_log/{version:020d}.json")
        try:
            data = self.location.storage.read_bytes(entry)
        except Exception:  # gone (log cleanup) or unreadable: the files are a nicety of the summary
            return []
        files = []
        for line in data.decode().splitlines():
            add = json.loads(line).get("add") if line.strip() else None
            if add:
                stats = json.loads(add["stats"]) if add.get("stats") else {}
                files.append({"path": unquote(add["path"]), "rows": stats.get("numRecords")})
        return files


class DeltaHistory:
    """The committed runs' records, read from each version's commitInfo; keeps what it read, so later calls read
    only the versions added since."""

    def __init__(self, location: DeltaLocation, files: DeltaFiles):
        self.location = location
        self.files = files
        self._history: dict[int, dict] = {}  # version -> the parts of its commitInfo we use

    def committed(self) -> list[dict]:
        table = self.location.table()
        if table is None:
            return []
        return [record for entry in self._log(table) if (record := _record(entry)) is not None]

    def live(self) -> list[dict]:
        """Runs since the last overwrite, ours or another tool's (a foreign overwrite leaves no run live)."""
        table = self.location.table()
        if table is None:
            return []
        runs: list[dict] = []
        for entry in self._log(table):
            record = _record(entry)
            if record is None:
                if _replaces_all(entry):
                    runs = []
                continue
            runs = [record] if record.get("mode") == "overwrite" else runs + [record]
        return runs

    def committed_record(self, table, run_id: str) -> dict:
        """A committed run's record, with its version and the files its commit added."""
        def find(entries: Iterable[dict]) -> dict | None:
            for entry in entries:
                if entry.get(RUN_ID_KEY) == run_id and (record := _record(entry)) is not None:
                    return {**record, "files": self.files.added(entry["version"])}
            return None

        found = None
        if not self._history:  # a fresh DeltaFormat: the run is most likely one of the last few versions
            found = find({"version": e["version"], RECORD_KEY: e.get(RECORD_KEY), RUN_ID_KEY: e.get(RUN_ID_KEY)}
                         for e in table.history(8) if "version" in e)
        found = found or find(reversed(self._log(table)))
        # Committed (its app transaction is in the table), but its commit JSON is gone (log cleanup).
        return found or {"run_id": run_id, "version": None, "files": []}

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


def _record(entry: dict) -> dict | None:
    raw = entry.get(RECORD_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError):
        return None
    return {**record, "version": entry["version"]}


def _replaces_all(entry: dict) -> bool:
    """Whether a commit another tool made replaced every row of the table."""
    if entry["operation"] in _REPLACING_OPERATIONS:
        return True
    params = entry["parameters"]
    return (entry["operation"] == "WRITE" and str(params.get("mode", "")).lower() == "overwrite"
            and not params.get("predicate"))
