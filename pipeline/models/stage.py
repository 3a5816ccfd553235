"""Model stage: callable classes, so Ray builds one model per actor and reuses it for every batch.

`ModelStage` holds what every model actor shares; `Classifier` (here) and `Detector` (detect.py) say only
how a batch of pixels becomes their columns.

The device is chosen here, on the worker: a GPU when Ray gave this actor one, the CPU otherwise. A batch
arrives either decoded (`pixels`, from CPU decode tasks) or encoded (`bytes`), which the actor decodes
itself: on its GPU (`DeviceDecoder`), or on its own core when the cluster has no GPU, so one process per
core decodes and infers without handing pixels between processes.

Rows that already failed pass through untouched; pixels are dropped as soon as the model has used them.
A CUDA out-of-memory error halves the actor's model calls and retries; at one image it becomes the rows'
error.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.decode.image import Decoder
from pipeline.models.embedding import EmbeddingTap
from pipeline.models.folding import fold_batch_norms
from pipeline.ray.isolation import Isolated, Ledger
from pipeline.ray.metrics import BatchLatency
from pipeline.models.resolve import ModelSpec, build_model
from pipeline.spec.rows import error_columns
from pipeline.io.storage import Storage

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
log = logging.getLogger(__name__)


class ModelStage:
    def __init__(self, spec: ModelSpec, storage: Storage, precision: str = "fp32", channels_last: bool = True,
                 num_threads: int | None = None, decode: Decoder | None = None, decode_on_device: bool = False,
                 ledger: Ledger | None = None):
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        self.decoder = decode
        if decode is not None and decode_on_device and self.device.type == "cuda" and decode.channels == 3:
            from pipeline.decode.device import DeviceDecoder

            self.decoder = DeviceDecoder(decode, self.device)
        self.autocast_dtype = _AUTOCAST.get(precision) if self.device.type == "cuda" else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_model(spec, storage)
        # Folding traces forward(), running its Python: torchvision's own classifiers only, whose forward has no
        # side effects (a custom model's may count or log calls). Detectors trace no better, their norms frozen.
        if spec.task == "classification" and ":" not in spec.name:
            fold_batch_norms(self.model, keep=frozenset({spec.embedding.layer}) - {None})
        self.model = self.model.to(self.device, memory_format=self.memory_format)
        self.tap = (EmbeddingTap(self.model, spec.task, spec.embedding.layer, spec.embedding.normalize)
                    if spec.wants_embedding else None)
        self.max_batch: int | None = None  # lowered after a CUDA out-of-memory error
        self.latency = BatchLatency(type(self).__name__)
        # Told as each batch starts and ends: an input that kills this process becomes an error row
        # (isolation.py), and the driver counts the inputs redone after a loss.
        self.isolated = Isolated(self.timed_run, ledger, "model") if ledger is not None else None

    def empty_columns(self, n: int) -> dict[str, np.ndarray]:
        """The stage's output columns for n rows, as they stay for a failed row."""
        if self.tap is None:
            return {}
        return {"embedding": np.full((n, self.spec.embedding_dim), np.nan, dtype=np.float32)}

    def predict(self, pixels) -> dict[str, Sequence]:
        """Column values for these (good) images, in their order."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.isolated(batch) if self.isolated is not None else self.timed_run(batch)

    def timed_run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        batch = self.run(batch)
        self.latency.observe(time.perf_counter() - started)
        return batch

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = self.decode(batch)
        errors, error_types = error_columns(batch)
        columns = self.empty_columns(len(errors))
        rows = np.flatnonzero([e is None for e in errors])
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

    def decode(self, batch: dict[str, np.ndarray]):
        """The batch's pixels, decoding its `bytes` here when this actor decodes for itself."""
        if "bytes" not in batch:
            return batch.pop("pixels")
        decoded = self.decoder(batch)
        if isinstance(decoded, tuple):  # the device decoder keeps its pixels on the device
            return decoded[1]
        return decoded.pop("pixels")

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


class Classifier(ModelStage):
    """Pixels are uint8 or uint16 (N, H, W, C); the model sees a channels-last NCHW view, normalised on the device."""

    def __init__(self, spec: ModelSpec, storage: Storage, **kwargs):
        super().__init__(spec, storage, **kwargs)
        self.labels = np.asarray(spec.labels, dtype=object)
        self.top_k = min(spec.top_k, len(spec.labels))
        p = spec.preprocess
        # (x / full_scale - mean) / std as one multiply-add on the integer input; full scale by its depth.
        std = torch.tensor(p.std, device=self.device).view(1, -1, 1, 1)
        self.scale = {torch.uint8: 1.0 / (255.0 * std), torch.uint16: 1.0 / (65535.0 * std)}
        self.shift = -torch.tensor(p.mean, device=self.device).view(1, -1, 1, 1) / std

    def empty_columns(self, n: int) -> dict[str, np.ndarray]:
        columns = super().empty_columns(n)
        if self.spec.wants_predictions:
            columns.update(label=np.full(n, None, dtype=object), score=np.full(n, np.nan, dtype=np.float32),
                           topk_labels=np.full(n, None, dtype=object), topk_scores=np.full(n, None, dtype=object))
        return columns

    def predict(self, pixels) -> dict[str, Sequence]:
        scores, indexes, embedding = self.infer(pixels)
        values: dict[str, Sequence] = {}
        if self.spec.wants_predictions:
            values.update(label=self.labels[indexes[:, 0]], score=scores[:, 0],
                          topk_labels=[list(self.labels[i]) for i in indexes],
                          topk_scores=[s.tolist() for s in scores])
        if embedding is not None:
            values["embedding"] = embedding
        return values

    @torch.inference_mode()
    def infer(self, pixels) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """uint8/uint16 (N, H, W, C) -> top-k probabilities and class indexes (N, k), and embeddings (N, D) or None."""
        x = torch.as_tensor(pixels)
        scale = self.scale[x.dtype]
        if x.device.type != self.device.type:
            x = x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x
        x = x.permute(0, 3, 1, 2)  # NHWC memory is exactly a channels-last NCHW tensor
        x = x.float().mul_(scale).add_(self.shift).contiguous(memory_format=self.memory_format)
        chunks = self.in_chunks(lambda size: _slices(len(x), size), lambda rows: self.model(x[rows[0]:rows[-1] + 1]))
        probabilities = torch.cat([torch.softmax(logits.float(), dim=1) for _, logits in chunks])
        top = probabilities.topk(self.top_k, dim=1)
        embedding = self.tap.take() if self.tap is not None else None
        return top.values.cpu().numpy(), top.indices.cpu().numpy(), embedding


def _slices(n: int, size: int | None) -> list[np.ndarray]:
    size = size or n
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


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
