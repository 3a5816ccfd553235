"""The plain Parquet folder (output.format: parquet), and what it can honestly promise.

    <output>/
      [run_date=YYYY-MM-DD/ or <column>=<value>/]part-<run_id>-<n>.parquet   committed rows
      _commits/<run_id>.json                            one commit record per committed run: the strict
                                                        reader's list of a run's files

Each part file appears whole (a local rename, one S3 PUT); a run's files appear over its publish window,
not at one instant; a publish killed midway is completed or rolled back by the next run. A glob reader
(`read_parquet('out/**/*.parquet')`) may therefore see part of a run for that window, or until the next
run after a killed publish; a strict reader takes the file lists of `_commits/`. Readers that need a run to
appear at once use output.format delta or iceberg.

Publishing compacts the staged chunks, in order, into parts with deterministic names, then writes the
commit record (created only if absent), then deletes what an overwrite replaced. The lease is checked
before each of those writes, so a driver that lost it publishes nothing more.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline.output.failpoints as failpoints
from pipeline.io.storage import Storage, join
from pipeline.output.formats import Commit, OutputFormat
from pipeline.output.hive import split_by_partition
from pipeline.output.rows import FolderRows
from pipeline.output.staging import FORMAT, STAGING, read_record
from pipeline.spec.errors import JobFailed, UserError

COMMITS = "_commits"
_PART_RE = re.compile(r"(?:^|/)part-(?P<run_id>\d{8}T\d{6}Z-[0-9a-f]{8})-\d+\.parquet$")


class ParquetFolder(OutputFormat):
    name = "parquet"

    def __init__(self, storage: Storage, uri: str):
        super().__init__(storage, uri)
        self._scanned: tuple[dict[str, dict], list[str], set[str]] | None = None

    # --- reading the folder ----------------------------------------------------------------------------
    def scan(self) -> tuple[dict[str, dict], list[str], set[str]]:
        """(commit records by run id, every *.parquet file, run ids with a staging folder), listed once."""
        if self._scanned is None:
            commits: dict[str, dict] = {}
            parquet: list[str] = []
            staged: set[str] = set()
            prefix = self.uri.rstrip("/") + "/"
            for page in self.storage.list_pages(self.uri):
                for obj in page:
                    rel = obj.uri.removeprefix(prefix)
                    if rel.startswith(COMMITS + "/") and rel.endswith(".json"):
                        record = read_record(self.storage, obj.uri, ("run_id", "committed_at", "files"))
                        commits[record["run_id"]] = record
                    elif rel.startswith(STAGING + "/"):
                        staged.add(rel.split("/")[1])
                    elif rel.endswith(".parquet"):
                        parquet.append(obj.uri)
            self._scanned = commits, parquet, staged
        return self._scanned

    def committed(self) -> list[dict]:
        return sorted(self.scan()[0].values(), key=lambda c: c["committed_at"])

    def live(self) -> list[dict]:
        superseded = {r for record in self.committed() for r in record.get("supersedes", [])}
        return [c for c in self.committed() if c["run_id"] not in superseded]

    def data_files(self, run_ids: set[str] | None = None) -> list[str]:
        return [join(self.uri, f["path"]) for c in self.live() if run_ids is None or c["run_id"] in run_ids
                for f in c["files"]]

    def rows(self, run_ids: list[str] | None = None) -> FolderRows:
        """The committed files of the live runs (of `run_ids`), read with hive partitioning."""
        return FolderRows(self.uri, tuple(self.data_files(None if run_ids is None else set(run_ids))))

    def ours(self) -> list[str]:
        return [uri for uri in self.scan()[1] if _PART_RE.search(uri)]

    def check_existing(self, overwrite: bool) -> None:
        commits, parquet, staged = self.scan()
        foreign = [uri for uri in parquet if _PART_RE.search(uri) is None]
        if foreign:
            raise UserError(f"output.uri: {self.uri} holds {len(foreign)} Parquet file(s) this pipeline did not "
                            f"write (e.g. {foreign[0]}); readers of the folder would mix them in. Choose another "
                            "output folder, or move them")
        known = set(commits) | staged
        unrecorded = [uri for uri in parquet if (m := _PART_RE.search(uri)) and m["run_id"] not in known]
        if unrecorded and not overwrite:
            raise UserError(f"output.uri: {self.uri} already holds {len(unrecorded)} Parquet file(s) without a "
                            f"commit record (e.g. {unrecorded[0]}); choose a new output folder or pass --overwrite "
                            "to replace them")

    def recover(self, staged_run_ids: set[str]) -> None:
        """Delete parts of runs that did not commit (a killed publish) or were superseded (a killed overwrite),
        so that the visible files are exactly those of live committed runs."""
        commits, parquet, _ = self.scan()
        live = {c["run_id"] for c in self.live()}
        stale = [uri for uri in parquet if (m := _PART_RE.search(uri)) and m["run_id"] not in live
                 and (m["run_id"] in commits or m["run_id"] in staged_run_ids)]
        if stale:
            self.storage.delete(stale)
            self._scanned = None

    # --- committing ------------------------------------------------------------------------------------
    def part_path(self, run_id: str, seq: int, partition: str | None) -> str:
        """Relative to the output folder, so commit records stay valid when the folder is moved or copied."""
        return f"{partition}/part-{run_id}-{seq:05d}.parquet" if partition else f"part-{run_id}-{seq:05d}.parquet"

    def commit_uri(self, run_id: str) -> str:
        return join(self.uri, f"{COMMITS}/{run_id}.json")

    def commit(self, commit: Commit) -> dict:
        """Compact the run's chunks into parts, write its commit record, delete what an overwrite replaces.
        Redone after a kill, it rewrites the same part names: it overwrites, never duplicates."""
        existing = self.scan()[0].get(commit.run_id)
        if existing is not None:
            return existing
        run_id, layout = commit.run_id, commit.partitioning
        date_folder = f"run_date={layout.run_date}" if layout.run_date else None
        pending: dict[str | None, list[pa.Table]] = {}  # by partition folder
        files: list[dict] = []

        def write_part(folder: str | None, table: pa.Table) -> None:
            path = self.part_path(run_id, len(files), folder)
            commit.fence()
            self.storage.write_atomic(join(self.uri, path), lambda f: pq.write_table(table, f, compression="zstd"))
            files.append({"path": path, "rows": table.num_rows})
            failpoints.hit("part_written")

        for table in commit.rows():
            for folder, rows in split_by_partition(table, date_folder, layout.column):
                buffered = pa.concat_tables(pending.get(folder, []) + [rows])
                while buffered.num_rows >= commit.rows_per_file:
                    write_part(folder, buffered.slice(0, commit.rows_per_file))
                    buffered = buffered.slice(commit.rows_per_file)
                pending[folder] = [buffered] if buffered.num_rows else []
        for folder, tables in pending.items():
            if tables:
                write_part(folder, pa.concat_tables(tables))

        replaced = [c["run_id"] for c in self.live()] if commit.overwrite else []
        record = {"format": FORMAT, **commit.record, "files": files, "supersedes": replaced}
        commit.fence()
        try:
            self.storage.write_atomic(self.commit_uri(run_id), lambda f: f.write(json.dumps(record, indent=2).encode()),
                                      if_absent=True)
        except FileExistsError:
            raise JobFailed(f"run {run_id}: another driver committed this run meanwhile; this one stops (check that "
                            "one run at a time writes the output)") from None
        failpoints.hit("record_written")
        if commit.overwrite:
            mine = {join(self.uri, f["path"]) for f in files}
            commit.fence()
            self.storage.delete([uri for uri in self.ours() if uri not in mine])
        self._scanned = None
        return record
