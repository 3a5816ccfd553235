"""An executor that runs a plan in this process, one block at a time, from the same stage declarations: for tests
of the run's story without an engine, and for debugging a stage. It has no crash isolation (an input that kills
the process kills the job) and no parallelism; `pipeline run` uses Ray (pipeline/ray/executor.py)."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.io.storage import Storage
from pipeline.job.config import ComputeConfig, JobConfig
from pipeline.job.stage import Batch, Stage
from pipeline.run.checks import check_model
from pipeline.run.counts import ListingCounts
from pipeline.run.executor import EngineFacts, ListedRows
from pipeline.run.plan import StagePlan


@dataclass(frozen=True)
class InlinePool:
    cluster_cpus: float
    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 0.0  # this executor runs models on the CPU
    cpus_each: float = 1.0
    cpu_decode_apart: bool = False

    def describe(self) -> str:
        return "model: in this process, on the CPU"


class InlineExecutor:
    name = "the inline executor"

    def check_model(self, cfg: JobConfig, storage: Storage) -> Future:
        done = Future()
        done.set_result(check_model(cfg, storage))
        return done

    def start(self) -> str:
        return f"this process, {os.cpu_count()} CPUs"

    def pool(self, compute: ComputeConfig) -> InlinePool:
        return InlinePool(cluster_cpus=float(os.cpu_count() or 1))

    def run(self, plan: StagePlan, output_uri: str) -> "InlineRows":
        return InlineRows(plan)


class InlineRows(ListedRows):
    def __init__(self, plan: StagePlan):
        self.plan = plan
        self.counts = ListingCounts()
        self.inputs_started = 0
        self.first_model_batch_at: float | None = None

    def __iter__(self) -> Iterator[pa.Table]:
        for stage in self.plan.stages:
            stage.setup()
        for block in self.plan.source.blocks(self.counts.listing_add):
            batch = {name: column.to_numpy(zero_copy_only=False) for name, column in zip(block.column_names,
                                                                                        block.columns)}
            self.inputs_started += len(batch["uri"])
            for stage in self.plan.stages:
                batch = in_batches(stage, batch)
            self.first_model_batch_at = self.first_model_batch_at or time.time()
            yield to_table(batch)
        self.counts.listing_finished()

    def facts(self) -> EngineFacts:
        return EngineFacts(inputs_started=self.inputs_started, first_model_batch_at=self.first_model_batch_at)


def in_batches(stage: Stage, batch: Batch) -> Batch:
    """The stage over `batch`, `resources.batch_size` rows at a time."""
    rows = len(next(iter(batch.values())))
    size = stage.resources.batch_size or rows
    if rows <= size:
        return stage.process(batch)
    parts = [stage.process({name: column[i:i + size] for name, column in batch.items()}) for i in range(0, rows, size)]
    return {name: concat([part[name] for part in parts]) for name in parts[0]}


def concat(columns: list[np.ndarray]) -> np.ndarray:
    if all(c.dtype != object for c in columns) and len({c.shape[1:] for c in columns}) == 1:
        return np.concatenate(columns)
    out = np.empty(sum(len(c) for c in columns), dtype=object)
    for i, value in enumerate(value for column in columns for value in column):
        out[i] = value  # one by one: numpy would broadcast a list or an array into the slots
    return out


def to_table(batch: Batch) -> pa.Table:
    """Numpy columns as Arrow: an (N, D) array becomes a fixed-size list column, as Ray hands tensors over."""
    columns = {}
    for name, column in batch.items():
        if column.ndim == 2:
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(column.ravel()), column.shape[1])
        else:
            columns[name] = pa.array(list(column) if column.dtype == object else column)
    return pa.table(columns)
