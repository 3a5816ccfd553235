"""Publishing a run into a Parquet folder so that no request of a stale attempt can change it afterwards: parts
announced, then created only if absent under names unique to the attempt; the record key changed only by
compare-and-swap; other attempts' parts retired (emptied, listed under `fenced`) after the claim.
docs/commit-protocol.md ("A request that arrives late") says why these three rules are enough."""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.storage import Storage, join, read_versioned, stat
from pipeline.output.staging import FORMAT, STAGING
from pipeline.job.errors import JobFailed

COMMITS = "_commits"
PUBLISH = "publish"  # under _staging/<run_id>/: the parts each attempt announced
CAS_ATTEMPTS = 5  # a key that keeps changing under us means another driver is at work: stop, bounded


def is_open(record: dict) -> bool:
    """A claim on a run's record key (an attempt publishing, or one that recovery stopped): not a commit."""
    return "open" in record


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


class Publication:
    """One attempt at publishing run `run_id` into the folder `root`: `claim`, `retire_others`, `put_part` for
    each part, `commit` (or `abort`, for a run that will not be finished by this attempt)."""

    def __init__(self, storage: Storage, root: str, run_id: str, schema: pa.Schema, fence: Callable[[], None]):
        self.storage, self.root, self.run_id = storage, root, run_id
        self.schema = schema
        self.fence = fence
        self.attempt = uuid.uuid4().hex[:8]
        self.fenced: list[str] = []  # paths (relative to root) retired by this attempt or earlier ones
        self._claim: str | None = None  # the ETag of our claim
        self._announced = 0

    @property
    def record_uri(self) -> str:
        return join(self.root, f"{COMMITS}/{self.run_id}.json")

    @property
    def intents_uri(self) -> str:
        return join(self.root, f"{STAGING}/{self.run_id}/{PUBLISH}")

    def part_path(self, seq: int, folder: str | None) -> str:
        """Relative to the folder, so commit records stay valid when the folder is moved or copied."""
        name = f"part-{self.run_id}-{self.attempt}-{seq:05d}.parquet"
        return f"{folder}/{name}" if folder else name

    # --- the record key, by compare-and-swap only ---------------------------------------------------------
    def claim(self) -> dict | None:
        """Take the run's record key for this attempt; returns the run's record instead if it is committed."""
        for _ in range(CAS_ATTEMPTS):
            current = read_versioned(self.storage, self.record_uri)
            record = json.loads(current[0]) if current else None
            if record is not None and not is_open(record):
                return record
            if record is not None and record["open"] == self.attempt:  # our own write landed, its reply was lost
                self._claim, self.fenced = current[1], list(record.get("fenced", []))
                return None
            self.fenced = list(record.get("fenced", [])) if record else []  # what earlier attempts retired stays listed
            marker = {"format": FORMAT, "run_id": self.run_id, "open": self.attempt, "fenced": self.fenced}
            try:
                self._claim = self._write_record(marker, current[1] if current else None)
                return None
            except FileExistsError:
                continue  # it changed between our read and our write: read again
        raise JobFailed(f"run {self.run_id}: its commit record kept changing while this driver claimed it; another "
                        "driver is publishing the run: this one stops (check that one run at a time writes the output)")

    def commit(self, record: dict) -> dict:
        """Write the run's record over our claim; from then on the run is committed, and no other attempt can."""
        record = {**record, "attempt": self.attempt, "fenced": sorted(self.fenced)}
        try:
            self._write_record(record, self._claim)
        except FileExistsError:
            current = read_versioned(self.storage, self.record_uri)
            landed = json.loads(current[0]) if current else {}
            if is_open(landed) or landed.get("attempt") != self.attempt:  # else: our own write, its reply lost
                raise JobFailed(f"run {self.run_id}: another driver took this run's commit over meanwhile; this one "
                                "stops (check that one run at a time writes the output)") from None
        return record

    def abort(self, visible: list[str]) -> None:
        """Stop the run's earlier attempts for good (recovery, before a new run starts): claim the record key,
        retire their parts, keep the marker with the list of what was retired."""
        if self.claim() is not None:
            return
        self.retire_others(visible)
        marker = {"format": FORMAT, "run_id": self.run_id, "open": self.attempt, "fenced": sorted(self.fenced)}
        self._claim = self._write_record(marker, self._claim)
        self.drop_intents()

    def _write_record(self, record: dict, if_match: str | None) -> str:
        data = json.dumps(record, indent=2).encode()
        self.fence()
        return self.storage.write_atomic(self.record_uri, lambda f: f.write(data), if_absent=if_match is None,
                                         if_match=if_match)

    # --- parts -----------------------------------------------------------------------------------------------
    def put_part(self, path: str, table: pa.Table) -> None:
        """Announce the part, check the lease, create it only if absent."""
        data = parquet_bytes(table)
        self.fence()
        self._announce(path)
        self.fence()  # after the announcement landed: whoever retires this attempt's parts will see this one
        uri = join(self.root, path)
        try:
            self.storage.write_atomic(uri, lambda f: f.write(data), if_absent=True)
        except FileExistsError:
            if self.storage.read_bytes(uri) != data:  # not our own PUT retried after a lost reply: retired
                self.fence()
                raise JobFailed(f"run {self.run_id}: part {path} was retired by another driver; this one stops "
                                "without committing") from None

    def _announce(self, path: str) -> None:
        uri = join(self.intents_uri, f"{self.attempt}-{self._announced:05d}.json")
        self._announced += 1
        data = json.dumps({"path": path}).encode()
        try:
            self.storage.write_atomic(uri, lambda f: f.write(data), if_absent=True)
        except FileExistsError:
            pass  # our own, retried after its reply was lost: no one else writes this attempt's names

    def retire_others(self, visible: list[str]) -> None:
        """Replace every part the run's other attempts announced, and `visible` (URIs of the run's parts that are
        there now), by an empty part. Call after `claim`, holding the lease: every part another attempt ever sent was
        announced before its lease expired, so it is listed here."""
        prefix = self.root.rstrip("/") + "/"
        others = [obj.uri for page in self._intent_pages() for obj in page
                  if not posixpath.basename(obj.uri).startswith(self.attempt + "-")]
        paths = set(announced_paths(self.storage, others)) | {uri.removeprefix(prefix) for uri in visible}
        for path in sorted(paths - set(self.fenced)):
            retire(self.storage, join(self.root, path), empty_part(self.schema, path), self.fence)
            self.fenced.append(path)

    def _intent_pages(self):
        return self.storage.list_pages(self.intents_uri)  # nothing, where there is no such folder

    def drop_intents(self) -> None:
        self.storage.delete([obj.uri for page in self._intent_pages() for obj in page])


def announced_paths(storage: Storage, intents: list[str]) -> list[str]:
    """The part paths these announcements name."""
    paths = []
    for uri, data in zip(intents, storage.read_many(intents)):
        if isinstance(data, Exception):
            raise OSError(f"cannot read {uri}: {data}")
        paths.append(json.loads(data)["path"])
    return paths


def retire(storage: Storage, uri: str, empty: bytes, fence: Callable[[], None]) -> None:
    """Put `empty` at `uri` in place of whatever is there or nothing, so that a late create-only PUT is refused."""
    for _ in range(CAS_ATTEMPTS):
        found = stat(storage, uri)
        fence()
        try:
            storage.write_atomic(uri, lambda f: f.write(empty), if_absent=found is None,
                                 if_match=found[0] if found else None)
            return
        except FileExistsError:
            continue  # a late request landed between our look and our write: look again
    raise JobFailed(f"{uri} kept changing while this driver retired it; nothing was committed, and a rerun "
                    "resumes the run")


def empty_part(schema: pa.Schema, path: str) -> bytes:
    """A part with no rows and the columns a part at `path` has: a partition column lives in the folder name only."""
    in_folders = {part.split("=", 1)[0] for part in posixpath.dirname(path).split("/") if "=" in part}
    return parquet_bytes(pa.schema([f for f in schema if f.name not in in_folders]).empty_table())
