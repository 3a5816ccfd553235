"""Detection stage (`Detector`): images at their own size (decoded, after EXIF orientation) -> one list of boxes
per image, in those pixels. torchvision's transform resizes each (shorter side to min_size, longer at most max_size,
or a fixed size for SSD), pads them into one tensor and maps boxes back; images are grouped by the padded size they
would get alone, so each gets exactly its own result. A model call takes at most `batch_size` images and at most
`max_batch_megapixels` of decoded pixels.
Why: pipeline/ARCHITECTURE.md#detection-images-at-their-own-size-batches-that-never-change-a-result"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.io.storage import Storage
from pipeline.models.spec import ModelSpec
from pipeline.models.stage import ModelStage
from pipeline.job.config import DetectionConfig


class Detector(ModelStage):
    def __init__(self, spec: ModelSpec, storage: Storage, max_batch_megapixels: float = 48.0, **kwargs):
        super().__init__(spec, storage, **kwargs)
        self.labels = spec.labels
        self.allowed = set(spec.detection.classes) if spec.detection.classes else None
        self.max_batch_pixels = int(max_batch_megapixels * 1e6)
        set_model_limits(self.model, spec.detection)
        if self.autocast_dtype is not None and isinstance(getattr(self.model, "backbone", None), nn.Module):
            # Box regression in half precision would be off by pixels at photo sizes: only the backbone,
            # where the time goes, runs under autocast.
            self.model.backbone = AutocastBackbone(self.model.backbone, self.autocast_dtype)
        self.autocast_dtype = None

    def empty_columns(self, n: int) -> dict[str, np.ndarray]:
        columns = super().empty_columns(n)
        if self.spec.wants_predictions:
            columns.update(detections=np.full(n, None, dtype=object),
                           num_detections=np.full(n, np.nan, dtype=np.float32))  # NaN: null for failed rows
        return columns

    @torch.inference_mode()
    def predict(self, images: Sequence) -> dict[str, Sequence]:
        shapes = [tuple(image.shape[:2]) for image in images]  # (height, width)
        chunks = self.in_chunks(lambda size: self.plan(shapes, size),
                                lambda rows: self.model([self.as_input(images[i]) for i in rows]))
        outputs: list[dict | None] = [None] * len(images)
        for rows, results in chunks:
            for i, result in zip(rows, results):
                outputs[i] = result
        values: dict[str, Sequence] = {}
        if self.spec.wants_predictions:
            detections = [self.to_rows(out, width=w, height=h) for out, (h, w) in zip(outputs, shapes)]
            values.update(detections=detections, num_detections=[len(d) for d in detections])
        if self.tap is not None:
            order = np.concatenate([rows for rows, _ in chunks])
            embedding = np.empty((len(images), self.spec.embedding_dim), dtype=np.float32)
            embedding[order] = self.tap.take()
            values["embedding"] = embedding
        return values

    def plan(self, shapes: list[tuple[int, int]], max_images: int | None) -> list[np.ndarray]:
        """Model calls: images grouped by padded size, each call within the image and pixel caps."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (h, w) in enumerate(shapes):
            groups[padded_size(getattr(self.model, "transform", None), h, w)].append(i)
        limit = max_images or len(shapes)
        chunks: list[np.ndarray] = []
        for members in groups.values():
            chunk: list[int] = []
            pixels = 0
            for i in members:
                size = shapes[i][0] * shapes[i][1]
                if chunk and (len(chunk) >= limit or pixels + size > self.max_batch_pixels):
                    chunks.append(np.array(chunk))
                    chunk, pixels = [], 0
                chunk.append(i)
                pixels += size
            chunks.append(np.array(chunk))
        return chunks

    def as_input(self, image) -> torch.Tensor:
        """uint8/uint16 (H, W, 3) -> float (3, H, W) in 0..1 on the device, what torchvision's detectors take."""
        x = torch.as_tensor(image)
        return x.to(self.device).permute(2, 0, 1).float().div_(255 if x.dtype == torch.uint8 else 65535)

    def to_rows(self, output: dict, width: int, height: int) -> list[dict]:
        """The model's output for one image -> detections above the threshold, allowed, best first, in bounds."""
        scores = output["scores"].float().cpu().numpy()
        boxes = output["boxes"].float().cpu().numpy().reshape(-1, 4)
        names = [self.label(int(i)) for i in output["labels"].cpu().numpy()]
        keep = scores >= self.spec.detection.score_threshold
        if self.allowed is not None:
            keep &= np.array([name in self.allowed for name in names], dtype=bool)
        kept = np.flatnonzero(keep)
        kept = kept[np.argsort(-scores[kept], kind="stable")][:self.spec.detection.max_detections]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        return [{"label": names[k], "score": float(scores[k]), "x1": float(boxes[k, 0]), "y1": float(boxes[k, 1]),
                 "x2": float(boxes[k, 2]), "y2": float(boxes[k, 3])} for k in kept]

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)


def padded_size(transform, height: int, width: int) -> tuple[int, int]:
    """The (height, width) torchvision's detection transform pads this image to when it is alone."""
    if transform is None or not hasattr(transform, "size_divisible"):
        return height, width
    if transform.fixed_size is not None:
        return tuple(transform.fixed_size)
    # The same float arithmetic as GeneralizedRCNNTransform.resize and F.interpolate(recompute_scale_factor=True).
    scale = min(float(transform.min_size[-1]) / min(height, width), float(transform.max_size) / max(height, width))
    stride = float(transform.size_divisible)
    return tuple(int(math.ceil(math.floor(side * scale) / stride) * stride) for side in (height, width))


def set_model_limits(model: nn.Module, cfg: DetectionConfig) -> None:
    """Let the model drop low scores before its own NMS and keep enough detections for the allow-list."""
    for holder in (model, getattr(model, "roi_heads", None)):
        if holder is None:
            continue
        if hasattr(holder, "score_thresh"):
            holder.score_thresh = cfg.score_threshold
        if hasattr(holder, "detections_per_img"):
            holder.detections_per_img = max(cfg.max_detections, holder.detections_per_img if cfg.classes else 0)


class AutocastBackbone(nn.Module):
    """A detector's backbone under CUDA autocast, handing float32 features to the heads."""

    def __init__(self, backbone: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.backbone = backbone
        self.dtype = dtype
        self.out_channels = getattr(backbone, "out_channels", None)

    def forward(self, x: torch.Tensor):
        with torch.autocast("cuda", dtype=self.dtype):
            features = self.backbone(x)
        if isinstance(features, dict):
            return type(features)((k, v.float()) for k, v in features.items())
        return features.float()
