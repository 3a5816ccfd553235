"""open_clip: open-vocabulary tagging. `model: {source: open_clip, name: ViT-B-32, pretrained: laion2b_s34b_b79k,
labels: [dog, cat, ...]}`. The vocabulary is put into every prompt template and encoded once, on the driver; each
image's embedding is scored against it (softmax, or sigmoid for SigLIP-style models). `name` may also be a model
config JSON file (local or s3://), for architectures open_clip does not ship."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.decode.image import Preprocess
from pipeline.io.storage import Storage
from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.resolve import finish_classifier, load_checkpoint, preprocess_with, read_labels
from pipeline.models.sources import download_failed, require
from pipeline.models.sources.timm import _digest
from pipeline.models.spec import ModelSpec

PREFETCH = ("fetch it once where there is a network (python -c \"import open_clip; open_clip.create_model('{name}', "
            "pretrained='{tag}')\", into HF_HOME), or give model.pretrained a checkpoint file")


def resolve(cfg: ModelConfig, storage: Storage) -> ModelSpec:
    if cfg.task not in ("auto", "zero_shot"):
        raise UserError("model.task: open_clip models tag by vocabulary; remove task or set it to zero_shot")
    if not cfg.labels:
        raise UserError("model.labels: zero-shot tagging needs a vocabulary: a list of labels, or a text file with "
                        "one per line")
    vocabulary = read_labels(cfg.labels, storage)
    if not vocabulary:
        raise UserError("model.labels: the vocabulary is empty; give at least one label")
    open_clip = require("open_clip", "open_clip")
    architecture = _architecture(open_clip, cfg.name, storage)
    model, weights_id = _create(open_clip, architecture, cfg.pretrained, storage)
    text = text_features(open_clip, model, architecture, [t.format(label) for label in vocabulary
                                                          for t in cfg.zero_shot.templates])
    text = text.reshape(len(vocabulary), len(cfg.zero_shot.templates), -1).mean(dim=1)
    sigmoid = getattr(model, "logit_bias", None) is not None
    activation = cfg.zero_shot.activation if cfg.zero_shot.activation != "auto" else \
        "sigmoid" if sigmoid else "softmax"
    preprocess = cfg.preprocess.model_dump(exclude_none=True)
    spec = ModelSpec(
        name=cfg.name, weights_name=None, checkpoint=None, weights_id=weights_id, labels=vocabulary,
        preprocess=preprocess_with(_preprocess(model, cfg.name), preprocess), top_k=cfg.top_k, task="zero_shot",
        outputs=tuple(cfg.outputs), embedding=cfg.embedding, input_channels=3, source="open_clip",
        activation=activation, options={
            "architecture": cfg.name, "pretrained": cfg.pretrained,
            "text": torch.nn.functional.normalize(text, dim=-1).numpy(),
            "scale": float(model.logit_scale.detach().exp()),
            "bias": float(model.logit_bias.detach()) if sigmoid else 0.0},
        tag_threshold=cfg.zero_shot.tag_threshold if cfg.zero_shot.tag_threshold is not None else
        0.5 if activation == "sigmoid" else 0.1)
    return finish_classifier(spec, build_from(model, spec), mean_or_std_given="mean" in preprocess or "std" in preprocess)


def build(spec: ModelSpec, storage: Storage) -> nn.Module:
    open_clip = require("open_clip", "open_clip")
    model, _ = _create(open_clip, _architecture(open_clip, spec.options["architecture"], storage),
                       spec.options["pretrained"], storage)
    return build_from(model, spec)


def build_from(model, spec: ModelSpec) -> nn.Module:
    options = spec.options
    return ZeroShot(model.visual, VocabularyHead(options["text"], options["scale"], options["bias"])).eval()


class VocabularyHead(nn.Module):
    """Unit image embeddings (N, D) -> one logit per label: scale * cosine similarity (+ bias)."""

    def __init__(self, text: np.ndarray, scale: float, bias: float):
        super().__init__()
        self.register_buffer("text", torch.from_numpy(np.ascontiguousarray(text)).float())
        self.scale, self.bias = scale, bias

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features.float() @ self.text.T + self.bias


class ZeroShot(nn.Module):
    """The image tower, its output normalised, then the vocabulary: `head`'s input is the row's embedding."""

    def __init__(self, visual: nn.Module, head: VocabularyHead):
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.normalize(self.visual(x), dim=-1))


@torch.inference_mode()
def text_features(open_clip, model, architecture: str, texts: list[str]) -> torch.Tensor:
    """Unit text embeddings (len(texts), D), encoded in batches."""
    tokenizer = open_clip.get_tokenizer(architecture)
    chunks = [model.encode_text(tokenizer(texts[i:i + 256]), normalize=True) for i in range(0, len(texts), 256)]
    return torch.cat(chunks).float()


def encode_texts(model_cfg: ModelConfig, storage: Storage, texts: list[str]) -> np.ndarray:
    """What `pipeline search` ranks by: the texts in the job's model's embedding space, unit length."""
    open_clip = require("open_clip", "open_clip")
    architecture = _architecture(open_clip, model_cfg.name, storage)
    model, _ = _create(open_clip, architecture, model_cfg.pretrained, storage)
    return text_features(open_clip, model, architecture, texts).numpy()


def _architecture(open_clip, name: str, storage: Storage) -> str:
    """The architecture's name; a config JSON file is registered with open_clip first."""
    if name.endswith(".json"):
        try:
            data = storage.read_bytes(name)
        except Exception as exc:  # noqa: BLE001 - OSError, botocore errors
            raise UserError(f"model.name: cannot read the model config {name} ({type(exc).__name__})") from None
        folder = Path(tempfile.mkdtemp(prefix="pipeline-open-clip-"))
        path = folder / Path(name).name
        path.write_bytes(data)
        open_clip.add_model_config(str(path))
        return path.stem
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
        raise UserError(f"model.name: '{name}' is not an open_clip model; {hint}")
    return name


def _create(open_clip, architecture: str, pretrained: str | None, storage: Storage) -> tuple[nn.Module, str]:
    """(the model in eval mode, its weights' id) from a pretrained tag or a checkpoint file."""
    if not pretrained:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(architecture)[:6])
        raise UserError(f"model.pretrained: {architecture} needs weights: a pretrained tag ({tags or 'none ships'}) "
                        "or a checkpoint file (local or s3://)")
    is_tag = pretrained in open_clip.list_pretrained_tags_by_model(architecture)
    if not is_tag and not _looks_like_file(pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(architecture)) or "none"
        raise UserError(f"model.pretrained: '{pretrained}' is not a pretrained tag of {architecture} (it has: "
                        f"{tags}) nor a checkpoint file")
    with _quiet():
        try:
            model = open_clip.create_model(architecture, pretrained=pretrained if is_tag else None)
        except Exception as exc:  # noqa: BLE001 - hub errors (offline), bad configs
            raise download_failed(f"open_clip {architecture} ({pretrained})", exc,
                                  PREFETCH.format(name=architecture, tag=pretrained)) from None
    if is_tag:
        return model.eval(), _digest(model.state_dict())
    weights_id, state_dict = load_checkpoint(pretrained, storage)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"model.pretrained: the checkpoint does not fit open_clip's {architecture} ({detail})") from None
    return model.eval(), weights_id


def _looks_like_file(value: str) -> bool:
    return value.startswith("s3://") or Path(value).exists()


@contextlib.contextmanager
def _quiet():
    """open_clip logs through the root logger ("No pretrained weights loaded"); the console is ours."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        root.setLevel(level)


def _preprocess(model, name: str) -> Preprocess:
    """open_clip's eval transform: shorter side to the image size, then the centre crop (or squashed to it)."""
    cfg = model.visual.preprocess_cfg
    height, width = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    mode = cfg.get("resize_mode", "shortest")
    if height != width or mode not in ("shortest", "squash"):
        raise UserError(f"model.preprocess: {name} takes {height}x{width} images resized by '{mode}'; set "
                        "model.preprocess (resize_size, crop_size) to a square crop")
    interpolation = cfg.get("interpolation", "bicubic")
    base = Preprocess(resize_size=height, crop_size=height, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=interpolation if interpolation in ("nearest", "bilinear") else "bicubic")
    return dataclasses.replace(base, resize_mode="exact") if mode == "squash" else base
