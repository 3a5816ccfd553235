"""What the story of a run asks of an engine (pipeline/ray/executor.py, pipeline/local/executor.py): start, check
the model where it will run, say what pool of model processes the job gets, and run a plan of stages, handing rows
back as they arrive. `choose_executor` picks one for a job."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Literal, Protocol

import pyarrow as pa

from pipeline.io.storage import Storage
from pipeline.job.config import ComputeConfig, JobConfig
from pipeline.run.counts import ListingCounts
from pipeline.run.plan import Pool, StagePlan

if TYPE_CHECKING:
    from pipeline.models.spec import ModelSpec


@dataclass
class EngineFacts:
    """What only the engine saw, for the summary, once the rows are in."""
    inputs_started: int = 0  # by the model stage, reruns included: the surplus over the rows is what was redone
    model_busy: float | None = None  # share of their time the model processes spent in batches
    first_model_batch_at: float | None = None  # time.time() of the first model batch's end
    nodes_left: dict[str, int] = field(default_factory=dict)  # nodes that left mid-run, by why


class Rows(Protocol):
    """A running plan: prediction rows as they reach the driver. Iterating raises JobFailed (one line) when the
    engine gives up."""

    def __iter__(self) -> Iterator[pa.Table]: ...

    def received(self, uris: list[str]) -> None:
        """These inputs' rows are in the driver's hands: only that settles an input (run/isolation.py)."""

    def listing(self) -> dict:
        """The listing's counts so far: listed, skipped, already_done, duplicates, done."""

    def progress(self, inputs: int, failed: int, rate: float) -> None:
        """A batch's counts, for what the engine exports about a run (metrics)."""

    def waiting(self) -> str | None:
        """What the run waits for, if anything (a node the autoscaler is starting), for the progress line."""

    def facts(self) -> EngineFacts: ...


class ListedRows:
    """What an engine without a cluster says beside its rows: the listing's counts it keeps itself, and nothing to
    export or wait for (run/inline.py, local/executor.py)."""
    counts: ListingCounts

    def received(self, uris: list[str]) -> None:
        pass

    def listing(self) -> dict:
        return self.counts.listing_get()

    def progress(self, inputs: int, failed: int, rate: float) -> None:
        pass

    def waiting(self) -> str | None:
        return None


class ModelCheck(Protocol):
    def result(self) -> ModelSpec:
        """The model, resolved and built; raises UserError (one line) when it cannot be."""


class Executor(Protocol):
    name: str  # for the console: "Ray", "the local executor"

    def check_model(self, cfg: JobConfig, storage: Storage) -> ModelCheck:
        """Start checking the model where it will run; its answer comes while the engine starts."""

    def start(self) -> str:
        """Start or join the engine; a line for the console saying what it is."""

    def pool(self, compute: ComputeConfig) -> Pool:
        """The model processes this job gets; `describe()` says how many and why."""

    def run(self, plan: StagePlan, output_uri: str) -> Rows:
        """Start the plan; `output_uri` tags what the engine exports about the run."""


def choose_executor(compute: ComputeConfig) -> Literal["ray", "local"]:
    """`auto`: this machine without Ray, unless the job names a cluster or the machine has several GPUs (a model
    process per GPU is Ray's to schedule)."""
    if compute.executor != "auto":
        return compute.executor
    if compute.ray_address or os.environ.get("RAY_ADDRESS"):
        return "ray"
    return "ray" if visible_gpus() > 1 else "local"


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, from the driver's /proc entries and CUDA_VISIBLE_DEVICES: no torch."""
    try:
        present = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    return min(present, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
