"""A run's life on its output folder, apart from Ray: who it is, whether it resumes, what it skips, and
how it is published. The protocol is in commit.py and docs/commit-protocol.md.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timezone
from typing import TextIO

import pyarrow as pa

from pipeline.commit import STAGING, FolderState, OutputFolder, StagedRun
from pipeline.config import JobConfig
from pipeline.errors import UserError
from pipeline.history import History
from pipeline.decode import column_name
from pipeline.model import ModelSpec
from pipeline.privacy import Pseudonymizer
from pipeline.rows import output_schema
from pipeline.sink import StagingSink


def new_run_id() -> str:
    """Sortable by start time, unique across hosts."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def check_existing_files(state: FolderState, cfg: JobConfig, key_id: str | None = None) -> None:
    check_pseudonyms(state, cfg, key_id)
    foreign = state.foreign()
    if foreign:
        raise UserError(f"output.uri: {cfg.output.uri} holds {len(foreign)} Parquet file(s) this pipeline did not "
                        f"write (e.g. {foreign[0]}); readers of the folder would mix them in. Choose another "
                        "output folder, or move them")
    unrecorded = state.unrecorded()
    if unrecorded and not cfg.output.overwrite:
        raise UserError(f"output.uri: {cfg.output.uri} already holds {len(unrecorded)} Parquet file(s) without a "
                        f"commit record (e.g. {unrecorded[0]}); choose a new output folder or pass --overwrite "
                        "to replace them")


def check_pseudonyms(state: FolderState, cfg: JobConfig, key_id: str | None) -> None:
    """Raw and pseudonymised rows, or tokens under two keys, never share a folder (an overwrite replaces them all).

    `key_id` names this job's pseudonymisation key (None: off); a commit record holds its run's as `pseudonyms`."""
    if cfg.output.overwrite:
        return
    other = next((c.get("pseudonyms") for c in state.live if c.get("pseudonyms") != key_id), False)
    if other is False:
        return
    where = f"output.uri: {cfg.output.uri}"
    if key_id is None:
        raise UserError(f"{where} holds pseudonymised runs; turn privacy.pseudonymize on with their key, or write "
                        "to another folder")
    if other is None:
        raise UserError(f"{where} holds runs written without privacy.pseudonymize (raw input paths); write "
                        "pseudonymised output to a new folder, or pass --overwrite to replace it")
    raise UserError(f"{where} holds runs pseudonymised under another key (key id {other}; this job's is {key_id}); "
                    "use their key (privacy.key_env / key_file), a new folder, or --overwrite")


def model_key(cfg: JobConfig, spec: ModelSpec) -> str:
    """What decides an input's row: rows of an earlier run count as done only under the same model key."""
    # Where decoding runs changes pixels by resampling noise only: moving a job to GPUs does not redo it.
    decode = cfg.decode.model_dump(exclude={"device"})
    # Settings added since outputs were first written join the key only when set, so upgrading the pipeline
    # does not make an incremental job redo its whole archive.
    model = cfg.model.model_dump(exclude={"input_channels"} if cfg.model.input_channels == "auto" else None)
    identity = {"model": model, "weights": spec.weights_id, "decode": decode}
    if cfg.dicom is not None:  # windowing and frame choice change the pixels; absent, keys stay as they were
        identity["dicom"] = cfg.dicom.model_dump()
    return _digest(identity)


def job_key(cfg: JobConfig, spec: ModelSpec, key_id: str | None = None) -> str:
    """An interrupted attempt is resumed only by the same job: same inputs, model key, mode and pseudonym key."""
    identity = {"input": cfg.input.uri.rstrip("/"), "extensions": cfg.input.extensions,
                "max_file_bytes": cfg.input.max_file_bytes, "model": model_key(cfg, spec),
                "overwrite": cfg.output.overwrite}
    if key_id is not None:  # absent when off, so jobs' keys stay as they were
        identity["pseudonyms"] = key_id
    return _digest(identity)


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def start_or_resume(folder: OutputFolder, state: FolderState, cfg: JobConfig, spec: ModelSpec, new_id: str,
                    out: TextIO, key_id: str | None = None) -> StagedRun:
    key = job_key(cfg, spec, key_id)
    run, stale = state.interrupted(key)
    for old in stale:
        print(f"note: dropping interrupted run {old.run_id}: runs have committed since, so its staged rows are "
              "redone where needed instead of resumed", file=out)
        folder.drop_staging(old)
    now = _now_precise()
    if run is None:
        run = StagedRun(new_id, {"run_id": new_id, "job_key": key, "model_key": model_key(cfg, spec),
                                 "started_at": now, "attempts": [], "input": cfg.input.uri, "model": spec.name,
                                 "weights": spec.weights_id, "pseudonyms": key_id})
    run.info["attempts"].append(now)
    retried = folder.unstage_failed_inputs(run) if run.chunks else 0
    resumed, run.info["resumed_inputs"] = folder.staged_counts(run)
    run.info["resumed_rows"] = resumed
    folder.begin(run.run_id, run.info)
    if resumed or retried:
        print(f"Resuming run {run.run_id}: {resumed:,} rows were staged before it was interrupted"
              + (f"; {retried:,} inputs that failed are tried again" if retried else ""), file=out)
    others = [r.run_id for r in state.staged.values()
              if r.run_id != run.run_id and r.run_id not in state.commits and r not in stale]
    if others:
        print(f"note: interrupted run(s) of other jobs left staged rows under {folder.uri}/{STAGING}/: "
              f"{', '.join(others)}; rerun that job to finish it, or delete the folder", file=out)
    return run


def history_for(folder: OutputFolder, state: FolderState, run: StagedRun, cfg: JobConfig,
                pseudonymizer: Pseudonymizer | None = None) -> History:
    """Inputs to skip: this run's staged rows, and unless told otherwise, earlier runs' unchanged inputs."""
    committed = []
    if cfg.input.incremental and not cfg.output.overwrite:
        committed = [uri for c in state.live if c.get("model_key") == run.info["model_key"]
                     for uri in folder.files(c)]
    return History(committed_files=committed, staged_files=run.chunks, reprocess_errors=cfg.input.reprocess_errors,
                   pseudonymizer=pseudonymizer)


def job_schema(cfg: JobConfig, spec: ModelSpec) -> pa.Schema:
    """The job's Parquet schema; a partitioning column must be one of its string columns."""
    tags = [column_name(keyword) for keyword in cfg.dicom.include_tags] if cfg.dicom is not None else None
    schema = output_schema(spec.task, spec.wants_predictions, spec.embedding_dim, tags)
    column = partition_column(cfg)
    if column is not None and (column not in schema.names or schema.field(column).type != pa.string()):
        strings = [f.name for f in schema if f.type == pa.string() and f.name not in ("uri", "error", "run_id")]
        raise UserError(f"output.partitioning: '{column}' is not a string column of this job's output; use none, "
                        f"run_date or one of {', '.join(strings)}")
    return schema


def partition_column(cfg: JobConfig) -> str | None:
    return None if cfg.output.partitioning in ("none", "run_date") else cfg.output.partitioning


def partition_for(cfg: JobConfig, run: StagedRun) -> str | None:
    if cfg.output.partitioning == "run_date":
        return f"run_date={run.info['started_at'][:10]}"
    return None


def publish(folder: OutputFolder, state: FolderState, run: StagedRun, sink: StagingSink, cfg: JobConfig,
            spec: ModelSpec, out: TextIO) -> dict:
    staged = run.info["resumed_rows"] + sink.rows_written
    replaces = state if cfg.output.overwrite else None
    if replaces is not None and staged == 0:
        print("note: the backfill found no inputs, so it replaces nothing; the earlier output stays", file=out)
        replaces = None
    return folder.publish(
        StagedRun(run.run_id, run.info, run.chunks + sink.written), expected_rows=staged,
        rows_per_file=cfg.output.rows_per_file, partition=partition_for(cfg, run),
        partition_column=partition_column(cfg), replaces=replaces,
        summary={"input": cfg.input.uri, "model": spec.name, "weights": spec.weights_id,
                 "model_key": run.info["model_key"], "job_key": run.info["job_key"],
                 "pseudonyms": run.info.get("pseudonyms")})


def _now_precise() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
