"""The output's front door: one run on it, through the steps of Ray Data's `Datasink` (docs/commit-protocol.md).
`with open_output(cfg.output, RunPolicy.of(cfg), storage, identity, schema, out) as output:` probes the store, takes
the lease and calls `on_write_start` (recover, check, start or resume); then `output.history(pseudonymizer)` (what
to skip), `output.sink(provenance, ...)` (`write`: rows staged in chunks, the resume checkpoint),
`output.on_write_complete(sink, progress)` (one visible version, in output.format), `output.write_summary(text)`."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

import pyarrow as pa

import pipeline.output.failpoints as failpoints
from pipeline.io.storage import Storage, is_remote, join
from pipeline.job.config import JobConfig, OutputConfig
from pipeline.job.errors import JobFailed, UserError
from pipeline.output.formats import Commit, OutputFormat, Partitioning
from pipeline.output.history import History, split_done
from pipeline.output.identity import (RunIdentity, attempt_so_far, check_pseudonyms, interrupted, new_run_id,
                                      note_interrupted_attempt)
from pipeline.output.lease import OutputLease, check_conditional_writes
from pipeline.output.run_keys import KeysRecorder, drop_all_but
from pipeline.output.sink import StagingSink
from pipeline.output.staging import FORMAT, RunInfo, RunStats, StagedRun, Staging, now_precise
from pipeline.privacy.pseudonyms import Pseudonymizer


@dataclass(frozen=True)
class RunPolicy:
    """What a run reads of its job beyond the output's config: the input it lists, and what counts as done."""
    input_uri: str
    extensions: tuple[str, ...] | None  # None: every object is listed
    incremental: bool = True  # earlier runs' unchanged inputs are skipped (unless the run overwrites)
    reprocess_errors: bool = False  # ...but not their error rows
    prefix: str | None = None  # an S3 Inventory's: only keys that start with it

    @classmethod
    def of(cls, cfg: JobConfig) -> "RunPolicy":
        extensions = cfg.input.extensions
        return cls(cfg.input.uri, tuple(extensions) if extensions is not None else None, cfg.input.incremental,
                   cfg.input.reprocess_errors, cfg.input.prefix)

    @property
    def listed(self) -> list[str] | None:
        """The extensions as the run's records keep them."""
        return list(self.extensions) if self.extensions is not None else None


def make_format(output: OutputConfig, storage: Storage, schema: pa.Schema) -> OutputFormat:
    """The output's format; each lives in a module of its own, imported only when used."""
    if output.format == "delta":
        from pipeline.output.delta import DeltaFormat

        return DeltaFormat(storage, output.uri, schema=schema, partitioning=layout(output))
    if output.format == "iceberg":
        from pipeline.output.iceberg import IcebergFormat

        return IcebergFormat(storage, output.uri, output.catalog, output.table, schema=schema,
                             partitioning=layout(output))
    from pipeline.output.folder import ParquetFolder

    return ParquetFolder(storage, output.uri, schema=schema)


def layout(output: OutputConfig, run_date: str = "(today)") -> Partitioning:
    """How the output lays rows out; the run's date is known only once it starts (formats compare the kind)."""
    return Partitioning(run_date=run_date if output.partitioning == "run_date" else None,
                        column=output.partition_column)


def check_folder_layout(table: OutputFormat, partitioning: Partitioning, overwrite: bool) -> None:
    """A folder whose live runs are partitioned otherwise than the job is refused (mixed layouts break hive
    readers: DuckDB and Spark refuse them). Delta and Iceberg check their tables' partitioning in `check_existing`."""
    if table.name != "parquet" or overwrite:
        return
    want = ("run_date",) if partitioning.run_date else (partitioning.column,) if partitioning.column else ()
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
def open_output(output: OutputConfig, policy: RunPolicy, storage: Storage, identity: RunIdentity,
                schema: pa.Schema, out: TextIO) -> Iterator["RunOutput"]:
    """Take the output for one run: probe the store, hold the lease (released on leaving, however the run ends),
    then `on_write_start`."""
    if is_remote(output.uri):
        check_conditional_writes(storage, output.uri)
    table = make_format(output, storage, schema)
    with OutputLease.for_output(storage, output.uri, new_run_id()) as lease, output_failures(output.uri):
        run_output = RunOutput(output, policy, storage, table, lease, schema, out)
        run_output.on_write_start(identity)
        yield run_output


@contextmanager
def output_failures(output_uri: str):
    """Storage that still fails after every retry ends the run in one line; what is staged stays staged."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (OSError, BotoCoreError, ClientError) as exc:
        raise JobFailed(f"output {output_uri}: storage failed after retries ({type(exc).__name__}: {exc}); rows "
                        "staged so far are kept: rerun the job to resume") from None


class RunOutput:
    """One run on the output: `on_write_start`, `history`, `sink`, `on_write_complete`, `write_summary`.

    It has no `on_write_failed`: a run that fails or stops (error-rate stop, storage failure, kill) leaves its rows
    staged and its attempt in `_run.json`, `open_output` releases the lease, and the job's next run resumes it."""

    def __init__(self, output: OutputConfig, policy: RunPolicy, storage: Storage, table: OutputFormat,
                 lease: OutputLease, schema: pa.Schema, out: TextIO):
        self.output = output
        self.policy = policy
        self.storage = storage
        self.table = table
        self.lease = lease
        self.schema = schema
        self.out = out
        self.staging = Staging(storage, output.uri)
        self.run: StagedRun | None = None
        self.stats = RunStats()

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def prefixed(self) -> dict:
        """What a run's records add for an inventory's input.prefix (`pipeline runs` lists as the job does)."""
        return {"prefix": self.policy.prefix} if self.policy.prefix is not None else {}

    @property
    def skips_done(self) -> bool:
        """Earlier runs' unchanged inputs count as done (an overwrite redoes every input)."""
        return self.policy.incremental and not self.output.overwrite

    def on_write_start(self, identity: RunIdentity) -> None:
        """Recover what killed runs left, check the output is ours to write, then start or resume the run."""
        staged = self.staging.scan()
        self.table.recover(set(staged))
        committed = self.table.committed()
        done = {c["run_id"] for c in committed}
        for run in [r for r in staged.values() if r.run_id in done or r.info is None]:
            self.staging.drop(run)  # committed before its staging was dropped, or killed before it began
        staged = {k: r for k, r in staged.items() if k not in done and r.info is not None}
        # Refused before any input is read: an output this job must not write to (one line, exit 2).
        self.table.check_existing(self.output.overwrite)
        check_folder_layout(self.table, layout(self.output), self.output.overwrite)
        check_pseudonyms(self.table.live(), self.output.uri, self.output.overwrite, identity.pseudonyms)
        self.run = self._start_or_resume(staged, committed, identity)
        if self.skips_done:
            say_if_the_model_is_new(self.table.live(), self.policy.input_uri, identity, self.out)

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
                input=self.policy.input_uri, model=identity.model, weights=identity.weights,
                pseudonyms=identity.pseudonyms, listing={"extensions": self.policy.listed,
                                                         "skips_done": self.skips_done, **self.prefixed},
                model_config=identity.model_config))
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

    def history(self, pseudonymizer: Pseudonymizer | None = None) -> History:
        """Inputs to skip: this run's staged rows, and unless told otherwise, earlier runs' unchanged inputs."""
        runs: set[str] = set()
        if self.skips_done:
            runs = {c["run_id"] for c in self.table.live() if c.get("model_key") == self.run.info.model_key}
        return History(committed=self.table.rows(sorted(runs)) if runs else None, committed_runs=sorted(runs),
                       staged_files=self.run.chunks, reprocess_errors=self.policy.reprocess_errors,
                       pseudonymizer=pseudonymizer, keys_at=self.output.uri)

    def sink(self, provenance: dict[str, str], checkpoint_rows: int,
             before_chunk: Callable[[int], None] | None = None) -> StagingSink:
        """Where the run's rows are written (Datasink's `write`): staged chunks, each one a resume checkpoint."""
        return StagingSink(self.staging, self.run_id, provenance, first_chunk=self.run.next_chunk(),
                           checkpoint_rows=checkpoint_rows, checkpoint_seconds=self.output.checkpoint_seconds,
                           schema=self.schema, before_chunk=before_chunk, stats=self.stats)

    def on_write_complete(self, sink: StagingSink, progress: dict | None = None) -> dict:
        """The staged rows become one visible version of the output; the staging is dropped after. Returns the
        run's record; `progress` (elapsed_s, images_per_s, samples) is kept in it."""
        self.lease.check()
        run, info = self.run, self.run.info
        chunks = run.chunks + sink.written
        overwrite = self.output.overwrite and replaces_something(self.stats, self.out)
        record = run_record(info, self.table.name, self.policy.listed, self.stats, overwrite, progress) | self.prefixed
        keys = KeysRecorder(self.storage, self.output.uri, run.run_id, fence=self.lease.check, split=split_done)
        committed = self.table.commit(Commit(
            run_id=run.run_id,
            rows=lambda: keys.watch(staged_rows(self.staging, chunks, run.run_id, self.stats.rows)),
            schema=self.schema, record=record, overwrite=overwrite,
            partitioning=layout(self.output, run_date=info.started_at[:10]),
            rows_per_file=self.output.rows_per_file, fence=self.lease.check))
        failpoints.hit("committed")
        if overwrite:
            drop_all_but(self.storage, self.output.uri, run.run_id)
        self.staging.drop(StagedRun(run.run_id, chunks=chunks))
        return committed

    def write_summary(self, text: str) -> None:
        self.storage.write_bytes(join(self.output.uri, "_summary.json"), text.encode())


def replaces_something(stats: RunStats, out) -> bool:
    """Whether an overwrite has rows to replace the output with; a backfill that found none replaces nothing."""
    if stats.rows == 0:
        print("note: the backfill found no inputs, so it replaces nothing; the earlier output stays", file=out)
    return stats.rows > 0


def staged_rows(staging: Staging, chunks: list[str], run_id: str, staged: int) -> Iterator[pa.Table]:
    """The staged chunks, in order; raises before the last one is handed over unless they hold exactly the
    `staged` rows the driver staged (a chunk missing from the list would otherwise be dropped with the staging)."""
    rows = 0
    tables = staging.read_chunks(chunks)
    table = next(tables, None)
    while table is not None:
        following = next(tables, None)
        rows += table.num_rows
        if following is None and rows != staged:
            raise JobFailed(f"run {run_id}: its staged chunks hold {rows:,} rows, but {staged:,} "
                            "were staged; nothing was committed, and a rerun resumes the run")
        yield table
        failpoints.hit("chunk_published")
        table = following
    if rows != staged:
        raise JobFailed(f"run {run_id}: its staged chunks hold {rows:,} rows, but {staged:,} "
                        "were staged; nothing was committed, and a rerun resumes the run")


def say_if_the_model_is_new(live: list[dict], input_uri: str, identity: RunIdentity, out) -> None:
    """An incremental run whose model identity no earlier run of its input had redoes every input: said first."""
    keys = {r.get("model_key") for r in live if r.get("input") == input_uri}
    if keys and identity.model_key not in keys:
        print("note: no earlier run of this output had this model as configured now (its weights, labels or "
              "vocabulary, prompts or preprocessing differ): every input is processed again; earlier rows stay",
              file=out)


def run_record(info: RunInfo, output_format: str, extensions: list[str] | None, stats: RunStats, overwrite: bool,
               progress: dict | None) -> dict:
    """What a committed run says of itself, kept by every format (`pipeline runs`, `pipeline report`, history)."""
    return {"format": FORMAT, "run_id": info.run_id, "mode": "overwrite" if overwrite else "append",
            "output_format": output_format, "input": info.input, "extensions": extensions,
            "model": info.model, "weights": info.weights,
            **({"model_config": info.model_config} if info.model_config else {}),
            "model_key": info.model_key, "job_key": info.job_key, "pseudonyms": info.pseudonyms,
            **stats.as_record(), "started_at": info.started_at, "attempts": info.attempts,
            "interrupted_attempts": info.interrupted_attempts,
            "committed_at": now_precise(), **(progress or {})}
