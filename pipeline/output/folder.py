"""The plain Parquet folder (output.format: parquet): part files, each whole, and `_commits/<run_id>.json`, the
strict reader's list of a run's files. A run's files appear over its publish window, not at one instant
(publish.py); readers that need a run at once use delta or iceberg. Layout, promises and the protocol:
docs/commit-protocol.md."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

import pipeline.output.failpoints as failpoints
from pipeline.io.storage import Storage, join
from pipeline.output.formats import Commit, OutputFormat
from pipeline.output.hive import split_by_partition
from pipeline.output.publish import COMMITS, PUBLISH, Publication, is_open
from pipeline.output.rows import FolderRows
from pipeline.output.staging import FORMAT, STAGING, read_record
from pipeline.job.errors import UserError
from pipeline.job.rows import OUTPUT_SCHEMA

# part-<run_id>-<n>.parquet (before parts were named per attempt) or part-<run_id>-<attempt>-<n>.parquet
_PART_RE = re.compile(r"(?:^|/)part-(?P<run_id>\d{8}T\d{6}Z-[0-9a-f]{8})-(?:[0-9a-f]{8}-)?\d+\.parquet$")


@dataclass
class FolderListing:
    commits: dict[str, dict] = field(default_factory=dict)  # committed runs' records, by run id
    claims: dict[str, dict] = field(default_factory=dict)  # open markers (publish.py) of runs not committed
    parquet: list[str] = field(default_factory=list)  # every *.parquet file
    staged: set[str] = field(default_factory=set)  # run ids with something under _staging/
    announced: set[str] = field(default_factory=set)  # run ids with announced parts (_staging/<run>/publish/)

    def fenced(self, root: str) -> set[str]:
        """URIs of every retired part: empty, and kept for good (a late request would land there otherwise)."""
        return {join(root, p) for r in [*self.commits.values(), *self.claims.values()] for p in r.get("fenced", [])}

    def parts_of(self, run_id: str) -> list[str]:
        return [uri for uri in self.parquet if (m := _PART_RE.search(uri)) and m["run_id"] == run_id]


def list_folder(storage: Storage, root: str) -> FolderListing:
    listing = FolderListing()
    prefix = root.rstrip("/") + "/"
    for page in storage.list_pages(root):
        for obj in page:
            rel = obj.uri.removeprefix(prefix)
            if rel.startswith(COMMITS + "/") and rel.endswith(".json"):
                record = read_record(storage, obj.uri, ("run_id",))
                if is_open(record):
                    listing.claims[record["run_id"]] = record
                elif "committed_at" in record and "files" in record:
                    listing.commits[record["run_id"]] = record
                else:
                    read_record(storage, obj.uri, ("run_id", "committed_at", "files"))  # raises, saying what is wrong
            elif rel.startswith(STAGING + "/"):
                parts = rel.split("/")
                listing.staged.add(parts[1])
                if len(parts) == 4 and parts[2] == PUBLISH:
                    listing.announced.add(parts[1])
            elif rel.endswith(".parquet"):
                listing.parquet.append(obj.uri)
    for run_id in listing.commits:
        listing.claims.pop(run_id, None)
    return listing


class ParquetFolder(OutputFormat):
    name = "parquet"

    def __init__(self, storage: Storage, uri: str, schema: pa.Schema | None = None):
        super().__init__(storage, uri)
        self.schema = schema or OUTPUT_SCHEMA  # of the rows: an empty part (a retired one) has its columns
        self._scanned: FolderListing | None = None

    # --- reading the folder ----------------------------------------------------------------------------
    def scan(self) -> FolderListing:
        """Commit records, claims, every *.parquet file and the runs with a staging folder, listed once."""
        if self._scanned is None:
            self._scanned = list_folder(self.storage, self.uri)
        return self._scanned

    def committed(self) -> list[dict]:
        return sorted(self.scan().commits.values(), key=lambda c: c["committed_at"])

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
        return [uri for uri in self.scan().parquet if _PART_RE.search(uri)]

    def check_existing(self, overwrite: bool) -> None:
        listing = self.scan()
        foreign = [uri for uri in listing.parquet if _PART_RE.search(uri) is None]
        if foreign:
            raise UserError(f"output.uri: {self.uri} holds {len(foreign)} Parquet file(s) this pipeline did not "
                            f"write (e.g. {foreign[0]}); readers of the folder would mix them in. Choose another "
                            "output folder, or move them")
        known = set(listing.commits) | set(listing.claims) | listing.staged
        unrecorded = [uri for uri in listing.parquet if (m := _PART_RE.search(uri)) and m["run_id"] not in known]
        if unrecorded and not overwrite:
            raise UserError(f"output.uri: {self.uri} already holds {len(unrecorded)} Parquet file(s) without a "
                            f"commit record (e.g. {unrecorded[0]}); choose a new output folder or pass --overwrite "
                            "to replace them")

    def recover(self, staged_run_ids: set[str]) -> None:
        """Retire the parts of runs that did not commit (a killed or stale publish) and delete those of runs that
        were superseded (a killed overwrite), so that the visible rows are exactly those of live committed runs."""
        listing = self.scan()
        live, fenced = {c["run_id"] for c in self.live()}, listing.fenced(self.uri)
        superseded = [uri for uri in self.ours() if (m := _PART_RE.search(uri)) and m["run_id"] in listing.commits
                      and m["run_id"] not in live and uri not in fenced]
        unfinished = {m["run_id"] for uri in self.ours() if (m := _PART_RE.search(uri))
                      and (m["run_id"] in staged_run_ids or m["run_id"] in listing.claims)} | listing.announced
        for run_id in sorted(unfinished - set(listing.commits)):
            Publication(self.storage, self.uri, run_id, self.schema, fence=lambda: None).abort(
                [uri for uri in listing.parts_of(run_id) if uri not in fenced])
        for run_id in sorted(listing.announced & set(listing.commits)):  # killed after its record was written
            Publication(self.storage, self.uri, run_id, self.schema, fence=lambda: None).drop_intents()
        if superseded:
            self.storage.delete(superseded)
        self._scanned = None

    # --- committing ------------------------------------------------------------------------------------
    def commit(self, commit: Commit) -> dict:
        """Claim the run, retire its earlier attempts' parts, compact its chunks into new parts, write its commit
        record over the claim, delete what an overwrite replaces (publish.py)."""
        existing = self.scan().commits.get(commit.run_id)
        if existing is not None:
            return existing
        publication = Publication(self.storage, self.uri, commit.run_id, commit.schema, commit.fence)
        existing = publication.claim()
        if existing is not None:  # an earlier attempt's record landed after we listed the folder
            return existing
        publication.retire_others(self.scan().parts_of(commit.run_id))
        files = self._write_parts(commit, publication)
        replaced = [c["run_id"] for c in self.live()] if commit.overwrite else []
        record = publication.commit({"format": FORMAT, **commit.record, "files": files, "supersedes": replaced})
        failpoints.hit("record_written")
        if commit.overwrite:
            keep = {join(self.uri, f["path"]) for f in files} | self.scan().fenced(self.uri) | {
                join(self.uri, p) for p in record["fenced"]}
            commit.fence()
            self.storage.delete([uri for uri in self.ours() if uri not in keep])
        publication.drop_intents()
        self._scanned = None
        return record

    def _write_parts(self, commit: Commit, publication: Publication) -> list[dict]:
        """The staged rows, in order, as parts of `rows_per_file` rows in their partition folders."""
        layout = commit.partitioning
        date_folder = f"run_date={layout.run_date}" if layout.run_date else None
        pending: dict[str | None, list[pa.Table]] = {}  # by partition folder
        files: list[dict] = []

        def write_part(folder: str | None, table: pa.Table) -> None:
            path = publication.part_path(len(files), folder)
            publication.put_part(path, table)
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
        return files
