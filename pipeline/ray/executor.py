"""The Ray executor: checks the model in a thread of the driver while Ray starts, runs a plan of stages as one
streaming Ray Data dataset and hands its rows to the driver.

The driver consumes prediction rows (a few hundred bytes each) with `iter_batches`; one small actor on the
driver's node, the run's ledger (ledger.py), keeps the listing's counts and the crash-isolation books.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, TextIO

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.io.storage import Storage
from pipeline.job.config import ComputeConfig, JobConfig
from pipeline.job.errors import JobFailed
from pipeline.ray.adapter import MAX_TASK_ATTEMPTS, dataset_for
from pipeline.ray.cluster import ClusterWatch, PoolPlan, plan_pool, read_cluster
from pipeline.ray.console import Console
from pipeline.ray.ledger import BatchLedger, RayLedger
from pipeline.ray.metrics import RunMetrics
from pipeline.ray.session import session_logs, start_ray
from pipeline.run.checks import check_model
from pipeline.run.executor import EngineFacts
from pipeline.run.job import run_job
from pipeline.run.summary import RunSummary
from pipeline.run.plan import StagePlan


class RayExecutor:
    name = "Ray"

    def __init__(self, address: str | None = None, console: Console | None = None):
        self.address = address
        self.console = console
        self.watch: ClusterWatch | None = None

    def check_model(self, cfg: JobConfig, storage: Storage) -> Future:
        """In a thread of the driver while Ray starts in this one (its processes are tied to the thread that
        launched them)."""
        checking = ThreadPoolExecutor(1, thread_name_prefix="model-check")
        try:
            return checking.submit(check_model, cfg, storage)
        finally:
            checking.shutdown(wait=False)

    def start(self) -> str:
        return start_ray(self.address, self.console)

    def pool(self, compute: ComputeConfig) -> PoolPlan:
        cluster = read_cluster()
        pool, request = plan_pool(compute, cluster)
        self.watch = ClusterWatch(request, cluster.node_types, ray.nodes())
        return pool

    def run(self, plan: StagePlan, output_uri: str) -> "RayRows":
        ledger = BatchLedger.options(scheduling_strategy=on_driver_node()).remote()
        return RayRows(dataset_for(plan, ledger, RayLedger(ledger)), ledger, self.watch, RunMetrics(output_uri))


class RayRows:
    """A running dataset's rows, with what its ledger and the cluster say (run/executor.py's `Rows`)."""

    def __init__(self, dataset: ray.data.Dataset, ledger, watch: ClusterWatch | None, metrics: RunMetrics):
        self.dataset = dataset
        self.ledger = ledger
        self.watch = watch
        self.metrics = metrics

    def __iter__(self) -> Iterator[pa.Table]:
        try:
            yield from self.dataset.iter_batches(batch_format="pyarrow", batch_size=None)
        except ray.exceptions.RayError as exc:
            raise ledger_failure(exc, self.ledger) from None

    def received(self, uris: list[str]) -> None:
        self.ledger.received.remote(uris)

    def listing(self) -> dict:
        return ray.get(self.ledger.listing_get.remote())

    def progress(self, inputs: int, failed: int, rate: float) -> None:
        self.metrics.record(inputs, failed, rate)

    def waiting(self) -> str | None:
        return self.watch.poll() if self.watch is not None else None

    def facts(self) -> EngineFacts:
        if self.watch is not None:
            self.watch.poll()
        ledger = self.ledger
        started, busy, first = ray.get([ledger.model_inputs_started.remote(), ledger.model_busy_fraction.remote(),
                                        ledger.model_first_finished_at.remote()])
        return EngineFacts(inputs_started=started, model_busy=busy, first_model_batch_at=first,
                           nodes_left=self.watch.nodes_left() if self.watch is not None else {})


def ledger_failure(exc: BaseException, ledger) -> BaseException:
    """One line for a job Ray gave up on: the ledger's reason, a JobFailed our own code raised in a task (the
    listing's, pipeline/io/listing.ListingFailed) as it was raised, or a batch that lost its process too often."""
    reason = ray.get(ledger.failure.remote())
    if reason is None and (ours := own_failure(exc)) is not None:
        return ours
    if reason is None:
        lost = process_loss(exc)
        if lost is None:
            return exc
        reason = (f"a batch of inputs lost its worker process {MAX_TASK_ATTEMPTS} times ({lost}), more than the "
                  f"inputs that kill a process explain")
    return JobFailed(f"{reason}; rows so far stay staged and rerunning the job resumes after them "
                     f"(Ray's logs: {session_logs()})")


def own_failure(exc: BaseException) -> JobFailed | None:
    """The JobFailed a task raised, unwrapped from Ray's error (whose text is a traceback), if that is the cause:
    its own line only (Ray Data appends lines of retry advice to a task's exception)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, JobFailed) and not isinstance(exc, ray.exceptions.RayError):
            return JobFailed((str(exc).splitlines() or [""])[0])
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def process_loss(exc: BaseException) -> str | None:
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


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """The ledger lives and dies with the driver's node (see ListingDatasource.supports_distributed_reads)."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def run_on_ray(cfg: JobConfig, out: TextIO | None = None, console: Console | None = None,
               progress_interval: float | None = None) -> RunSummary:
    """The job's run (run/job.py) on a local Ray or the cluster the job names; `console`: the `pipeline` command's."""
    out = out or (console.out if console is not None else sys.stdout)
    return run_job(cfg, RayExecutor(cfg.compute.ray_address, console), out, progress_interval)
