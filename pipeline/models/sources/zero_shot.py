"""What every zero-shot source shares: the vocabulary put into the prompt templates and encoded once (on the driver,
kept in the spec), and the model each process runs: its image tower, normalised, scored against that vocabulary.
The image embedding is the input of `head`, which is where the embedding tap reads it."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.decode.image import Preprocess
from pipeline.io.storage import Storage
from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.resolve import finish_classifier, preprocess_with, read_labels
from pipeline.models.spec import ModelSpec


class VocabularyHead(nn.Module):
    """Unit image embeddings (N, D) -> one logit per label: scale * cosine similarity (+ bias)."""

    def __init__(self, text: np.ndarray, scale: float, bias: float):
        super().__init__()
        self.register_buffer("text", torch.from_numpy(np.ascontiguousarray(text)).float())
        self.scale, self.bias = scale, bias

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features.float() @ self.text.T + self.bias


class ZeroShot(nn.Module):
    """The image tower, its output normalised, then the vocabulary."""

    def __init__(self, visual: nn.Module, spec: ModelSpec):
        super().__init__()
        self.visual = visual
        self.head = VocabularyHead(spec.options["text"], spec.options["scale"], spec.options["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.normalize(self.visual(x), dim=-1))


def vocabulary(cfg: ModelConfig, storage: Storage) -> tuple[str, ...]:
    if cfg.task not in ("auto", "zero_shot"):
        raise UserError(f"model.task: {cfg.source} models here tag by vocabulary; remove task or set it to zero_shot")
    labels = read_labels(cfg.labels, storage) if cfg.labels else ()
    if not labels:
        raise UserError("model.labels: zero-shot tagging needs a vocabulary: a list of labels, or a text file with "
                        "one label per line")
    return labels


@torch.inference_mode()
def label_embeddings(encode: Callable[[list[str]], torch.Tensor], labels: tuple[str, ...],
                     templates: list[str]) -> np.ndarray:
    """One unit vector per label: the mean of its prompts' unit text embeddings, normalised again."""
    prompts = [template.format(label) for label in labels for template in templates]
    text = torch.cat([nn.functional.normalize(encode(prompts[i:i + 256]).float(), dim=-1)
                      for i in range(0, len(prompts), 256)])
    text = text.reshape(len(labels), len(templates), -1).mean(dim=1)
    return nn.functional.normalize(text, dim=-1).numpy()


def zero_shot_spec(cfg: ModelConfig, labels: tuple[str, ...], text: np.ndarray, scale: float, bias: float | None,
                   weights_id: str, preprocess: Preprocess, options: dict,
                   visual: Callable[[ModelSpec], nn.Module]) -> ModelSpec:
    """The checked spec: softmax, or sigmoid for a model trained with a logit bias (SigLIP); one probing pass."""
    activation = cfg.zero_shot.activation if cfg.zero_shot.activation != "auto" else \
        "sigmoid" if bias is not None else "softmax"
    override = cfg.preprocess.model_dump(exclude_none=True)
    threshold = cfg.zero_shot.tag_threshold
    spec = ModelSpec(
        name=cfg.display_name, weights_name=None, checkpoint=None, weights_id=weights_id, labels=labels,
        preprocess=preprocess_with(preprocess, override), top_k=cfg.top_k, task="zero_shot",
        outputs=tuple(cfg.outputs), embedding=cfg.embedding, input_channels=3, source=cfg.source,
        activation=activation, options={**options, "text": text, "scale": scale, "bias": bias or 0.0},
        tag_threshold=threshold if threshold is not None else 0.5 if activation == "sigmoid" else 0.1)
    return finish_classifier(spec, ZeroShot(visual(spec), spec).eval(),
                             mean_or_std_given="mean" in override or "std" in override)
