"""The only module that knows Ray: wires the stages into one streaming Ray Data pipeline and drains it.

    ListInputs (1 read task) -> Read (I/O tasks) -> Decode (CPU tasks) -> Classifier or Detector (actor pool)
        -> driver -> Parquet

Prediction rows are small (a few hundred bytes), so the driver consumes them with `iter_batches` and
writes the Parquet files itself. That one place sees every row exactly once, which is what makes the
progress counts, the error-rate stop and the summary exact.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, TextIO

import ray
from ray.util.annotations import RayDeprecationWarning
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.decode.dicom import IDENTIFYING, KEY_TAGS, dicom_settings, instance_uid_tags
from pipeline.decode.image import Decoder, column_name
from pipeline.output import RunIdentity, RunPolicy, open_output
from pipeline.output.history import History
from pipeline.output.lease import OutputLease
from pipeline.output.identity import job_key, job_schema, model_key
from pipeline.output.sink import StagingSink
from pipeline.ray.cluster import ClusterWatch, PoolPlan, plan_pool, read_cluster
from pipeline.ray.console import Console
from pipeline.ray.isolation import Isolated, Ledger
from pipeline.ray.ledger import BatchLedger, RayLedger
from pipeline.ray.metrics import RunMetrics
from pipeline.ray.preflight import check_model, check_storage
from pipeline.ray.reaper import start_reaper
from pipeline.job.config import JobConfig
from pipeline.job.errors import JobFailed, JobStopped, UserError
from pipeline.output.privacy import (PseudonymMap, Pseudonymizer, RowPseudonymizer, load_pseudonymizer,
                              pseudonymized_columns)
from pipeline.io.listing import InputListing
from pipeline.io.read import Reader
from pipeline.io.storage import Storage, absolute, join
from pipeline.ray.actors import ModelActor
from pipeline.ray.blocks import rows_leave_each_batch
from pipeline.ray.datasource import ListingDatasource
from pipeline.ray.progress import ProgressPrinter, ProgressSamples, Tally, Timeline

if TYPE_CHECKING:  # the model modules import torch (seconds): the driver does so while Ray starts
    from pipeline.models.resolve import ModelSpec

# Ray merges what a task yields into blocks of up to this many bytes, and an actor takes whole blocks: ~10k
# listed keys or ~14 photos per block. Ray's default (128 MiB) would hold the listing back until ~1M keys;
# 256 KiB blocks cost 2.7x in throughput (docs/performance.md). Thumbnails come ~1,000 to a block.
BLOCK_BYTES = 1 << 20
# A DICOM slice is half a MiB to several MiB: at 1 MiB a block would carry one or two and the hand-offs would
# dominate (a 600-slice job: 33.7 s at 1 MiB, 24.0 s at 8 MiB). Ray 2.60 has no per-stage block size, so a DICOM
# job's listing hands over ~80k keys at a time instead: seconds of listing, once, for a backfill.
DICOM_BLOCK_BYTES = 8 << 20
BLOCK_ROWS = 64  # inputs fetched concurrently by a read task
CHECKPOINT_BATCHES = 8  # default durability granularity, in model batches
# Attempts Ray makes at one task (a block of inputs) whose process was lost, before the job fails in one line. An
# input that kills its process costs two (isolation.py); a block holding several poison inputs costs one more for
# each, and a preempted node one: 16 leaves room for both and still ends a job that cannot go on.
MAX_TASK_ATTEMPTS = 16
# Listing and reading wait on storage, so they hold no logical CPU: every core goes to decoding and the
# model. Ray fuses neighbouring stages whose resource requests are equal into one task, which would put
# reading inside the single listing task; a read task's memory request (the objects it holds in flight)
# keeps them apart. Decoding in CPU tasks (only ahead of GPU actors that do not decode) takes a core each.
LIST_CPUS = 0
READ_CPUS = 0
READ_MEMORY = 256 * 2**20
DECODE_CPUS = 1


@dataclass
class RunSummary:
    run_id: str
    status: str  # completed | stopped
    input: str
    output: str
    model: str
    weights: str
    inputs: int  # processed by this attempt
    rows: int  # written by this attempt: one per input, or per frame of a multi-frame DICOM
    predicted: int  # rows without an error; for a committed run, all of its rows (resumed ones too)
    errors: int  # rows with one; likewise
    errors_by_type: dict[str, int]
    resumed: int  # inputs an interrupted earlier attempt of this run had staged
    already_done: int  # inputs skipped: unchanged since an earlier committed run
    skipped_by_extension: int
    duplicates: int  # a manifest's entries dropped as repeats of an earlier entry (each input is one row)
    committed_rows: int  # rows the run's commit holds (resumed + this attempt); 0 until it commits
    model_actors: str  # the pool as decided at the start, and why
    elapsed_s: float
    images_per_s: float
    started_at: str
    finished_at: str
    files: list[dict] = field(default_factory=list)
    message: str | None = None
    detections: int | None = None  # detection jobs: boxes written by this attempt
    images_with_detections: int | None = None
    dicom_tags_written: list[str] | None = None  # DICOM jobs: every tag the rows carry, keys included
    nodes_left: dict[str, int] = field(default_factory=dict)  # Ray nodes that left mid-run, by why
    redone: int = 0  # inputs the model took again because a node or an actor was lost with them
    pseudonyms: str | None = None  # privacy.pseudonymize: the key's id (the key itself is never written)
    output_format: str = "parquet"
    committed: str | None = None  # what the commit wrote, in the format's words ("3 Parquet file(s)", "version 4")
    table_version: int | None = None  # delta: the table version of this run; iceberg: its snapshot id
    metadata_location: str | None = None  # iceberg: the metadata file of that snapshot (DuckDB's iceberg_scan)
    timeline_s: dict[str, float] = field(default_factory=dict)  # seconds from the process's start to each step
    model_busy: float | None = None  # share of their time the model actors spent in batches (below 1: waiting)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def run_job(cfg: JobConfig, out: TextIO | None = None, progress_interval: float | None = None,
            console: Console | None = None) -> RunSummary:
    """Validate, run (or resume) and commit one job. Raises UserError before any work if it cannot run.
    `console`: the `pipeline` command's (console.py): once Ray is up, its output goes to the session's logs."""
    out = out or (console.out if console is not None else sys.stdout)
    timeline = Timeline()
    timeline.mark("run_job")
    cfg = with_absolute_paths(cfg)
    s = cfg.storage
    storage = Storage.from_env(s.endpoint_url, s.region, max_attempts=s.max_attempts,
                               connect_timeout_s=s.connect_timeout_s, read_timeout_s=s.read_timeout_s,
                               conditional_writes=cfg.output.conditional_writes)
    pseudonymizer = load_pseudonymizer(cfg.privacy)
    key_id = pseudonymizer.key_id if pseudonymizer else None
    say(out, "checking the input and the output …")
    check_storage(cfg, storage)
    timeline.mark("storage_checked")
    # The model check imports torch and builds the model (seconds) while Ray starts its daemons (seconds).
    # Ray starts in this thread: the processes it launches are tied to the thread that launched them.
    with ThreadPoolExecutor(1, thread_name_prefix="model-check") as pool:
        say(out, f"starting Ray and checking the model {cfg.model.name} …")
        model_check = pool.submit(check_model, cfg, storage)
        say(out, f"Ray ready: {start_ray(cfg.compute.ray_address, console)}")
        timeline.mark("ray_ready")
        spec = model_check.result()
        timeline.mark("model_checked")
        say(out, f"model {spec.name} ready" + (f", {len(spec.labels):,} labels" if spec.labels else ""))
    schema = job_schema(cfg, spec)
    identity = RunIdentity(job_key=job_key(cfg, spec, key_id), model_key=model_key(cfg, spec), model=spec.name,
                           weights=spec.weights_id, pseudonyms=key_id)
    with open_output(cfg.output, RunPolicy.of(cfg), storage, identity, schema, out) as output:
        timeline.mark("output_opened")
        cluster = read_cluster()
        pool, request = plan_pool(cfg.compute, cluster)
        print(f"  {pool.describe(request)}", file=out, flush=True)
        ledger = BatchLedger.options(scheduling_strategy=on_driver_node()).remote()
        dataset = build_dataset(cfg, spec, storage, ledger, output.history(pseudonymizer), pool,
                                RayLedger(ledger))
        mapping = PseudonymMap(storage, cfg.privacy.mapping_uri, output.run_id) if cfg.privacy.mapping_uri else None
        sink = output.sink({"model": spec.name, "weights": spec.weights_id, "run_id": output.run_id},
                           checkpoint_rows=cfg.output.checkpoint_rows or CHECKPOINT_BATCHES * cfg.compute.batch_size,
                           before_chunk=mapping.flush if mapping else None)
        rows = row_pseudonymizer(cfg, schema, pseudonymizer, mapping)
        tally = Tally()
        samples = ProgressSamples()
        interval = progress_interval or (0.5 if out.isatty() else 5.0)
        watch = ClusterWatch(request, cluster.node_types)
        # The line counts rows the driver has: a batch an actor finished can still be lost with its process.
        with ProgressPrinter(tally, lambda: ray.get(ledger.listing_get.remote()), out, interval, watch.poll):
            try:
                status, message = drain(dataset, sink, tally, cfg, output.lease, rows, timeline, samples,
                                        received=lambda uris: ledger.received.remote(uris))
            except ray.exceptions.RayError as exc:
                raise ledger_failure(exc, ledger) from None
            leftover = sink.release_partial()
            if leftover is not None:
                tally.add(leftover)
            sink.flush()
        timeline.mark("last_row")
        progress = samples.record(tally.elapsed, tally.rows)
        record = output.on_write_complete(sink, progress) if status == "completed" else None
        timeline.mark("committed")
        first_batch_at = ray.get(ledger.model_first_finished_at.remote())
        if first_batch_at is not None:
            timeline.mark("first_model_batch", at=first_batch_at)
        listing = ray.get(ledger.listing_get.remote())
        watch.poll()
        redone = max(0, ray.get(ledger.model_inputs_started.remote()) - tally.done) if status == "completed" else 0
        run = output.run
        summary = RunSummary(
            run_id=run.run_id, status=status, input=cfg.input.uri, output=cfg.output.uri, model=spec.name,
            weights=spec.weights_id, inputs=tally.done, rows=tally.rows,
            # A committed run counts every row it holds, the ones an interrupted attempt staged included.
            predicted=record["predicted"] if record else tally.rows - tally.failed,
            errors=record["errors"] if record else tally.failed,
            errors_by_type=record["errors_by_type"] if record else dict(tally.errors_by_type.most_common()),
            resumed=run.resumed_inputs,
            already_done=max(0, listing["already_done"] - run.resumed_inputs),
            skipped_by_extension=listing["skipped"], duplicates=listing.get("duplicates", 0),
            committed_rows=record["rows"] if record else 0,
            model_actors=pool.describe(request), nodes_left=watch.nodes_left(), redone=redone,
            elapsed_s=round(tally.elapsed, 3), images_per_s=round(tally.rate, 2),
            started_at=run.info.attempts[-1], finished_at=_now(),
            files=[{"uri": file_uri(cfg.output.uri, f["path"]), "rows": f["rows"]} for f in record.get("files", [])]
            if record else [], message=message, detections=tally.detections,
            images_with_detections=tally.images_with_detections if tally.detections is not None else None,
            dicom_tags_written=written_tags(cfg), pseudonyms=key_id, output_format=cfg.output.format,
            committed=output.table.describe(record) if record else None,
            table_version=(record.get("version", record.get("snapshot_id")) if record else None),
            metadata_location=record.get("metadata_location") if record else None,
            timeline_s=dict(sorted(timeline.marks.items(), key=lambda item: item[1])),
            model_busy=ray.get(ledger.model_busy_fraction.remote()))
        output.write_summary(summary.to_json())
    print_summary(summary, out)
    if status == "stopped":
        raise JobStopped(message)
    return summary


def drain(dataset: ray.data.Dataset, sink: StagingSink, tally: Tally, cfg: JobConfig,
          lease: OutputLease, prepare: RowPseudonymizer | None = None,
          timeline: Timeline | None = None, samples: ProgressSamples | None = None,
          received: Callable[[list[str]], object] | None = None) -> tuple[str, str | None]:
    """Every prediction row into the sink, once; (status, message) at the end or at the error-rate stop.
    `prepare` turns each batch into what is written (pseudonymised) before anything stages or counts it;
    `received` is told each batch's inputs as they arrive (the ledger: only that settles an input)."""
    try:
        metrics = RunMetrics(cfg.output.uri)
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            lease.check()
            if received is not None:
                received(batch.column("uri").unique().to_pylist())
            if timeline is not None:
                timeline.mark("first_row")
            if prepare is not None:
                batch = prepare(batch)
            inputs, failed = tally.add(sink.add(batch))
            if samples is not None:
                samples.observe(tally.elapsed, tally.rows)
            metrics.record(inputs, failed, tally.rate)
            tally.check_error_rate(cfg.errors.max_error_rate, cfg.errors.min_inputs)
    except JobStopped as exc:
        return "stopped", f"{exc} (rows so far stay staged; rerunning the job resumes after them)"
    return "completed", None


def ledger_failure(exc: BaseException, ledger) -> BaseException:
    """One line for a job Ray gave up on: the ledger's reason, or a batch that lost its process too often."""
    reason = ray.get(ledger.failure.remote())
    if reason is None:
        lost = _process_loss(exc)
        if lost is None:
            return exc
        reason = (f"a batch of inputs lost its worker process {MAX_TASK_ATTEMPTS} times ({lost}), more than the "
                  f"inputs that kill a process explain")
    return JobFailed(f"{reason}; rows so far stay staged and rerunning the job resumes after them "
                     f"(Ray's logs: {_session_logs()})")


def _process_loss(exc: BaseException) -> str | None:
    """What Ray says was lost, when a task or actor died (not an exception raised by our own code)."""
    lost = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, lost):
            return type(exc).__name__
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _session_logs() -> str:
    try:
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:
        return "the Ray session's logs folder"


def row_pseudonymizer(cfg: JobConfig, schema, pseudonymizer: Pseudonymizer | None,
                      mapping: PseudonymMap | None) -> RowPseudonymizer | None:
    if pseudonymizer is None:
        return None
    uid_tags = [column_name(k) for k in instance_uid_tags(cfg.dicom.include_tags)] if cfg.dicom is not None else []
    return RowPseudonymizer(pseudonymizer, pseudonymized_columns(schema, uid_tags), mapping)


def build_dataset(cfg: JobConfig, spec: ModelSpec, storage: Storage, listing_tally,
                  history: History | None = None, pool: PoolPlan | None = None,
                  ledger: Ledger | None = None) -> ray.data.Dataset:
    context = ray.data.DataContext.get_current()
    default_block_size = context.target_max_block_size
    context.enable_progress_bars = False
    # Ray merges what a task yields into blocks of up to this many bytes before passing them on; at the
    # default (128 MiB) the listing would hand over nothing until ~1M keys were listed. A dataset captures
    # the context when it is created, so the setting is restored for anything built after ours.
    context.target_max_block_size = DICOM_BLOCK_BYTES if cfg.dicom is not None else BLOCK_BYTES
    rows_leave_each_batch(ModelActor)  # the driver gets rows a model batch at a time: the checkpoint cadence
    try:
        with warnings.catch_warnings():  # Ray 2.60 has no other way to bound a task's retries (max_retries=…)
            warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
            dataset = _build(cfg, spec, storage, listing_tally, history,
                             pool or plan_pool(cfg.compute, read_cluster())[0], ledger)
    finally:
        context.target_max_block_size = default_block_size
    return dataset


def _build(cfg: JobConfig, spec: ModelSpec, storage: Storage, listing_tally,
           history: History | None, pool: PoolPlan, ledger: Ledger | None) -> ray.data.Dataset:
    compute = cfg.compute
    listing = InputListing(cfg.input.uri, storage, cfg.input.extensions, history, exclude=cfg.output.uri)
    dataset = ray.data.read_datasource(ListingDatasource(listing, listing_tally), override_num_blocks=1,
                                       num_cpus=LIST_CPUS, ray_remote_args={"max_retries": MAX_TASK_ATTEMPTS - 1})
    # A read task walks its block of the listing 64 inputs at a time, fetching each 64 concurrently.
    # Holding no CPU, read tasks are bounded by count instead: each already has 64 fetches in flight.
    # Sized for the cluster as its autoscaler can make it: a head with no CPUs would otherwise get 2 for the night.
    read_tasks = max(2, int(pool.cluster_cpus) // 2)
    safe_errors = cfg.privacy.pseudonymize  # no library text in a message: it may spell the input's path
    dataset = dataset.map_batches(Reader(storage, cfg.input.max_file_bytes, safe_errors), batch_size=BLOCK_ROWS,
                                  num_cpus=READ_CPUS, memory=READ_MEMORY, max_retries=MAX_TASK_ATTEMPTS - 1,
                                  compute=ray.data.TaskPoolStrategy(size=read_tasks))
    decoder = Decoder(spec.preprocess, cfg.decode.max_image_pixels, spec.input_channels, dicom_settings(cfg.dicom),
                      safe_errors)
    num_gpus = pool.num_gpus
    decode_in_tasks = num_gpus > 0 and cfg.decode.device == "cpu"
    if cfg.decode.device == "gpu" and num_gpus == 0:
        raise UserError("decode.device: 'gpu' but the model actors get no GPU (the Ray cluster has none, or "
                        "compute.num_gpus_per_actor is 0); use 'auto' or 'cpu'")
    if decode_in_tasks:
        # The ledger turns an input that kills its process into an error row; Ray's retries only bound the rest.
        dataset = dataset.map_batches(decoder if ledger is None else Isolated(decoder, ledger.for_stage("decode"), "decode"),
                                      batch_size=None, num_cpus=DECODE_CPUS, max_retries=MAX_TASK_ATTEMPTS - 1)
    from pipeline.models.classify import Classifier
    from pipeline.models.detect import Detector

    actor_kwargs = {"stage": Detector if spec.task == "detection" else Classifier, "spec": spec, "storage": storage,
                    "decoder": None if decode_in_tasks else decoder, "decode_on_device": num_gpus > 0,
                    "ledger": ledger, "precision": compute.precision, "channels_last": compute.channels_last,
                    "num_threads": max(1, int(compute.num_cpus_per_actor))}
    if spec.task == "detection":
        actor_kwargs["max_batch_megapixels"] = compute.max_batch_megapixels
    return dataset.map_batches(
        ModelActor,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=compute.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors,
                                           max_tasks_in_flight_per_actor=tasks_in_flight(spec, num_gpus)),
        num_cpus=compute.num_cpus_per_actor,
        num_gpus=num_gpus,
        # Besides reserving room for the model, a memory request keeps the actors' remote args apart from
        # the tasks before them, which Ray would otherwise fuse into the actors.
        memory=int(compute.memory_per_actor_gb * 2**30),
        # Ray Data's default retries a lost batch forever; an actor restarts only for a batch it may still retry.
        max_task_retries=MAX_TASK_ATTEMPTS - 1,
    )


def tasks_in_flight(spec: ModelSpec, num_gpus: float) -> int | None:
    """Blocks queued at each model actor. A detector on a CPU core spends seconds on one block (~14 photos), so
    a queue only piles a small job's few blocks onto one actor while the others idle: one at a time there.
    Elsewhere Ray's default queue hides the hand-off between blocks."""
    return 1 if spec.task == "detection" and num_gpus == 0 else None


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """The listing's tally lives and dies with the driver's node (see ListingDatasource.supports_distributed_reads)."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def start_ray(address: str | None, console: Console | None = None) -> str:
    """Start a local Ray, or join the one at `address`; returns what it is, for the console. Ray's own output stays
    off the console: workers' and agents' lines stay in the session's logs (log_to_driver), and with `console`, so
    does what Ray writes into this process (console.py). A local Ray's processes end with this process (reaper.py)."""
    if ray.is_initialized():
        return "already started in this process"
    quiet_ray_loggers()
    # Joining a cluster is only ever on purpose: Ray's own default (address None) would join whatever cluster a
    # `ray start` left on this machine, or wait minutes for one that has died.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # A local Ray's workers inherit this environment: let them import what the driver can from here
        # (a custom `module:build_fn` next to the job spec). A cluster needs it installed in its image.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    try:
        context = ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                           configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "a new local Ray" if address == "local" else address
        raise UserError(f"compute.ray_address: cannot start or join Ray at {where} "
                        f"({type(exc).__name__}: {exc}); check RAY_ADDRESS / compute.ray_address") from None
    session_dir = getattr(context, "address_info", {}).get("session_dir")  # none through a Ray Client (ray://)
    if address == "local" and session_dir:
        _REAPERS.append(start_reaper(session_dir))
    if console is not None and session_dir:
        console.divert(os.path.join(session_dir, "logs"))
        # Ray's deprecation notices are for this package's developers (the tests show them), not a job's user.
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    resources = ray.cluster_resources()
    size = ", ".join(f"{resources[key]:g} {name}" for key, name in (("CPU", "CPUs"), ("GPU", "GPUs"))
                     if resources.get(key))
    return f"{'a new local Ray' if address == 'local' else address}, {size or 'no CPUs yet'}" + \
        (f"; its logs in {session_dir}/logs" if session_dir else "")


_REAPERS: list = []  # one per local Ray this process started: each ends its session when this process ends


def quiet_ray_loggers() -> None:
    """Ray's informational chatter would drown our own progress lines; its real warnings still reach its logs."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for chatty in ("ray.data._internal.progress", "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    # Ray Data warns when a small job has fewer blocks than the pool has tasks or actors: expected, not a fault.
    warnings.filterwarnings("ignore", message=r"The (maximum|minimum) number of concurrent", category=UserWarning)


def say(out: TextIO, text: str) -> None:
    """A line about what the job is doing while it starts, before the progress line takes over."""
    print(f"  {text}", file=out, flush=True)


def with_absolute_paths(cfg: JobConfig) -> JobConfig:
    """Local paths resolved on the driver, where the user typed them."""
    cfg = cfg.model_copy(deep=True)
    cfg.input.uri = absolute(cfg.input.uri)
    cfg.output.uri = absolute(cfg.output.uri)
    if cfg.privacy.mapping_uri:
        cfg.privacy.mapping_uri = absolute(cfg.privacy.mapping_uri)
    for attr in ("weights", "labels"):
        value = getattr(cfg.model, attr)
        if value and (attr == "labels" or cfg.model.checkpoint):
            setattr(cfg.model, attr, absolute(value))
    return cfg


def print_summary(s: RunSummary, out: TextIO) -> None:
    errors = ", ".join(f"{kind} {n:,}" for kind, n in s.errors_by_type.items())
    lines = [
        f"Run {s.run_id} {s.status} in {s.elapsed_s:.1f}s",
        f"  inputs      {s.inputs:,}" + (f"  ({s.skipped_by_extension:,} other files skipped by "
                                         f"input.extensions)" if s.skipped_by_extension else ""),
        *([f"  duplicates  {s.duplicates:,}  (manifest entries naming an input listed before; one row each)"]
          if s.duplicates else []),
        *([f"  resumed     {s.resumed:,}  (staged by the interrupted attempt, not redone)"] if s.resumed else []),
        *([f"  unchanged   {s.already_done:,}  (done by earlier runs; --full redoes them)"] if s.already_done
          else []),
        f"  predicted   {s.predicted:,}",
        f"  errors      {s.errors:,}" + (f"  ({errors})" if errors else ""),
        *([f"  rows        {s.rows:,}  (a row per frame of multi-frame DICOM files)"] if s.rows != s.inputs
          else []),
        *([f"  detections  {s.detections:,} in {s.images_with_detections:,} images"] if s.detections is not None
          else []),
        *([f"  DICOM tags  {', '.join(s.dicom_tags_written)}" + identifying_note(s.dicom_tags_written)]
          if s.dicom_tags_written is not None else []),
        *([f"  privacy     uri and DICOM UIDs written as keyed tokens (hmac:…; key id {s.pseudonyms})"]
          if s.pseudonyms else []),
        *([f"  nodes left  {', '.join(f'{n} {why}' for why, n in s.nodes_left.items())}"] if s.nodes_left else []),
        *([f"  redone      {s.redone:,} inputs, lost with a node or a crashed worker process (output complete, "
           "once)"] if s.redone else []),
        f"  images/s    {s.images_per_s:,.1f}",
        f"  output      {s.output}  ({s.committed}, {s.committed_rows:,} rows committed"
        + (f"; record in _commits/{s.run_id}.json)" if s.output_format == "parquet" else ")")
        if s.status == "completed" else
        f"  output      {s.output}  (nothing committed; rows so far are staged for the rerun)",
        *([f"  metadata    {s.metadata_location}  (DuckDB: iceberg_scan('<it>', snapshot_from_id => "
           f"{s.table_version}))"] if s.metadata_location and s.status == "completed" else []),
    ]
    if s.inputs == 0 and not s.resumed and not s.already_done:
        lines.append(f"  note: nothing to do under {s.input}; check the URI and input.extensions")
    print("\n".join(lines), file=out, flush=True)


def file_uri(output_uri: str, path: str) -> str:
    """A committed file's URI: formats record paths relative to the output (folder, Delta) or absolute (Iceberg)."""
    return path if "://" in path or path.startswith("/") else join(output_uri, path)


def written_tags(cfg: JobConfig) -> list[str] | None:
    """The DICOM attributes a DICOM job's rows carry: the keys, the modality, and what the job allow-listed."""
    return list(KEY_TAGS) + list(cfg.dicom.include_tags) if cfg.dicom is not None else None


def identifying_note(tags: list[str]) -> str:
    flagged = [t for t in tags if t in IDENTIFYING]
    return f"  (patient-identifying, allow-listed by the job: {', '.join(flagged)})" if flagged else \
        "  (no patient-identifying attributes)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
