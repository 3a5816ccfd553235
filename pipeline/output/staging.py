"""A run in progress: `<output>/_staging/<run_id>/`, the same for every output format: `_run.json` (the run: its job
key, model key, start, attempts) and `chunk-<n>.parquet.staged` (its rows so far, a few batches per chunk). A chunk
is written whole or not at all and created only if absent (a conditional put); the set of chunks *is* the resume
checkpoint. Why: docs/commit-protocol.md#a-run-step-by-step (step 6)."""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.storage import Storage, is_remote, join
from pipeline.output.history import KEY_DTYPE, table_keys
from pipeline.job.errors import UserError
from pipeline.job.rows import RowCounts

FORMAT = 1  # of _run.json and commit records; a newer one is refused rather than misread
STAGING = "_staging"
RUN_FILE = "_run.json"
CHUNK_SUFFIX = ".parquet.staged"
CHUNK_FETCH = 32


@dataclass
class RunInfo:
    """What `_run.json` holds: who the run is and when it was attempted."""
    run_id: str
    job_key: str  # the job it belongs to (runs.job_key): only the same job resumes it
    model_key: str  # which earlier rows count as done (runs.model_key)
    started_at: str
    input: str
    model: str
    weights: str
    pseudonyms: str | None = None  # privacy: the key's id
    attempts: list[str] = field(default_factory=list)
    # One per attempt a later one resumed: its started_at, rows it left staged, elapsed_s to its last chunk.
    interrupted_attempts: list[dict] = field(default_factory=list)
    # What its job lists and skips, for `pipeline runs` to count what a resume has left: {"extensions": [...] or
    # None for every object, "skips_done": earlier runs of its model count as done}; None in older _run.json.
    listing: dict | None = None
    model_config: dict | None = None  # the job's model section, for `pipeline search` to encode text with

    @classmethod
    def from_json(cls, data: dict) -> "RunInfo":
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__ if name in data})


@dataclass
class StagedRun:
    run_id: str
    info: RunInfo | None = None  # None: a staging folder without its _run.json (killed before writing it)
    chunks: list[str] = field(default_factory=list)  # in write order
    resumed_rows: int = 0  # rows and inputs an interrupted attempt staged, counted when this attempt starts
    resumed_inputs: int = 0

    def next_chunk(self) -> int:
        return chunk_number(self.chunks[-1]) + 1 if self.chunks else 0


def chunk_number(uri: str) -> int:
    return int(posixpath.basename(uri).removeprefix("chunk-").removesuffix(CHUNK_SUFFIX))


class Staging:
    """The `_staging/` area of an output: runs in progress, their chunks, and reading them back."""

    def __init__(self, storage: Storage, output_uri: str):
        self.storage = storage
        self.uri = join(output_uri, STAGING)

    def folder(self, run_id: str) -> str:
        return join(self.uri, run_id)

    def chunk_uri(self, run_id: str, seq: int) -> str:
        return join(self.folder(run_id), f"chunk-{seq:09d}{CHUNK_SUFFIX}")

    def scan(self) -> dict[str, StagedRun]:
        runs: dict[str, StagedRun] = {}
        if not is_remote(self.uri) and not os.path.isdir(self.uri):
            return runs
        prefix = self.uri.rstrip("/") + "/"
        for page in self.storage.list_pages(self.uri):
            for obj in page:
                parts = obj.uri.removeprefix(prefix).split("/")
                if len(parts) != 2:
                    continue
                run = runs.setdefault(parts[0], StagedRun(parts[0]))
                if parts[1] == RUN_FILE:
                    run.info = RunInfo.from_json(read_record(self.storage, obj.uri, ("job_key", "attempts")))
                elif parts[1].endswith(CHUNK_SUFFIX):
                    run.chunks.append(obj.uri)
        for run in runs.values():
            run.chunks.sort(key=chunk_number)
        return runs

    def begin(self, run: StagedRun) -> None:
        data = {"format": FORMAT, **run.info.__dict__}
        self.storage.write_bytes(join(self.folder(run.run_id), RUN_FILE), json.dumps(data, indent=2).encode())

    def write_chunk(self, run_id: str, seq: int, table: pa.Table) -> str:
        uri = self.chunk_uri(run_id, seq)
        self.storage.write_atomic(uri, lambda f: pq.write_table(table, f, compression="zstd"), if_absent=True)
        return uri

    def read_chunks(self, uris: list[str], columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Chunks in order, fetched CHUNK_FETCH at a time concurrently (a long run has thousands)."""
        for start in range(0, len(uris), CHUNK_FETCH):
            batch = uris[start:start + CHUNK_FETCH]
            for uri, data in zip(batch, self.storage.read_many(batch)):
                if isinstance(data, Exception):
                    raise OSError(f"cannot read staged chunk {uri}: {data}")
                yield pq.read_table(pa.BufferReader(data), columns=columns)

    def unstage_failed_inputs(self, run: StagedRun) -> int:
        """Drop from the run's chunks the inputs whose rows are all errors, so that resuming retries them: the
        inputs of a run stopped at errors.max_error_rate, and reads that failed for a while. Each chunk is
        rewritten whole under its own name (an atomic replace), so a kill midway leaves every chunk valid and
        the next resume finishes the job. Returns how many inputs were dropped."""
        dropped = 0
        for uri, table in zip(run.chunks, self.read_chunks(run.chunks)):
            failed = failed_inputs(table)
            if failed:
                kept = table.filter(pc.invert(pc.is_in(table["uri"], pa.array(sorted(failed), pa.string()))))
                self.storage.write_atomic(uri, lambda f: pq.write_table(kept, f, compression="zstd"))
                dropped += len(failed)
        return dropped

    def count(self, run: StagedRun) -> RunStats:
        """What the run has staged so far; sets its resumed rows and inputs (a DICOM file stages a row per frame)."""
        stats, uris = RunStats(), set()
        for table in self.read_chunks(run.chunks, columns=RunStats.COLUMNS):
            stats.add(table)
            uris.update(table["uri"].to_pylist())
        run.resumed_rows, run.resumed_inputs = stats.rows, len(uris)
        return stats

    def drop(self, run: StagedRun) -> None:
        self.storage.delete(run.chunks + [join(self.folder(run.run_id), RUN_FILE)])
        self.storage.remove_folder(self.folder(run.run_id))


class RunStats(RowCounts):
    """Counts and an order-independent fingerprint (XOR of version keys) of a run's rows."""
    COLUMNS = ["uri", "etag", "last_modified", "size", "error_type"]

    def __init__(self):
        super().__init__()
        self._xor = np.zeros(2, dtype=np.uint64)

    def add(self, table: pa.Table) -> int:
        errors = super().add(table)
        keys = table_keys(table, "version").astype(KEY_DTYPE)
        if len(keys):
            self._xor ^= np.bitwise_xor.reduce(np.frombuffer(keys.tobytes(), dtype=np.uint64).reshape(-1, 2))
        return errors

    def as_record(self) -> dict:
        return {"rows": self.rows, "predicted": self.rows - self.errors, "errors": self.errors,
                "errors_by_type": dict(self.errors_by_type.most_common()),
                "input_fingerprint": f"{self.rows}:{self._xor.tobytes().hex()}"}


def failed_inputs(table: pa.Table) -> set[str]:
    """Inputs of a chunk with no row but errors (a DICOM file whose other frames decoded is not one of them)."""
    failed = set(table.filter(table["error"].is_valid())["uri"].to_pylist())
    return failed - set(table.filter(table["error"].is_null())["uri"].to_pylist()) if failed else failed


def read_record(storage: Storage, uri: str, required: tuple[str, ...]) -> dict:
    """A JSON record of this pipeline (a commit record, a _run.json), or one line saying what is wrong."""
    try:
        data = json.loads(storage.read_bytes(uri))
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise UserError(f"output.uri: {uri} is not a valid record of this pipeline; restore it, or move it "
                        "away if you know that run's files are gone too")
    if data.get("format", FORMAT) > FORMAT:
        raise UserError(f"output.uri: {uri} was written by a newer version of this pipeline (format "
                        f"{data['format']}); upgrade to run jobs on this output")
    return data


def now_precise() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
