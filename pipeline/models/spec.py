"""What a resolved model is (`ModelSpec`): small, picklable, and free of torch, so that a driver that never builds
the model (pipeline/local/) can hold it. pipeline/models/resolve.py makes one."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.decode.image import Preprocess
from pipeline.job.config import IMAGENET_MEAN, IMAGENET_STD, DetectionConfig, EmbeddingConfig

IMAGENET_PREPROCESS = Preprocess(resize_size=256, crop_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclass(frozen=True)
class ModelSpec:
    """Everything an actor needs to rebuild the model; small and picklable."""
    name: str
    weights_name: str | None  # torchvision enum, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    checkpoint: str | None  # local path or s3:// URI of a state_dict
    weights_id: str  # what the output's `weights` column says: the enum, or sha256 of the checkpoint
    labels: tuple[str, ...]
    preprocess: Preprocess | None  # None for detectors: they resize with their own transform
    top_k: int
    task: str = "classification"  # or "detection"
    outputs: tuple[str, ...] = ("predictions",)  # and/or "embedding"
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    embedding_dim: int | None = None  # set when outputs has "embedding"
    input_channels: int | None = None  # None until resolved: then what the model's first convolution takes
    source: str = "torchvision"  # which module of pipeline/models/sources/ builds it
    options: dict = field(default_factory=dict)  # the source's own settings (hub id, revision, ONNX input, prompts)
    activation: str = "softmax"  # or "sigmoid": each class scored on its own (SigLIP)
    tag_threshold: float | None = None  # set: each row's `tags` are the classes scoring at least this

    @property
    def wants_predictions(self) -> bool:
        return "predictions" in self.outputs

    @property
    def wants_embedding(self) -> bool:
        return "embedding" in self.outputs
