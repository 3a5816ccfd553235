"""The output folder and its commit protocol (docs/commit-protocol.md tells it for users).

    <output>/
      [run_date=YYYY-MM-DD/ or <column>=<value>/]part-<run_id>-<n>.parquet   committed rows: what readers see
      _commits/<run_id>.json                            one commit record per committed run
      _staging/<run_id>/_run.json                       a run in progress: its job, start, attempts
      _staging/<run_id>/chunk-<n>.parquet.staged        its rows so far, a few batches per chunk
      _lock or _lock.json                               the lease of the run in progress (lease.py)
      _summary.json                                     the last run's summary

Readers (`**/*.parquet` globs in DuckDB, pyarrow datasets, Spark) skip `_` folders or do not match
`.staged`, so they never see a run in progress. A chunk is the unit of durable progress: it is written
whole or not at all, and the set of chunks *is* the resume checkpoint, so there is no window between
"written" and "checkpointed" in which a crash could duplicate rows.

Publishing a run compacts its chunks, in order, into parts with deterministic names, then writes the commit
record, then drops the staging folder. A crash anywhere in that sequence is rolled forward by the next run:
parts are rewritten under the same names (overwriting, never duplicating) and the invariant "the visible
Parquet files are exactly those of live committed runs" is restored before any new work starts.
"""

from __future__ import annotations

import json
import posixpath
import re
from urllib.parse import quote
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import failpoints
from pipeline.errors import JobFailed, UserError
from pipeline.history import KEY_DTYPE, table_keys
from pipeline.storage import Storage, join

FORMAT = 1  # of commit records and _run.json; a newer one is refused rather than misread

STAGING = "_staging"
COMMITS = "_commits"
RUN_FILE = "_run.json"
CHUNK_SUFFIX = ".parquet.staged"
CHUNK_FETCH = 32
_PART_RE = re.compile(r"(?:^|/)part-(?P<run_id>\d{8}T\d{6}Z-[0-9a-f]{8})-\d+\.parquet$")


@dataclass
class StagedRun:
    run_id: str
    info: dict  # the _run.json
    chunks: list[str] = field(default_factory=list)  # in write order

    def next_chunk(self) -> int:
        return chunk_number(self.chunks[-1]) + 1 if self.chunks else 0


def chunk_number(uri: str) -> int:
    return int(posixpath.basename(uri).removeprefix("chunk-").removesuffix(CHUNK_SUFFIX))


@dataclass
class FolderState:
    commits: dict[str, dict]  # run_id -> commit record
    staged: dict[str, StagedRun]  # run_id -> run in progress (or interrupted)
    parquet: list[str]  # every *.parquet file under the output

    @property
    def live(self) -> list[dict]:
        """Committed runs not replaced by a later overwrite, oldest first."""
        superseded = {r for record in self.commits.values() for r in record.get("supersedes", [])}
        return sorted((c for c in self.commits.values() if c["run_id"] not in superseded),
                      key=lambda c: c["committed_at"])

    def foreign(self) -> list[str]:
        """Parquet files this pipeline did not write: never mixed with, never deleted."""
        return [uri for uri in self.parquet if _PART_RE.search(uri) is None]

    def unrecorded(self) -> list[str]:
        """Our part files without a commit record or staging (output of a version before commit records)."""
        known = set(self.commits) | set(self.staged)
        return [uri for uri in self.parquet if (m := _PART_RE.search(uri)) and m["run_id"] not in known]

    def ours(self) -> list[str]:
        return [uri for uri in self.parquet if _PART_RE.search(uri)]

    def interrupted(self, job_key: str) -> tuple[StagedRun | None, list[StagedRun]]:
        """(the attempt of this job to resume, stale attempts of it to drop).

        An interrupted attempt is resumed only while nothing has committed since it last ran: otherwise its
        staged rows may already be in a later commit, and publishing them would duplicate them.
        """
        runs = sorted((r for r in self.staged.values()
                       if r.run_id not in self.commits and r.info.get("job_key") == job_key), key=lambda r: r.run_id)
        last_commit = max((c["committed_at"] for c in self.commits.values()), default="")
        fresh = [r for r in runs if (r.info.get("attempts") or [""])[-1] > last_commit]
        resume = fresh[-1] if fresh else None
        return resume, [r for r in runs if r is not resume]


class OutputFolder:
    def __init__(self, storage: Storage, uri: str):
        self.storage = storage
        self.uri = uri

    # --- names -----------------------------------------------------------------------------------------
    def staging(self, run_id: str) -> str:
        return join(self.uri, f"{STAGING}/{run_id}")

    def chunk_uri(self, run_id: str, seq: int) -> str:
        return join(self.staging(run_id), f"chunk-{seq:09d}{CHUNK_SUFFIX}")

    def commit_uri(self, run_id: str) -> str:
        return join(self.uri, f"{COMMITS}/{run_id}.json")

    def part_path(self, run_id: str, seq: int, partition: str | None) -> str:
        """Relative to the output folder, so commit records stay valid when the folder is moved or copied."""
        return f"{partition}/part-{run_id}-{seq:05d}.parquet" if partition else f"part-{run_id}-{seq:05d}.parquet"

    def files(self, record: dict) -> list[str]:
        return [join(self.uri, f["path"]) for f in record["files"]]

    # --- reading the folder ----------------------------------------------------------------------------
    def scan(self) -> FolderState:
        commits: dict[str, dict] = {}
        staged: dict[str, StagedRun] = {}
        parquet: list[str] = []
        prefix = self.uri.rstrip("/") + "/"
        for page in self.storage.list_pages(self.uri):
            for obj in page:
                rel = obj.uri.removeprefix(prefix)
                if rel.startswith(COMMITS + "/") and rel.endswith(".json"):
                    record = self._read_json(obj.uri, required=("run_id", "committed_at", "files"))
                    commits[record["run_id"]] = record
                elif rel.startswith(STAGING + "/"):
                    parts = rel.split("/")
                    if len(parts) != 3:
                        continue
                    run = staged.setdefault(parts[1], StagedRun(parts[1], {}))
                    if parts[2] == RUN_FILE:
                        run.info = self._read_json(obj.uri, required=("job_key", "attempts"))
                    elif parts[2].endswith(CHUNK_SUFFIX):
                        run.chunks.append(obj.uri)
                elif rel.endswith(".parquet"):
                    parquet.append(obj.uri)
        for run in staged.values():
            run.chunks.sort(key=chunk_number)
        return FolderState(commits, staged, parquet)

    def _read_json(self, uri: str, required: tuple[str, ...]) -> dict:
        try:
            data = json.loads(self.storage.read_bytes(uri))
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or any(k not in data for k in required):
            raise UserError(f"output.uri: {uri} is not a valid record of this pipeline; restore it, or move it "
                            "away if you know that run's files are gone too")
        if data.get("format", FORMAT) > FORMAT:
            raise UserError(f"output.uri: {uri} was written by a newer version of this pipeline (format "
                            f"{data['format']}); upgrade to run jobs on this output")
        return data

    # --- a run's life ----------------------------------------------------------------------------------
    def begin(self, run_id: str, info: dict) -> None:
        info = {"format": FORMAT, **info}
        self.storage.write_bytes(join(self.staging(run_id), RUN_FILE), json.dumps(info, indent=2).encode())

    def recover(self, state: FolderState) -> FolderState:
        """Finish what crashed runs left half done, so only live committed runs' files are visible."""
        live = {c["run_id"] for c in state.live}
        stale_parts = [uri for uri in state.parquet
                       if (m := _PART_RE.search(uri)) and m["run_id"] not in live
                       and (m["run_id"] in state.commits or m["run_id"] in state.staged)]
        self.storage.delete(stale_parts)
        for run in [r for r in state.staged.values() if r.run_id in state.commits]:
            self.drop_staging(run)
        return self.scan() if stale_parts or any(r in state.commits for r in state.staged) else state

    def publish(self, run: StagedRun, expected_rows: int, rows_per_file: int, partition: str | None,
                replaces: FolderState | None, summary: dict, partition_column: str | None = None) -> dict:
        """Compact the run's chunks into parts, write its commit record, drop its staging. Idempotent.

        With a `partition_column`, rows go to Hive-style folders by its value (`modality=CT/`), the column
        kept in the folder name only. Refuses to commit unless the chunks hold exactly the rows the driver
        staged (a chunk missing from the list would otherwise be dropped with the staging)."""
        stats = _Stats()
        pending: dict[str | None, list[pa.Table]] = {}  # by partition folder
        files: list[dict] = []

        def write_part(folder: str | None, table: pa.Table) -> None:
            path = self.part_path(run.run_id, len(files), folder)
            self.storage.write_atomic(join(self.uri, path), lambda f: pq.write_table(table, f, compression="zstd"))
            files.append({"path": path, "rows": table.num_rows})
            failpoints.hit("part_written")

        for table in self.read_chunks(run.chunks):
            stats.add(table)
            for folder, rows in split_by_partition(table, partition, partition_column):
                buffered = pa.concat_tables(pending.get(folder, []) + [rows])
                while buffered.num_rows >= rows_per_file:
                    write_part(folder, buffered.slice(0, rows_per_file))
                    buffered = buffered.slice(rows_per_file)
                pending[folder] = [buffered] if buffered.num_rows else []
        for folder, tables in pending.items():
            if tables:
                write_part(folder, pa.concat_tables(tables))

        if stats.rows != expected_rows:
            raise JobFailed(f"run {run.run_id}: its staged chunks hold {stats.rows:,} rows, but {expected_rows:,} were "
                            "staged; nothing was committed, and a rerun resumes the run")
        record = {
            "format": FORMAT,
            "run_id": run.run_id,
            "mode": "overwrite" if replaces is not None else "append",
            **summary,
            "rows": stats.rows,
            "predicted": stats.rows - stats.errors,
            "errors": stats.errors,
            "errors_by_type": dict(stats.errors_by_type.most_common()),
            "input_fingerprint": stats.fingerprint(),
            "started_at": run.info.get("started_at"),
            "attempts": run.info.get("attempts", []),
            "committed_at": _now_precise(),
            "files": files,
            "supersedes": [c["run_id"] for c in replaces.live] if replaces is not None else [],
        }
        self.storage.write_bytes(self.commit_uri(run.run_id), json.dumps(record, indent=2).encode())
        failpoints.hit("committed")
        if replaces is not None:
            mine = {join(self.uri, f["path"]) for f in files}
            self.storage.delete([uri for uri in replaces.ours() if uri not in mine])
        self.drop_staging(run)
        return record

    def read_chunks(self, uris: list[str]) -> Iterator[pa.Table]:
        """Chunks in order, fetched CHUNK_FETCH at a time concurrently (a long run has thousands)."""
        for start in range(0, len(uris), CHUNK_FETCH):
            for uri, data in zip(uris[start:start + CHUNK_FETCH], self.storage.read_many(uris[start:start + CHUNK_FETCH])):
                if isinstance(data, Exception):
                    raise OSError(f"cannot read staged chunk {uri}: {data}")
                yield pq.read_table(pa.BufferReader(data))

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

    def staged_rows(self, run: StagedRun) -> int:
        return self.staged_counts(run)[0]

    def staged_counts(self, run: StagedRun) -> tuple[int, int]:
        """(rows, inputs) the run has staged: a multi-frame DICOM file stages a row per frame."""
        rows, uris = 0, set()
        for table in self.read_chunks(run.chunks):
            rows += table.num_rows
            uris.update(table["uri"].to_pylist())
        return rows, len(uris)

    def drop_staging(self, run: StagedRun) -> None:
        self.storage.delete(run.chunks + [join(self.staging(run.run_id), RUN_FILE)])
        self.storage.remove_folder(self.staging(run.run_id))


def failed_inputs(table: pa.Table) -> set[str]:
    """Inputs of a chunk with no row but errors (a DICOM file whose other frames decoded is not one of them)."""
    failed = set(table.filter(table["error"].is_valid())["uri"].to_pylist())
    return failed - set(table.filter(table["error"].is_null())["uri"].to_pylist()) if failed else failed


class _Stats:
    """Counts and an order-independent fingerprint (XOR of version keys) of the rows published."""

    def __init__(self):
        self.rows = 0
        self.errors = 0
        self.errors_by_type: Counter[str] = Counter()
        self._xor = np.zeros(2, dtype=np.uint64)

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        types = table["error_type"].drop_null().to_pylist()
        self.errors += len(types)
        self.errors_by_type.update(types)
        keys = table_keys(table, "version").astype(KEY_DTYPE)
        if len(keys):
            self._xor ^= np.bitwise_xor.reduce(np.frombuffer(keys.tobytes(), dtype=np.uint64).reshape(-1, 2))

    def fingerprint(self) -> str:
        return f"{self.rows}:{self._xor.tobytes().hex()}"


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # Hive's, Spark's and Athena's folder name for a null value


def split_by_partition(table: pa.Table, folder: str | None, column: str | None) -> Iterator[tuple[str | None, pa.Table]]:
    """(partition folder, rows) pairs: the fixed folder (or none), or one per value of `column`, sorted."""
    if column is None:
        yield folder, table
        return
    values = table[column].to_pylist()
    rest = table.drop_columns([column])
    for value in sorted(set(values), key=lambda v: (v is None, v or "")):
        rows = np.flatnonzero([v == value for v in values])
        name = HIVE_NULL if value in (None, "") else quote(value, safe="")
        yield f"{column}={name}", rest.take(rows)


def _now_precise() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
