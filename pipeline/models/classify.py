"""`Classifier`: a batch of pixels to the top-k labels and scores (and the embedding when the job asks)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline.io.storage import Storage
from pipeline.models.spec import ModelSpec
from pipeline.models.stage import ModelStage


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
            if self.spec.tag_threshold is not None:
                columns["tags"] = np.full(n, None, dtype=object)
        return columns

    def predict(self, pixels) -> dict[str, Sequence]:
        probabilities, embedding = self.probabilities(pixels)
        values: dict[str, Sequence] = {}
        if self.spec.wants_predictions:
            scores, indexes = self.top(probabilities)
            values.update(label=self.labels[indexes[:, 0]], score=scores[:, 0],
                          topk_labels=[list(self.labels[i]) for i in indexes],
                          topk_scores=[s.tolist() for s in scores])
            if self.spec.tag_threshold is not None:
                values["tags"] = self.tags(probabilities.cpu().numpy())
        if embedding is not None:
            values["embedding"] = embedding
        return values

    def tags(self, probabilities: np.ndarray) -> list[list[str]]:
        """Per row, every label scoring at least the threshold, best first."""
        order = np.argsort(-probabilities, axis=1, kind="stable")
        return [[self.labels[i] for i in row if p[i] >= self.spec.tag_threshold] for p, row in zip(probabilities, order)]

    def top(self, probabilities: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        top = probabilities.topk(self.top_k, dim=1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy()

    def infer(self, pixels) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """uint8/uint16 (N, H, W, C) -> top-k probabilities and class indexes (N, k), and embeddings (N, D) or None."""
        probabilities, embedding = self.probabilities(pixels)
        return *self.top(probabilities), embedding

    @torch.inference_mode()
    def probabilities(self, pixels) -> tuple[torch.Tensor, np.ndarray | None]:
        """uint8/uint16 (N, H, W, C) -> class probabilities (N, classes), and embeddings (N, D) or None."""
        x = torch.as_tensor(pixels)
        scale = self.scale[x.dtype]
        if x.device.type != self.device.type:
            x = x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x
        x = x.permute(0, 3, 1, 2)  # NHWC memory is exactly a channels-last NCHW tensor
        x = x.float().mul_(scale).add_(self.shift).contiguous(memory_format=self.memory_format)
        chunks = self.in_chunks(lambda size: slices(len(x), size), lambda rows: self.model(x[rows[0]:rows[-1] + 1]))
        activation = torch.sigmoid if self.spec.activation == "sigmoid" else lambda t: torch.softmax(t, dim=1)
        probabilities = torch.cat([activation(logits.float()) for _, logits in chunks])
        embedding = self.tap.take() if self.tap is not None else None
        return probabilities, embedding


def slices(n: int, size: int | None) -> list[np.ndarray]:
    size = size or n
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]
