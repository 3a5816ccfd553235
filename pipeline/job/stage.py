"""The stage contract: what a stage of a job needs (`Resources`) and what it does (`setup`, `process`).

A job is a `Source` of input rows and a list of `Stage`s, each a batch function over numpy columns
(`dict[str, np.ndarray]`) that keeps every row and passes failed rows through untouched. Stages know nothing of
the engine: an executor (pipeline/ray/adapter.py) builds its work from these declarations and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Resources:
    """What each process running a stage holds, and how many such processes there are."""
    cpus: float = 1.0  # logical CPUs; 0 for a stage that waits on storage rather than computes
    gpus: float = 0.0
    memory: int = 0  # bytes reserved per process; 0: none
    batch_size: int | None = None  # rows per `process` call; None: each block as it comes
    concurrency: int | tuple[int, int] | None = None  # processes: a count, (min, max) for a pool, None: any
    stateful: bool = False  # `setup` is costly (a model): long-lived processes, each set up once
    queue: int | None = None  # batches waiting at each stateful process; None: the engine's default


class Stage:
    """One step of the flow. `name` prefixes its error types ("decode.truncated") and names its operator."""
    name: str = "stage"
    # An input that kills the process running this stage becomes that input's error row (run/isolation.py).
    isolates_crashes: bool = False
    resources: Resources = Resources()  # a stage whose needs depend on the job sets its own in __init__

    def setup(self) -> None:
        """Heavy state, once per process before its first batch (a model); cheap stages need none."""

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        return self.process(batch)


# (to do, skipped for their extension, skipped as done by an earlier run, a manifest's repeated entries dropped)
# for each page of a listing
PageCounts = Callable[[int, int, int, int], None]


class Source:
    """Where the rows come from: Arrow blocks of `uri, size, etag, last_modified`, a page at a time."""
    name: str = "source"
    resources: Resources = Resources(cpus=0, concurrency=1)

    def blocks(self, counted: PageCounts | None = None) -> Iterator[pa.Table]:
        raise NotImplementedError
