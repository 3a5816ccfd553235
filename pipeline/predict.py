"""Model stage: a callable class, so Ray builds one model per actor and reuses it for every batch.

The device is chosen here, on the worker: a GPU when Ray gave this actor one, the CPU otherwise.
Pixels arrive as uint8 and are normalised on the device (a quarter of the bytes to move); rows that
already failed are passed through untouched; `pixels` is dropped as soon as the model has used it.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.model import ModelSpec, build_model
from pipeline.rows import error_columns
from pipeline.storage import Storage

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Classifier:
    def __init__(self, spec: ModelSpec, storage: Storage, precision: str = "fp32", channels_last: bool = False,
                 num_threads: int | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        self.spec = spec
        self.labels = np.asarray(spec.labels, dtype=object)
        self.top_k = min(spec.top_k, len(spec.labels))
        self.autocast_dtype = _AUTOCAST.get(precision) if self.device.type == "cuda" else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = build_model(spec, storage).to(self.device, memory_format=self.memory_format)
        self.model = model
        p = spec.preprocess
        self.mean = torch.tensor(p.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(p.std, device=self.device).view(1, 3, 1, 1) * 255.0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        n = len(batch["uri"])
        errors, error_types = error_columns(batch)
        ok = np.array([e is None for e in errors], dtype=bool)
        label = np.full(n, None, dtype=object)
        score = np.full(n, np.nan, dtype=np.float32)
        topk_labels = np.full(n, None, dtype=object)
        topk_scores = np.full(n, None, dtype=object)
        if ok.any():
            scores, indexes = self.predict(pixels[ok])
            rows = np.flatnonzero(ok)
            label[rows] = self.labels[indexes[:, 0]]
            score[rows] = scores[:, 0]
            for j, row in enumerate(rows):
                topk_labels[row] = list(self.labels[indexes[j]])
                topk_scores[row] = scores[j].tolist()
        batch.update(label=label, score=score, topk_labels=topk_labels, topk_scores=topk_scores, error=errors,
                     error_type=error_types)
        return batch

    @torch.inference_mode()
    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 3, H, W) -> top-k probabilities and class indexes, both (N, k)."""
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(x)
        probabilities = torch.softmax(logits.float(), dim=1)
        top = probabilities.topk(self.top_k, dim=1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy()
