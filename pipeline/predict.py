"""Model stage: a callable class, so Ray builds one model per actor and reuses it for every batch.

The device is chosen here, on the worker: a GPU when Ray gave this actor one, the CPU otherwise. A batch
arrives either decoded (`pixels`, from CPU decode tasks) or encoded (`bytes`), which the actor decodes
itself: on its GPU (`DeviceDecoder`), or on its own core when the cluster has no GPU, so one process per
core decodes and infers without handing pixels between processes.

Pixels are uint8 height x width x channel; the model sees them as a channels-last NCHW view, normalised on
the device (a quarter of the bytes to move). Rows that already failed pass through untouched; pixels are
dropped as soon as the model has used them. A CUDA out-of-memory error halves the batch for this actor
and retries; at one image it becomes that row's error.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.decode import Decoder
from pipeline.model import ModelSpec, build_model
from pipeline.rows import error_columns
from pipeline.storage import Storage

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
log = logging.getLogger(__name__)


class Classifier:
    def __init__(self, spec: ModelSpec, storage: Storage, precision: str = "fp32", channels_last: bool = True,
                 num_threads: int | None = None, decode: Decoder | None = None, decode_on_device: bool = False):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        self.decoder = decode
        if decode is not None and decode_on_device and self.device.type == "cuda":
            from pipeline.gpu_decode import DeviceDecoder

            self.decoder = DeviceDecoder(decode.preprocess, decode.max_image_pixels, self.device)
        self.labels = np.asarray(spec.labels, dtype=object)
        self.top_k = min(spec.top_k, len(spec.labels))
        self.autocast_dtype = _AUTOCAST.get(precision) if self.device.type == "cuda" else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_model(spec, storage).to(self.device, memory_format=self.memory_format)
        p = spec.preprocess
        # (x / 255 - mean) / std as one multiply-add on the uint8 input.
        std = torch.tensor(p.std, device=self.device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(p.mean, device=self.device).view(1, 3, 1, 1) / std
        self.max_batch: int | None = None  # lowered after a CUDA out-of-memory error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = self.decode(batch)
        n = len(batch["uri"])
        errors, error_types = error_columns(batch)
        ok = np.array([e is None for e in errors], dtype=bool)
        label = np.full(n, None, dtype=object)
        score = np.full(n, np.nan, dtype=np.float32)
        topk_labels = np.full(n, None, dtype=object)
        topk_scores = np.full(n, None, dtype=object)
        if ok.any():
            rows = np.flatnonzero(ok)
            if not ok.all():
                pixels = pixels[torch.from_numpy(rows).to(pixels.device)] if torch.is_tensor(pixels) else pixels[rows]
            try:
                scores, indexes = self.predict(pixels)
            except torch.cuda.OutOfMemoryError:
                errors[rows] = "model: CUDA out of memory even at one image per forward pass"
                error_types[rows] = "model.out_of_memory"
            else:
                label[rows] = self.labels[indexes[:, 0]]
                score[rows] = scores[:, 0]
                for j, row in enumerate(rows):
                    topk_labels[row] = list(self.labels[indexes[j]])
                    topk_scores[row] = scores[j].tolist()
        batch.update(label=label, score=score, topk_labels=topk_labels, topk_scores=topk_scores, error=errors,
                     error_type=error_types)
        return batch

    def decode(self, batch: dict[str, np.ndarray]) -> np.ndarray | torch.Tensor:
        """The batch's pixels, decoding its `bytes` here when this actor decodes for itself."""
        if "bytes" not in batch:
            return batch.pop("pixels")
        decoded = self.decoder(batch)
        if isinstance(decoded, tuple):  # the device decoder keeps its pixels on the device
            return decoded[1]
        return decoded.pop("pixels")

    @torch.inference_mode()
    def predict(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> top-k probabilities and class indexes, both (N, k)."""
        x = torch.as_tensor(pixels)
        if x.device.type != self.device.type:
            x = x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x
        x = x.permute(0, 3, 1, 2)  # NHWC memory is exactly a channels-last NCHW tensor
        x = x.float().mul_(self.scale).add_(self.shift).contiguous(memory_format=self.memory_format)
        probabilities = torch.cat([torch.softmax(logits.float(), dim=1) for logits in self.forward(x)])
        top = probabilities.topk(self.top_k, dim=1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits in chunks of at most `max_batch`; a CUDA out-of-memory error halves it and tries again."""
        while True:
            size = self.max_batch or len(x)
            try:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    return [self.model(x[i:i + size]) for i in range(0, len(x), size)]
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                self.max_batch = size // 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("CUDA out of memory at %d images per forward pass; retrying at %d", size,
                            self.max_batch)
