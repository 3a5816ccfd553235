"""A run's life on its output, behind one front door. The runner calls, in order:

    with open_output(cfg, storage, identity, schema, out) as output:   # lease, recover, start or resume
        output.history(pseudonymizer)    # what to skip: earlier runs' unchanged inputs, this run's staged rows
        output.sink(provenance, ...)     # where prediction rows go: staged chunks, the resume checkpoint
        output.commit(sink)              # one visible version, in the job's output.format
        output.write_summary(text)

Every format shares the lease (lease.py) and the staging area (staging.py); what differs is how a run's
rows become visible and where committed runs are recorded (formats.py: the folder, Delta, Iceberg).
docs/commit-protocol.md tells the protocol for users.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

import pyarrow as pa

import pipeline.output.failpoints as failpoints
from pipeline.io.storage import Storage, is_s3, join
from pipeline.output.formats import Commit, OutputFormat, Partitioning
from pipeline.output.history import History
from pipeline.output.lease import OutputLease, check_conditional_writes
from pipeline.output.privacy import Pseudonymizer
from pipeline.output.identity import (attempt_so_far, check_pseudonyms, interrupted, new_run_id, note_interrupted_attempt,
                                  partition_column)
from pipeline.output.sink import StagingSink
from pipeline.output.staging import FORMAT, STAGING, RunInfo, RunStats, StagedRun, Staging, now_precise
from pipeline.job.config import JobConfig
from pipeline.job.errors import JobFailed, UserError


@dataclass(frozen=True)
class RunIdentity:
    """What a run is, decided before it starts (runs.job_key / model_key)."""
    job_key: str
    model_key: str
    model: str
    weights: str
    pseudonyms: str | None = None  # the pseudonymisation key's id


def make_format(cfg: JobConfig, storage: Storage, schema: pa.Schema) -> OutputFormat:
    """The job's output.format; each lives in a module of its own, imported only when used."""
    out = cfg.output
    if out.format == "delta":
        from pipeline.output.delta import DeltaFormat

        return DeltaFormat(storage, out.uri, schema=schema, partitioning=job_layout(cfg))
    if out.format == "iceberg":
        from pipeline.output.iceberg import IcebergFormat

        return IcebergFormat(storage, out.uri, out.catalog, out.table, schema=schema, partitioning=job_layout(cfg))
    from pipeline.output.folder import ParquetFolder

    return ParquetFolder(storage, out.uri, schema=schema)


def job_layout(cfg: JobConfig, run_date: str = "(today)") -> Partitioning:
    """How the job lays its rows out; the run's date is known only once it starts (formats compare the kind)."""
    return Partitioning(run_date=run_date if cfg.output.partitioning == "run_date" else None,
                        column=partition_column(cfg))


def check_existing(table: OutputFormat, cfg: JobConfig) -> None:
    """Refuse, before any input is read, an output the job must not write to (UserError: one line, exit 2)."""
    table.check_existing(cfg.output.overwrite)
    check_folder_layout(table, job_layout(cfg), cfg.output.overwrite)


def check_folder_layout(table: OutputFormat, layout: Partitioning, overwrite: bool) -> None:
    """A folder whose live runs are partitioned otherwise than the job: refused when the output opens, before
    any input is read (mixed layouts break hive readers: DuckDB refuses them, Spark too). Delta and Iceberg check
    their tables' partitioning in `check_existing`."""
    if table.name != "parquet" or overwrite:
        return
    want = ("run_date",) if layout.run_date else (layout.column,) if layout.column else ()
    prefix = table.uri.rstrip("/") + "/"
    have = {tuple(part.split("=", 1)[0] for part in uri.removeprefix(prefix).split("/")[:-1] if "=" in part)
            for uri in table.data_files()}
    other = sorted(have - {want})
    if other:
        shown = ", ".join(other[0]) or "nothing"
        raise UserError(f"output.partitioning: the folder {table.uri} holds runs partitioned by {shown}, this job "
                        f"by {', '.join(want) or 'nothing'}; set output.partitioning to match, pass --overwrite to "
                        "replace the folder's output, or choose another output folder")


@contextmanager
def open_output(cfg: JobConfig, storage: Storage, identity: RunIdentity, schema: pa.Schema,
                out: TextIO) -> Iterator["Output"]:
    """Take the output for one run: probe the store, hold the lease, recover, start or resume the run."""
    if is_s3(cfg.output.uri):
        check_conditional_writes(storage, cfg.output.uri)
    table = make_format(cfg, storage, schema)
    with OutputLease.for_output(storage, cfg.output.uri, new_run_id()) as lease, output_failures(cfg.output.uri):
        output = Output(cfg, storage, table, lease, schema, out)
        output.start(identity)
        yield output


@contextmanager
def output_failures(output_uri: str):
    """Storage that still fails after every retry ends the run in one line; what is staged stays staged."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (OSError, BotoCoreError, ClientError) as exc:
        raise JobFailed(f"output {output_uri}: storage failed after retries ({type(exc).__name__}: {exc}); rows "
                        "staged so far are kept: rerun the job to resume") from None


class Output:
    def __init__(self, cfg: JobConfig, storage: Storage, table: OutputFormat, lease: OutputLease,
                 schema: pa.Schema, out: TextIO):
        self.cfg = cfg
        self.storage = storage
        self.table = table
        self.lease = lease
        self.schema = schema
        self.out = out
        self.staging = Staging(storage, cfg.output.uri)
        self.run: StagedRun | None = None
        self.stats = RunStats()

    @property
    def run_id(self) -> str:
        return self.run.run_id

    # --- start -------------------------------------------------------------------------------------------
    def start(self, identity: RunIdentity) -> None:
        """Recover what killed runs left, check the output is ours to write, then start or resume the run."""
        staged = self.staging.scan()
        self.table.recover(set(staged))
        committed = self.table.committed()
        done = {c["run_id"] for c in committed}
        for run in [r for r in staged.values() if r.run_id in done or r.info is None]:
            self.staging.drop(run)  # committed before its staging was dropped, or killed before it began
        staged = {k: r for k, r in staged.items() if k not in done and r.info is not None}
        check_existing(self.table, self.cfg)
        check_pseudonyms(self.table.live(), self.cfg, identity.pseudonyms)
        self.run = self._start_or_resume(staged, committed, identity)

    def _start_or_resume(self, staged: dict[str, StagedRun], committed: list[dict], identity: RunIdentity) -> StagedRun:
        out = self.out
        run, stale = interrupted(staged, committed, identity.job_key)
        for old in stale:
            print(f"note: dropping interrupted run {old.run_id}: runs have committed since, so its staged rows are "
                  "redone where needed instead of resumed", file=out)
            self.staging.drop(old)
        now = now_precise()
        if run is None:
            run = StagedRun(self.lease.run_id, RunInfo(
                run_id=self.lease.run_id, job_key=identity.job_key, model_key=identity.model_key, started_at=now,
                input=self.cfg.input.uri, model=identity.model, weights=identity.weights,
                pseudonyms=identity.pseudonyms, listing={
                    "extensions": self.cfg.input.extensions,
                    "skips_done": self.cfg.input.incremental and not self.cfg.output.overwrite}))
        resumed = attempt_so_far(self.staging, run)  # before any chunk is rewritten below
        run.info.attempts.append(now)
        retried = self.staging.unstage_failed_inputs(run) if run.chunks else 0
        self.stats = self.staging.count(run)
        if resumed is not None:
            note_interrupted_attempt(run, resumed)
        self.staging.begin(run)
        if run.resumed_rows or retried:
            print(f"Resuming run {run.run_id}: {run.resumed_rows:,} rows were staged before it was interrupted"
                  + (f"; {retried:,} inputs that failed are tried again" if retried else ""), file=out)
        others = [r.run_id for r in staged.values() if r is not run and r not in stale]
        if others:
            print(f"note: interrupted run(s) of other jobs left staged rows under {self.staging.uri}/: "
                  f"{', '.join(others)}; rerun that job to finish it, or delete the folder", file=out)
        return run

    # --- run -------------------------------------------------------------------------------------------
    def history(self, pseudonymizer: Pseudonymizer | None = None) -> History:
        """Inputs to skip: this run's staged rows, and unless told otherwise, earlier runs' unchanged inputs."""
        runs: set[str] = set()
        if self.cfg.input.incremental and not self.cfg.output.overwrite:
            runs = {c["run_id"] for c in self.table.live() if c.get("model_key") == self.run.info.model_key}
        return History(committed=self.table.rows(sorted(runs)) if runs else None, committed_runs=sorted(runs),
                       staged_files=self.run.chunks, reprocess_errors=self.cfg.input.reprocess_errors,
                       pseudonymizer=pseudonymizer)

    def sink(self, provenance: dict[str, str], checkpoint_rows: int,
             before_chunk: Callable[[int], None] | None = None) -> StagingSink:
        return StagingSink(self.staging, self.run_id, provenance, first_chunk=self.run.next_chunk(),
                           checkpoint_rows=checkpoint_rows, checkpoint_seconds=self.cfg.output.checkpoint_seconds,
                           schema=self.schema, before_chunk=before_chunk, stats=self.stats)

    # --- commit ----------------------------------------------------------------------------------------
    def commit(self, sink: StagingSink, progress: dict | None = None) -> dict:
        """The staged rows become visible as one version of the output; the staging is dropped after.
        `progress`: how this attempt went (elapsed_s, images_per_s, progress samples), kept in the run's record."""
        self.lease.check()
        run, info = self.run, self.run.info
        chunks = run.chunks + sink.written
        overwrite = self.cfg.output.overwrite
        if overwrite and self.stats.rows == 0:
            print("note: the backfill found no inputs, so it replaces nothing; the earlier output stays", file=self.out)
            overwrite = False
        record = run_record(info, self.table.name, self.cfg, self.stats, overwrite, progress)
        layout = job_layout(self.cfg, run_date=info.started_at[:10])
        committed = self.table.commit(Commit(
            run_id=run.run_id, rows=lambda: self._staged_rows(chunks), schema=self.schema, record=record,
            overwrite=overwrite, partitioning=layout, rows_per_file=self.cfg.output.rows_per_file,
            fence=self.lease.check))
        failpoints.hit("committed")
        self.staging.drop(StagedRun(run.run_id, chunks=chunks))
        return committed

    def _staged_rows(self, chunks: list[str]) -> Iterator[pa.Table]:
        """The staged chunks, in order; raises before the last one is handed over unless they hold exactly the
        rows the driver staged (a chunk missing from the list would otherwise be dropped with the staging)."""
        rows = 0
        tables = self.staging.read_chunks(chunks)
        table = next(tables, None)
        while table is not None:
            following = next(tables, None)
            rows += table.num_rows
            if following is None and rows != self.stats.rows:
                raise JobFailed(f"run {self.run_id}: its staged chunks hold {rows:,} rows, but {self.stats.rows:,} "
                                "were staged; nothing was committed, and a rerun resumes the run")
            yield table
            failpoints.hit("chunk_published")
            table = following
        if rows != self.stats.rows:
            raise JobFailed(f"run {self.run_id}: its staged chunks hold {rows:,} rows, but {self.stats.rows:,} "
                            "were staged; nothing was committed, and a rerun resumes the run")

    def write_summary(self, text: str) -> None:
        self.storage.write_bytes(join(self.cfg.output.uri, "_summary.json"), text.encode())


def run_record(info: RunInfo, output_format: str, cfg: JobConfig, stats: RunStats, overwrite: bool,
               progress: dict | None) -> dict:
    """What a committed run says of itself, kept by every format (`pipeline runs`, `pipeline report`, history)."""
    return {"format": FORMAT, "run_id": info.run_id, "mode": "overwrite" if overwrite else "append",
            "output_format": output_format, "input": info.input, "extensions": cfg.input.extensions,
            "model": info.model, "weights": info.weights,
            "model_key": info.model_key, "job_key": info.job_key, "pseudonyms": info.pseudonyms,
            **stats.as_record(), "started_at": info.started_at, "attempts": info.attempts,
            "interrupted_attempts": info.interrupted_attempts,
            "committed_at": now_precise(), **(progress or {})}


__all__ = ["Output", "RunIdentity", "open_output", "make_format", "new_run_id", "STAGING"]
