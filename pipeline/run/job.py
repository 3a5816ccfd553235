"""The story of one run, read this first: check, open the output, plan the stages, stream rows, commit, summarise.
The engine is the `executor`'s business (pipeline/ray/ or pipeline/local/); nothing here imports it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, TextIO

from pipeline.io.storage import Storage, absolute
from pipeline.io.uris import is_remote
from pipeline.job.config import JobConfig
from pipeline.job.errors import JobStopped
from pipeline.job.rows import PREDICTION_COLUMNS
from pipeline.output import RunOutput, RunPolicy, open_output
from pipeline.output.identity import job_schema, run_identity
from pipeline.output.sink import StagingSink
from pipeline.privacy.pseudonyms import (PseudonymMap, Pseudonymizer, RowPseudonymizer, load_pseudonymizer,
                                         row_pseudonymizer)
from pipeline.run.checks import check_storage
from pipeline.run.drain import stream_rows
from pipeline.run.reuse import ReuseFiller
from pipeline.run.executor import Executor
from pipeline.run.plan import plan_stages
from pipeline.run.progress import ProgressSamples, Timeline
from pipeline.run.summary import RunSummary, print_summary, summarise

if TYPE_CHECKING:
    from pipeline.models.spec import ModelSpec

CHECKPOINT_BATCHES = 8  # default durability granularity, in model batches


def run_job(cfg: JobConfig, executor: Executor, out: TextIO, progress_interval: float | None = None) -> RunSummary:
    """Run (or resume) and commit one job. Raises UserError before any work if it cannot run, JobStopped at its
    error-rate stop (rows stay staged), JobFailed when storage or the engine gives up for good."""
    timeline = Timeline()
    timeline.mark("run_job")
    cfg = with_absolute_paths(cfg)
    storage = storage_for(cfg)
    pseudonymizer = load_pseudonymizer(cfg.privacy)
    say(out, "checking the input and the output …")
    check_storage(cfg, storage)
    timeline.mark("storage_checked")
    spec = start_and_check_model(cfg, storage, executor, out, timeline)
    schema = job_schema(cfg, spec)
    identity = run_identity(cfg, spec, pseudonymizer.key_id if pseudonymizer else None)
    with open_output(cfg.output, RunPolicy.of(cfg), storage, identity, schema, out) as output:
        timeline.mark("output_opened")
        pool = executor.pool(cfg.compute)
        say(out, pool.describe())
        plan = plan_stages(cfg, spec, storage, pool, output.history(pseudonymizer))
        sink, prepare = open_sink(cfg, spec, storage, output, schema, pseudonymizer)
        rows = executor.run(plan, cfg.output.uri)
        samples = ProgressSamples()
        interval = progress_interval or (0.5 if out.isatty() else 5.0)
        reuse = ReuseFiller(plan.reuse, storage, output.run_id, [c for c in schema.names if c in PREDICTION_COLUMNS],
                            sink.staged)
        tally, status, message = stream_rows(rows, sink, output.lease, cfg.errors, out, interval, prepare, timeline,
                                             samples, reuse)
        timeline.mark("last_row")
        progress = samples.record(tally.elapsed, tally.rows)
        record = output.on_write_complete(sink, progress) if status == "completed" else None
        timeline.mark("committed")
        summary = summarise(cfg, spec.name, spec.weights_id, output, tally, record, rows, pool.describe(),
                            timeline, status, message)
        output.write_summary(summary.to_json())
    print_summary(summary, out)
    if status == "stopped":
        raise JobStopped(message)
    return summary


def start_and_check_model(cfg: JobConfig, storage: Storage, executor: Executor, out: TextIO,
                          timeline: Timeline) -> ModelSpec:
    """The engine starts while the model is checked where it will run (imports torch, builds it: seconds each)."""
    say(out, f"starting {executor.name} and checking the model {cfg.model.display_name} …")
    model_check = executor.check_model(cfg, storage)
    say(out, f"{executor.name} ready: {executor.start()}")
    timeline.mark("ray_ready")
    spec = model_check.result()
    timeline.mark("model_checked")
    say(out, f"model {spec.name} ready" + (f", {len(spec.labels):,} labels" if spec.labels else ""))
    return spec


def open_sink(cfg: JobConfig, spec: ModelSpec, storage: Storage, output: RunOutput, schema,
              pseudonymizer: Pseudonymizer | None) -> tuple[StagingSink, RowPseudonymizer | None]:
    """Where rows go (staged chunks, each a checkpoint), and what turns a batch into what is written."""
    mapping = PseudonymMap(storage, cfg.privacy.mapping_uri, output.run_id) if cfg.privacy.mapping_uri else None
    sink = output.sink({"model": spec.name, "weights": spec.weights_id, "run_id": output.run_id},
                       checkpoint_rows=cfg.output.checkpoint_rows or CHECKPOINT_BATCHES * cfg.compute.batch_size,
                       before_chunk=mapping.flush if mapping else None)
    tags = cfg.dicom.include_tags if cfg.dicom is not None else ()
    return sink, row_pseudonymizer(pseudonymizer, schema, tags, mapping)


def storage_for(cfg: JobConfig) -> Storage:
    s = cfg.storage
    return Storage.from_env(s.endpoint_url, s.region, max_attempts=s.max_attempts,
                            connect_timeout_s=s.connect_timeout_s, read_timeout_s=s.read_timeout_s,
                            conditional_writes=cfg.output.conditional_writes)


def with_absolute_paths(cfg: JobConfig) -> JobConfig:
    """Local paths resolved on the driver, where the user typed them."""
    cfg = cfg.model_copy(deep=True)
    cfg.input.uri = absolute(cfg.input.uri)
    cfg.output.uri = absolute(cfg.output.uri)
    if cfg.privacy.mapping_uri:
        cfg.privacy.mapping_uri = absolute(cfg.privacy.mapping_uri)
    for attr in ("weights", "labels", "pretrained", "name"):
        value = getattr(cfg.model, attr)
        if isinstance(value, str) and is_local_file(value, attr, cfg.model):
            setattr(cfg.model, attr, absolute(value))
    return cfg


def say(out: TextIO, text: str) -> None:
    """A line about what the job is doing while it starts, before the progress line takes over."""
    print(f"  {text}", file=out, flush=True)


def is_local_file(value: str, attr: str, model) -> bool:
    """Whether a model setting names a file or folder (made absolute), not a weights name, tag or hub id."""
    if attr == "labels":
        return True
    if attr == "weights":
        return model.checkpoint is not None
    if attr == "name" and model.source not in ("huggingface", "open_clip"):
        return False
    return not is_remote(value) and os.path.exists(os.path.expanduser(value.removeprefix("file://")))
