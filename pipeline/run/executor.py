"""What the story of a run asks of an engine (pipeline/ray/executor.py is the one there is): start, say what pool
of model processes the job gets, and run a plan of stages, handing rows back as they arrive."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import pyarrow as pa

from pipeline.job.config import ComputeConfig
from pipeline.run.plan import Pool, StagePlan


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


class Executor(Protocol):
    def start(self) -> str:
        """Start or join the engine; a line for the console saying what it is."""

    def pool(self, compute: ComputeConfig) -> Pool:
        """The model processes this job gets; `describe()` says how many and why."""

    def run(self, plan: StagePlan, output_uri: str) -> Rows:
        """Start the plan; `output_uri` tags what the engine exports about the run."""
