"""Model stage: callable classes built once per process (one model per actor) and reused for every batch.
`ModelStage` holds what every model shares; `Classifier` (classify.py) and `Detector` (detect.py) say only how a
batch of pixels (numpy arrays, or tensors already on the device) becomes their columns. The device is chosen here,
on the worker; failed rows pass through untouched; pixels are dropped once used; a CUDA out-of-memory error halves
the model calls (at one image it becomes the rows' error). Who decodes, and where, is the plan's choice
(run/plan.py; the stage that runs it is models/inference.py): pipeline/ARCHITECTURE.md#where-decoding-runs"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.io.storage import Storage
from pipeline.models.embedding import EmbeddingTap
from pipeline.models.folding import fold_batch_norms
from pipeline.models.resolve import ModelSpec, build_model
from pipeline.job.rows import error_columns

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
log = logging.getLogger(__name__)


class ModelStage:
    def __init__(self, spec: ModelSpec, storage: Storage, precision: str = "fp32", channels_last: bool = True,
                 num_threads: int | None = None):
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        self.autocast_dtype = _AUTOCAST.get(precision) if self.device.type == "cuda" else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_model(spec, storage)
        # Folding traces forward(), running its Python: torchvision's own classifiers only, whose forward has no
        # side effects (a custom model's may count or log calls). Detectors trace no better, their norms frozen.
        if spec.task == "classification" and spec.source == "torchvision" and ":" not in spec.name:
            fold_batch_norms(self.model, keep=frozenset({spec.embedding.layer}) - {None})
        self.model = self.model.to(self.device, memory_format=self.memory_format)
        self.tap = (EmbeddingTap(self.model, spec.task, spec.embedding.layer, spec.embedding.normalize)
                    if spec.wants_embedding else None)
        self.max_batch: int | None = None  # lowered after a CUDA out-of-memory error

    def empty_columns(self, n: int) -> dict[str, np.ndarray]:
        """The stage's output columns for n rows, as they stay for a failed row."""
        if self.tap is None:
            return {}
        return {"embedding": np.full((n, self.spec.embedding_dim), np.nan, dtype=np.float32)}

    def predict(self, pixels) -> dict[str, Sequence]:
        """Column values for these (good) images, in their order."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        errors, error_types = error_columns(batch)
        columns = self.empty_columns(len(errors))
        reused = batch.get("reused_from", [None] * len(errors))  # copies of another row's prediction (reuse.py)
        rows = np.flatnonzero([e is None and r is None for e, r in zip(errors, reused)])
        if len(rows):
            if len(rows) < len(errors):
                pixels = _select(pixels, rows)
            try:
                values = self.predict(pixels)
            except torch.cuda.OutOfMemoryError:
                errors[rows] = "model: CUDA out of memory even at one image per forward pass"
                error_types[rows] = "model.out_of_memory"
            else:
                for name, column in values.items():
                    _fill(columns[name], rows, column)
        batch.update(columns, error=errors, error_type=error_types)
        return batch

    def in_chunks(self, plan: Callable[[int | None], list[np.ndarray]], run: Callable[[np.ndarray], object]) -> list:
        """run(indexes) for each chunk that plan(max_batch) makes, under autocast; [(indexes, result)].

        A CUDA out-of-memory error halves max_batch (kept for later batches) and runs the whole plan again.
        """
        while True:
            size = self.max_batch
            try:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    if self.tap is not None:
                        self.tap.clear()
                    return [(indexes, run(indexes)) for indexes in plan(size)]
            except torch.cuda.OutOfMemoryError:
                chunks = plan(size)
                largest = max(len(c) for c in chunks)
                if largest == 1:
                    raise
                self.max_batch = largest // 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("CUDA out of memory at %d images per forward pass; retrying at %d", largest,
                            self.max_batch)


def _select(pixels, rows: np.ndarray):
    if torch.is_tensor(pixels):
        return pixels[torch.from_numpy(rows).to(pixels.device)]
    if isinstance(pixels, list):
        return [pixels[i] for i in rows]
    return pixels[rows]


def _fill(column: np.ndarray, rows: np.ndarray, values: Sequence) -> None:
    if column.dtype == object:  # lists per row: numpy would try to broadcast them
        for row, value in zip(rows, values):
            column[row] = value
    else:
        column[rows] = values
