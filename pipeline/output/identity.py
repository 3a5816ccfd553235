"""Who a run is: its id, the keys that say which job it belongs to and which earlier rows count as done,
and whether an interrupted attempt is resumed. Nothing here writes."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.output.staging import StagedRun, Staging
from pipeline.job.config import JobConfig
from pipeline.job.errors import UserError
from pipeline.job.rows import output_schema
from pipeline.privacy.identifying import column_name

if TYPE_CHECKING:  # the output side never loads torch
    from pipeline.models.spec import ModelSpec


@dataclass(frozen=True)
class RunIdentity:
    """What a run is, decided before it starts (`job_key`, `model_key`)."""
    job_key: str
    model_key: str
    model: str
    weights: str
    pseudonyms: str | None = None  # the pseudonymisation key's id
    model_config: dict | None = None  # the job's model section, kept in the run's record


def new_run_id() -> str:
    """Sortable by start time, unique across hosts."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def run_identity(cfg: JobConfig, spec: "ModelSpec", key_id: str | None = None) -> RunIdentity:
    """Who a run is. Its model key decides which earlier rows count as done; its job key which interrupted attempt
    it resumes (same inputs, model key, mode and pseudonym key). `key_id`: the pseudonymisation key's id."""
    # Where decoding runs changes pixels by resampling noise only: moving a job to GPUs does not redo it.
    # Settings added since outputs were first written join a key only when set, so upgrading the pipeline does not
    # make an incremental job redo its whole archive.
    model = {"model": cfg.model.identity(),
             "weights": spec.weights_id, "decode": cfg.decode.model_dump(exclude={"device"})}
    if spec.task == "zero_shot":  # a vocabulary file's words, not only its name
        model["vocabulary"] = list(spec.labels)
    if cfg.dicom is not None:  # windowing and frame choice change the pixels
        model["dicom"] = cfg.dicom.model_dump()
    model_key = _identity_digest(model)
    job = {"input": cfg.input.uri.rstrip("/"), "extensions": cfg.input.extensions,
           "max_file_bytes": cfg.input.max_file_bytes, "model": model_key, "overwrite": cfg.output.overwrite}
    if cfg.input.prefix is not None:  # an inventory's keys the job takes
        job["prefix"] = cfg.input.prefix
    if key_id is not None:
        job["pseudonyms"] = key_id
    return RunIdentity(job_key=_identity_digest(job), model_key=model_key, model=spec.name,
                       weights=spec.weights_id, pseudonyms=key_id,
                       model_config=cfg.model.model_dump(mode="json", exclude_defaults=True))


def _identity_digest(identity: dict) -> str:
    """16 hex characters naming a run's identity (a dict of its spec's parts, in JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def interrupted(staged: dict[str, StagedRun], committed: list[dict], job: str) -> tuple[StagedRun | None, list[StagedRun]]:
    """(the attempt of this job to resume, stale attempts of it to drop).

    An interrupted attempt is resumed only while nothing has committed since it last ran: otherwise its
    staged rows may already be in a later commit, and committing them would duplicate them.
    """
    done = {c["run_id"] for c in committed}
    runs = sorted((r for r in staged.values() if r.run_id not in done and r.info is not None
                   and r.info.job_key == job), key=lambda r: r.run_id)
    last_commit = max((c["committed_at"] for c in committed), default="")
    fresh = [r for r in runs if (r.info.attempts or [""])[-1] > last_commit]
    resume = fresh[-1] if fresh else None
    return resume, [r for r in runs if r is not resume]


def attempt_so_far(staging: Staging, run: StagedRun) -> dict | None:
    """The attempt a resume takes over (None for a new run): its start, and how long it ran until its last staged
    chunk (None if it staged none). Read before the resume rewrites any chunk (a rewrite moves its time)."""
    if not run.info.attempts:
        return None
    started = run.info.attempts[-1]
    since = datetime.fromisoformat(started)
    chunks = set(run.chunks)
    times = [o.last_modified for page in staging.storage.list_pages(staging.folder(run.run_id)) for o in page
             if o.uri in chunks and o.last_modified is not None
             and o.last_modified >= since.replace(microsecond=0)]  # S3 keeps whole seconds
    elapsed = max((max(times) - since).total_seconds(), 0.0) if times else None
    return {"started_at": started, "elapsed_s": round(elapsed, 3) if elapsed is not None else None}


def note_interrupted_attempt(run: StagedRun, attempt: dict) -> None:
    """Keeps what the resumed attempt did in the run's info (so in _run.json and the commit record): with its rows,
    those staged now (`run.resumed_rows`, failed inputs about to be retried left out) that earlier interrupted
    attempts had not staged."""
    before = sum(a.get("rows") or 0 for a in run.info.interrupted_attempts)
    run.info.interrupted_attempts.append({**attempt, "rows": max(run.resumed_rows - before, 0)})


def check_pseudonyms(live: list[dict], uri: str, overwrite: bool, key_id: str | None) -> None:
    """Raw and pseudonymised rows, or tokens under two keys, never share an output (an overwrite replaces them all).

    `key_id` names this job's pseudonymisation key (None: off); a commit record holds its run's as `pseudonyms`."""
    if overwrite:
        return
    other = next((c.get("pseudonyms") for c in live if c.get("pseudonyms") != key_id), False)
    if other is False:
        return
    where = f"output.uri: {uri}"
    if key_id is None:
        raise UserError(f"{where} holds pseudonymised runs; turn privacy.pseudonymize on with their key, or write "
                        "to another folder")
    if other is None:
        raise UserError(f"{where} holds runs written without privacy.pseudonymize (raw input paths); write "
                        "pseudonymised output to a new folder, or pass --overwrite to replace it")
    raise UserError(f"{where} holds runs pseudonymised under another key (key id {other}; this job's is {key_id}); "
                    "use their key (privacy.key_env / key_file), a new folder, or --overwrite")


def job_schema(cfg: JobConfig, spec: "ModelSpec") -> pa.Schema:
    """The job's output schema; a partitioning column must be one of its string columns."""
    tags = [column_name(keyword) for keyword in cfg.dicom.include_tags] if cfg.dicom is not None else None
    schema = output_schema(spec.task, spec.wants_predictions, spec.embedding_dim, tags)
    column = cfg.output.partition_column
    if column is not None and (column not in schema.names or schema.field(column).type != pa.string()):
        strings = [f.name for f in schema if f.type == pa.string() and f.name not in ("uri", "error", "run_id")]
        raise UserError(f"output.partitioning: '{column}' is not a string column of this job's output; use none, "
                        f"run_date or one of {', '.join(strings)}")
    return schema


