"""Planned stages into one streaming Ray Data dataset, from their declarations (pipeline/job/stage.py) only.

A stateful stage becomes an actor pool (set up once per actor), any other a pool of tasks; each stage's operator
is named after it. A stage that isolates crashes reports each batch to the run's ledger (run/isolation.py).
Every Ray retry is bounded at MAX_TASK_ATTEMPTS, so a job that cannot go on ends in one line, never stalls.
"""

from __future__ import annotations

import time
import warnings

import ray

from pipeline.job.stage import Batch, Stage
from pipeline.ray.blocks import rows_leave_each_batch
from pipeline.ray.datasource import ListingDatasource
from pipeline.ray.metrics import BatchLatency
from pipeline.run.isolation import Isolated, Ledger
from pipeline.run.plan import StagePlan

# Attempts Ray makes at one task (a block of inputs) whose process was lost, before the job fails in one line. An
# input that kills its process costs two (run/isolation.py); a block holding several poison inputs costs one more
# for each, and a preempted node one: 16 leaves room for both and still ends a job that cannot go on.
MAX_TASK_ATTEMPTS = 16


def dataset_for(plan: StagePlan, listing_counts, ledger: Ledger | None = None) -> ray.data.Dataset:
    """The dataset running `plan`; `listing_counts`: an actor that keeps the listing's counts (ray/ledger.py)."""
    context = ray.data.DataContext.get_current()
    default_block_size = context.target_max_block_size
    context.enable_progress_bars = False
    # A dataset captures the context when it is created: the setting is restored for anything built after ours.
    context.target_max_block_size = plan.block_bytes
    try:
        with warnings.catch_warnings():  # Ray 2.60 has no other way to bound a task's retries (max_retries=…)
            warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
            source = plan.source
            dataset = ray.data.read_datasource(ListingDatasource(source, listing_counts), override_num_blocks=1,
                                               num_cpus=source.resources.cpus,
                                               ray_remote_args={"max_retries": MAX_TASK_ATTEMPTS - 1})
            for stage in plan.stages:
                dataset = map_stage(dataset, stage, ledger)
    finally:
        context.target_max_block_size = default_block_size
    return dataset


def map_stage(dataset: ray.data.Dataset, stage: Stage, ledger: Ledger | None) -> ray.data.Dataset:
    """One stage as Ray Data's map_batches: its resources, its pool, its retries bounded."""
    need = stage.resources
    # A memory request also keeps neighbouring stages apart: Ray fuses stages whose requests are equal into one.
    options = {"batch_size": need.batch_size, "num_cpus": need.cpus, "num_gpus": need.gpus or None,
               "memory": need.memory or None}
    options = {key: value for key, value in options.items() if value is not None}
    stage_ledger = ledger.for_stage(stage.name) if ledger is not None and stage.isolates_crashes else None
    if need.stateful:
        low, high = need.concurrency if isinstance(need.concurrency, tuple) else (need.concurrency or 1,) * 2
        actor = named(StageActor, stage)
        rows_leave_each_batch(actor)  # the driver gets rows a batch at a time: the checkpoint cadence
        return dataset.map_batches(
            actor, fn_constructor_kwargs={"stage": stage, "ledger": stage_ledger},
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=need.queue),
            # Ray Data's default retries a lost batch forever; an actor restarts only for a batch it may retry.
            max_task_retries=MAX_TASK_ATTEMPTS - 1, **options)
    task = named(StageTask, stage)(stage)
    run = task if stage_ledger is None else named(Isolated, stage)(task, stage_ledger, stage.name)
    compute = ray.data.TaskPoolStrategy(size=need.concurrency) if isinstance(need.concurrency, int) else None
    return dataset.map_batches(run, compute=compute, max_retries=MAX_TASK_ATTEMPTS - 1, **options)


def named(kind: type, stage: Stage) -> type:
    """`kind` under the stage's class name, which Ray gives the stage's operator (its logs, its dashboard)."""
    return type(type(stage).__name__, (kind,), {"__module__": kind.__module__})


class StageActor:
    """What each actor of a stateful stage runs: the stage set up once, each batch timed and isolated."""

    def __init__(self, stage: Stage, ledger: Ledger | None = None):
        if ledger is not None:  # a process that dies setting the stage up is restarted by Ray: bounded here
            ledger.building()
        stage.setup()
        if ledger is not None and getattr(stage, "claims_content", False):  # one model call per content in the run
            stage.use_claims(ledger.claim)
        self.stage = stage
        self.latency = BatchLatency(stage.name)
        self.run = Isolated(self.timed, ledger, stage.name) if ledger is not None else self.timed
        if ledger is not None:
            ledger.built()

    def __call__(self, batch: Batch) -> Batch:
        return self.run(batch)

    def timed(self, batch: Batch) -> Batch:
        started = time.perf_counter()
        batch = self.stage.process(batch)
        self.latency.observe(time.perf_counter() - started)
        return batch


class StageTask:
    """What a task of a stateless stage runs: the stage set up before its first batch."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.ready = False

    def __call__(self, batch: Batch) -> Batch:
        if not self.ready:
            self.stage.setup()
            self.ready = True
        return self.stage.process(batch)
