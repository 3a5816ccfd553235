"""Poison inputs: an input that kills the process handling it (a native crash, memory beyond the node) becomes a
`<stage>.worker_crashed` error row instead of stalling the job. `Isolated` wraps a stage's batch function and reports
each batch's start and end to a `Ledger` (ray/ledger.py serves a `LedgerBook` from an actor); the driver tells it
which inputs' rows it has received. A poison input costs two process deaths. `BuildBook` counts the deaths of
actors building their stage. Why: docs/design-notes.md#pipelinerunisolationpy"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np

from pipeline.job.rows import error_columns

BUILD_DEATHS = 2  # an actor whose process died this many times building the model ends the job (one line)
BUILD_CRASH_MESSAGE = ("a model actor's process died {deaths} times while building the model (a native crash, "
                       "an abort or memory beyond the node while loading it), so the job stops: check the model "
                       "runs on this node type (load it in a Python shell there); Ray's logs hold the crash")
CRASH_MESSAGE = ("the worker process died {deaths} times while handling this input (the last with it alone), so it "
                 "was not tried again: a native crash (SIGSEGV, abort) in a decoder or the model, or memory beyond "
                 "what the node has")


class Ledger(Protocol):
    def start(self, uris: list[str]) -> bool:
        """Count a batch's inputs as started; True when any of them started before and never ended (a rerun)."""

    def begin_input(self, uri: str) -> int:
        """About to handle one input of a rerun alone; returns the process deaths it caused (0: go ahead)."""

    def finish(self, uris: list[str]) -> None:
        """The batch ended (its rows are returned, not yet received by the driver)."""

    def building(self) -> None:
        """This process starts building its stage; raises ModelBuildCrashed when earlier ones died doing so."""

    def built(self) -> None:
        """This process has built its stage."""


class ModelBuildCrashed(RuntimeError):
    """Raised in an actor's constructor, so that Ray gives up on it (a crash there would restart it forever)."""


class Isolated:
    """A batch function, run so that an input that kills its process is written as an error row."""

    def __init__(self, run: Callable[[dict], dict], ledger: Ledger, stage: str):
        self.run = run
        self.ledger = ledger
        self.stage = stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        uris = list(dict.fromkeys(map(str, batch["uri"])))  # inputs: a DICOM file's frames are one
        rerun = self.ledger.start(uris)
        result = self.one_input_at_a_time(batch) if rerun else self.run(batch)
        self.ledger.finish(uris)
        return result

    def one_input_at_a_time(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for rows in rows_by_input(batch["uri"]):
            part = {name: column[rows] for name, column in batch.items()}
            deaths = self.ledger.begin_input(str(part["uri"][0]))
            if deaths:  # the stage passes a row that already failed through untouched
                errors, error_types = error_columns(part)
                errors[:] = f"{self.stage}: {CRASH_MESSAGE.format(deaths=deaths)}"
                error_types[:] = f"{self.stage}.worker_crashed"
                part.update(error=errors, error_type=error_types)
            parts.append(self.run(part))
        return {name: concat([p[name] for p in parts]) for name in parts[0]}


def rows_by_input(uris: np.ndarray) -> list[np.ndarray]:
    """Row indexes of each input, in first-seen order (a DICOM file's frames are rows of one input)."""
    order: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        order.setdefault(str(uri), []).append(i)
    return [np.array(rows) for rows in order.values()]


def concat(columns: list[np.ndarray]) -> np.ndarray:
    if columns[0].dtype == object:  # ragged items (whole images, lists) must stay items, not be broadcast
        joined = np.empty(sum(len(c) for c in columns), dtype=object)
        for i, item in enumerate(item for column in columns for item in column):
            joined[i] = item
        return joined
    return np.concatenate(columns)


class LedgerBook:
    """The ledger's state, apart from Ray (ray/ledger.BatchLedger serves it from an actor, one book per stage).

    Keyed by input, not by batch: Ray may regroup a lost batch's rows when it hands them out again. `worker` is
    the process calling, so an input is blamed only if its process died while handling it alone. An input stays
    open from its first start until the driver receives its row (`received`), so memory holds what is in flight.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.inputs_started = 0  # every start, reruns included: the driver's count of inputs redone
        self.first_finished_at: float | None = None  # wall-clock time the first batch ended (the run's timeline)
        self.busy_s = 0.0  # worker-seconds spent inside batches: with the span, how busy the stage's workers were
        self.batch_started: dict[str, float] = {}  # worker -> when its current batch started
        self.workers: set[str] = set()
        self.span: tuple[float, float] | None = None  # first batch start, last batch end
        self.open: dict[str, int] = {}  # input -> starts, until the driver receives its row
        self.alone: dict[str, str] = {}  # worker -> the input it last handled alone (kept until it starts more)
        self.crashed: dict[str, int] = {}  # input -> process deaths while it was handled alone

    def start(self, worker: str, uris: list[str]) -> bool:
        now = self.clock()
        self.batch_started[worker] = now
        self.workers.add(worker)
        self.span = (self.span or (now, now))[0], now
        self.inputs_started += len(uris)
        self.alone.pop(worker, None)  # this process lived on past the input it last handled alone
        lost_alone = {uri: w for w, uri in self.alone.items()}
        rerun = False
        for uri in uris:
            if uri in lost_alone:  # its worker never ended that batch: the process died with it
                self.crashed[uri] = self.crashed.get(uri, 0) + 1
                del self.alone[lost_alone[uri]]
            rerun = rerun or uri in self.open
            self.open[uri] = self.open.get(uri, 0) + 1
        return rerun

    def busy_fraction(self) -> float | None:
        """Of the time between the first batch's start and the last one's end, the share the workers spent in
        batches; well below 1, they waited for input (or for their own start)."""
        if self.span is None or self.span[1] <= self.span[0]:
            return None
        return round(self.busy_s / (len(self.workers) * (self.span[1] - self.span[0])), 3)

    def begin_input(self, worker: str, uri: str) -> int:
        if uri in self.crashed:
            return self.crashed[uri] + 1  # and the death of its whole batch before
        self.alone[worker] = uri
        return 0

    def finish(self, worker: str, uris: list[str]) -> None:
        if self.first_finished_at is None:
            self.first_finished_at = time.time()
        now = self.clock()
        if worker in self.batch_started:
            self.busy_s += now - self.batch_started.pop(worker)
            self.span = (self.span or (now, now))[0], now

    def received(self, uris: list[str]) -> None:
        """The driver has these inputs' rows: a later start is no rerun, and nothing about them is kept."""
        for uri in uris:
            self.open.pop(uri, None)
            self.crashed.pop(uri, None)


class BuildBook:
    """Which actors died while building their stage, by Ray's actor id (the same across its restarts): a
    restarted actor whose last incarnation never finished building died doing so."""

    def __init__(self):
        self.building: dict[str, int] = {}  # actor -> deaths while building, while it builds again
        self.failure: str | None = None

    def start(self, actor: str) -> int:
        """An incarnation of `actor` starts building; the deaths of those before it that never finished."""
        deaths = self.building.get(actor, -1) + 1
        self.building[actor] = deaths
        if deaths >= BUILD_DEATHS:
            self.failure = BUILD_CRASH_MESSAGE.format(deaths=deaths)
        return deaths

    def done(self, actor: str) -> None:
        self.building.pop(actor, None)
