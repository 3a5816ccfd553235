"""The local executor: a job on this machine without Ray. This process lists the inputs and writes the rows; one
model process (worker.py) reads, decodes (in threads) and runs the model over chunks of inputs, using every core.

An input that kills the model process becomes its error row, as on Ray (run/isolation.py): the chunks in flight
when the process died are run again one input at a time, and an input that kills it alone is not tried again.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa

from pipeline.io.storage import Storage
from pipeline.job.config import ComputeConfig, JobConfig
from pipeline.job.errors import JobFailed, UserError
from pipeline.job.stage import Stage
from pipeline.local.process import WorkerDied, WorkerProcess, new_log_dir
from pipeline.run.counts import ListingCounts
from pipeline.run.executor import EngineFacts, ListedRows
from pipeline.run.isolation import BUILD_CRASH_MESSAGE, BUILD_DEATHS
from pipeline.run.job import run_job
from pipeline.run.plan import StagePlan

if TYPE_CHECKING:
    from pipeline.models.spec import ModelSpec

# Deaths of the model process with no good row between them before the job stops: a process that dies whatever
# it is given (memory, a broken install) would otherwise be restarted once for every input. Each input that kills
# it costs two, and a chunk may hold several such inputs: 16, as Ray's attempts at one block (ray/adapter.py).
MAX_DEATHS_IN_A_ROW = 16
# Chunks in the model process at once: enough that the model never waits for a read or a decode (measured:
# docs/performance.md), few enough that the decoded pixels waiting stay small.
CHUNKS_IN_FLIGHT = 4


@dataclass(frozen=True)
class LocalPool:
    cluster_cpus: float
    num_gpus: float
    min_actors: int = 1
    max_actors: int = 1
    cpu_decode_apart: bool = True  # decoding in threads beside the model, not in the model's thread
    cpus_each: float = 1  # torch threads to start with: the model process shares the cores out as it runs

    def describe(self) -> str:
        where = "a GPU" if self.num_gpus else f"{self.cluster_cpus:g} CPUs shared with decoding, no GPU"
        return f"model: one process on this machine, {where}; reading and decoding in threads beside it"


class LocalExecutor:
    name = "the local executor"

    def __init__(self, worker: WorkerProcess | None = None):
        """`worker`: a model process started earlier (`start_model_process`), already importing torch."""
        self.log_dir = worker.log_dir if worker is not None else new_log_dir()
        self.worker = worker
        self.gpus = 0

    def start(self) -> str:
        self.worker = self.worker or WorkerProcess(self.log_dir)
        return f"this machine, {usable_cores()} CPUs, no Ray; the model process's log in {self.log_dir}"

    def check_model(self, cfg: JobConfig, storage: Storage) -> "CheckedModel":
        self.start()
        request = ("check", cfg.model, storage)
        self.worker.send(*request)
        return CheckedModel(self, request)

    def pool(self, compute: ComputeConfig) -> LocalPool:
        gpus = min(self.gpus, 1) if compute.num_gpus_per_actor == "auto" else float(compute.num_gpus_per_actor)
        return LocalPool(cluster_cpus=float(usable_cores()), num_gpus=gpus)

    def run(self, plan: StagePlan, output_uri: str) -> "LocalRows":
        return LocalRows(plan, self)

    def fresh_worker(self) -> WorkerProcess:
        self.close()
        self.worker = WorkerProcess(self.log_dir)
        return self.worker

    def close(self) -> None:
        """The model process ends (it also ends with this process, when its socket closes)."""
        if self.worker is not None:
            self.worker.stop()


class CheckedModel:
    """The model check's answer, awaited when the story needs it (run/job.py); a process that dies checking it is
    given one more try, as a Ray actor building it would be."""

    def __init__(self, executor: LocalExecutor, request: tuple):
        self.executor = executor
        self.request = request

    def result(self) -> ModelSpec:
        for deaths in range(1, BUILD_DEATHS + 1):
            try:
                _, spec, gpus = self.executor.worker.receive()
                self.executor.gpus = gpus
                return spec
            except WorkerDied:
                if deaths == BUILD_DEATHS:
                    raise JobFailed(f"{BUILD_CRASH_MESSAGE.format(deaths=deaths)} (the model process's log: "
                                    f"{self.executor.worker.log_path})") from None
                self.executor.fresh_worker().send(*self.request)


@dataclass
class Chunk:
    id: int
    table: pa.Table
    alone: bool = False  # one input, sent while nothing else is in flight
    deaths: int = 0  # model processes that died holding it
    crashed: tuple[str, int] | None = None  # (stage, deaths): write it as that stage's crash error row


class LocalRows(ListedRows):
    """The plan's rows from the model process, restarting it when it dies (run/executor.py's `Rows`)."""

    def __init__(self, plan: StagePlan, executor: LocalExecutor):
        self.plan = plan
        self.executor = executor
        self.counts = ListingCounts()
        self.cores = usable_cores()
        self.chunk_rows = next((s.resources.batch_size for s in plan.stages if s.resources.stateful), None) or 32
        self.ids = itertools.count(1)
        self.in_flight: dict[int, Chunk] = {}
        self.triage = Triage(self.ids, plan.stages[-1].name)
        self.build_deaths = 0
        self.ready = False
        self.clock = ModelClock()

    def __iter__(self) -> Iterator[pa.Table]:
        chunks = self.chunks()
        self.send_stages(self.executor.worker)
        try:
            while True:
                self.send_more(chunks)
                if not (self.in_flight or self.triage.suspects or self.triage.again):
                    return  # the listing is done and every chunk's rows are in
                try:
                    message = self.executor.worker.receive()
                except WorkerDied:
                    self.after_death()
                    continue
                table = self.on_message(message)
                if table is not None:
                    yield table
        finally:
            self.executor.worker.stop()

    def chunks(self) -> Iterator[Chunk]:
        for block in self.plan.source.blocks(self.counts.listing_add):
            for start in range(0, block.num_rows, self.chunk_rows):
                yield Chunk(next(self.ids), rows_of(block, start, self.chunk_rows))
        self.counts.listing_finished()

    def send_stages(self, worker: WorkerProcess) -> None:
        self.ready = False
        worker.send("stages", self.plan.stages, self.cores)

    def send_more(self, chunks: Iterator[Chunk]) -> None:
        """Keep the worker's threads busy; after a death, each suspect alone, with nothing else in flight."""
        if self.triage.suspects or any(chunk.alone for chunk in self.in_flight.values()):
            if not self.in_flight and self.ready and self.triage.suspects:
                self.send(self.triage.suspects.popleft())
            return
        while len(self.in_flight) < max(CHUNKS_IN_FLIGHT, self.cores):
            chunk = self.triage.again.popleft() if self.triage.again else next(chunks, None)
            if chunk is None:
                return
            self.send(chunk)

    def send(self, chunk: Chunk) -> None:
        self.in_flight[chunk.id] = chunk
        self.clock.inputs_started += chunk.table.num_rows
        self.executor.worker.send("chunk", chunk.id, chunk.table, chunk.alone, chunk.crashed)

    def on_message(self, message: tuple) -> pa.Table | None:
        kind, *args = message
        if kind == "ready":
            self.ready = True
            self.build_deaths = 0
        elif kind == "started":
            self.triage.started.add(args[0])
        elif kind == "stage":
            self.triage.stage_of[args[0]] = args[1]
        elif kind == "rows":
            chunk_id, table, busy_s = args
            self.triage.settled(self.in_flight.pop(chunk_id))
            self.clock.rows_in(busy_s)
            return table
        return None

    def after_death(self) -> None:
        """The model process died: blame what it held, start another."""
        log = self.executor.worker.log_path
        if not self.ready:
            self.build_deaths += 1
            if self.build_deaths >= BUILD_DEATHS:
                raise JobFailed(f"{BUILD_CRASH_MESSAGE.format(deaths=self.build_deaths)} (the model process's log: "
                                f"{log})")
        self.triage.died(list(self.in_flight.values()), log)
        self.in_flight.clear()
        self.send_stages(self.executor.fresh_worker())

    def facts(self) -> EngineFacts:
        return self.clock.facts()


class Triage:
    """Who killed the model process. The chunks it had started are run again one input at a time, each alone; an
    input it dies with alone becomes its crash's error row (written by the stage it died in, as on Ray). Chunks it
    had not started go again as they were. Every death is bounded: MAX_DEATHS_IN_A_ROW without a good row."""

    def __init__(self, ids: Iterator[int], last_stage: str):
        self.ids = ids
        self.last_stage = last_stage
        self.suspects: deque[Chunk] = deque()  # to run one at a time, before anything else
        self.again: deque[Chunk] = deque()  # not started when the process died: sent again first
        self.started: set[int] = set()  # chunks the process said it had begun
        self.stage_of: dict[int, str] = {}  # a chunk run alone -> the stage it was in, as the worker said
        self.deaths_in_a_row = 0  # since the last row that was not a crash's

    def died(self, held: list[Chunk], log: str) -> None:
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row > MAX_DEATHS_IN_A_ROW:
            raise JobFailed(f"the model process died {self.deaths_in_a_row} times in a row without a good row: more "
                            "than inputs that crash it explain (memory, a broken install?); rows so far stay staged "
                            f"and rerunning the job resumes after them (its log: {log})")
        for chunk in reversed(held):  # the listing's order kept, at the front of each queue
            if chunk.alone:
                deaths = chunk.deaths + 1
                stage = self.stage_of.pop(chunk.id, None) or self.last_stage
                self.suspects.appendleft(Chunk(chunk.id, chunk.table, True, deaths, crashed=(stage, deaths)))
            elif chunk.id in self.started:
                self.suspects.extendleft(reversed([Chunk(next(self.ids), rows_of(chunk.table, row, 1), True,
                                                         chunk.deaths + 1) for row in range(chunk.table.num_rows)]))
            else:
                self.again.appendleft(chunk)
        self.started.clear()

    def settled(self, chunk: Chunk) -> None:
        self.stage_of.pop(chunk.id, None)
        self.started.discard(chunk.id)
        if chunk.crashed is None:
            self.deaths_in_a_row = 0


def rows_of(table: pa.Table, start: int, count: int) -> pa.Table:
    """A copy of `count` rows: a slice would carry its whole block's buffers when it is pickled."""
    return table.take(list(range(start, min(start + count, table.num_rows))))


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, within a cgroup's CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@dataclass
class ModelClock:
    """How the model process spent the run, for the summary."""
    inputs_started: int = 0  # sent to the model process, reruns included
    busy_s: float = 0.0
    span: tuple[float, float] | None = None
    first_rows_at: float | None = None

    def rows_in(self, busy_s: float) -> None:
        now = time.monotonic()
        self.busy_s += busy_s
        self.span = ((self.span or (now - busy_s, now))[0], now)
        self.first_rows_at = self.first_rows_at or time.time()

    def facts(self) -> EngineFacts:
        busy = None
        if self.span is not None and self.span[1] > self.span[0]:
            busy = round(min(1.0, self.busy_s / (self.span[1] - self.span[0])), 3)
        return EngineFacts(inputs_started=self.inputs_started, model_busy=busy, first_model_batch_at=self.first_rows_at)


def run_locally(cfg: JobConfig, out=None, progress_interval: float | None = None,
                worker: WorkerProcess | None = None):
    """The job's run (run/job.py) on this machine, without Ray; `worker`: its model process, if started already."""
    executor = LocalExecutor(worker)
    try:
        if cfg.compute.ray_address:
            raise UserError("compute.executor: local runs the job on this machine, but compute.ray_address names a "
                            "cluster; drop one of them (or use --executor ray)")
        return run_job(cfg, executor, out or sys.stdout, progress_interval)
    finally:
        executor.close()  # also when the job stops before its rows: a refused output, a bad model
