"""open_clip: open-vocabulary tagging. `model: {source: open_clip, name: ViT-B-32, pretrained: laion2b_s34b_b79k,
labels: [dog, cat, ...]}`. The vocabulary is put into every prompt template and encoded once, on the driver; each
image's embedding is scored against it (softmax, or sigmoid for SigLIP-style models). `name` may also be a model
config JSON file (local or in an object store), for architectures open_clip does not ship."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from pipeline.decode.image import Preprocess
from pipeline.io.storage import Storage, is_remote
from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.resolve import load_checkpoint, load_weights
from pipeline.models.sources import digest, download_failed, require
from pipeline.models.sources.zero_shot import ZeroShot, label_embeddings, vocabulary, zero_shot_spec
from pipeline.models.spec import ModelSpec

LIBRARY = ("open_clip",)  # what the local model process imports at its start (pipeline/local/worker.py)

PREFETCH = ("fetch it once where there is a network (python -c \"import open_clip; open_clip.create_model('{name}', "
            "pretrained='{tag}')\", into HF_HOME), or give model.pretrained a checkpoint file")


def resolve(cfg: ModelConfig, storage: Storage) -> ModelSpec:
    labels = vocabulary(cfg, storage)
    open_clip = require("open_clip", "open_clip")
    architecture = _architecture(open_clip, cfg.name, storage)
    model, weights_id = _create(open_clip, architecture, cfg.pretrained, storage)
    tokenizer = open_clip.get_tokenizer(architecture)
    text = label_embeddings(lambda prompts: model.encode_text(tokenizer(prompts)), labels, cfg.zero_shot.templates)
    bias = getattr(model, "logit_bias", None)
    return zero_shot_spec(cfg, labels, text, scale=float(model.logit_scale.detach().exp()),
                          bias=float(bias.detach()) if bias is not None else None, weights_id=weights_id,
                          preprocess=_preprocess(model, cfg.name),
                          options={"architecture": cfg.name, "pretrained": cfg.pretrained},
                          visual=lambda spec: model.visual)


def build(spec: ModelSpec, storage: Storage) -> nn.Module:
    open_clip = require("open_clip", "open_clip")
    model, _ = _create(open_clip, _architecture(open_clip, spec.options["architecture"], storage),
                       spec.options["pretrained"], storage)
    return ZeroShot(model.visual, spec).eval()


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
                        "or a checkpoint file (local, s3://, gs:// or az://)")
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
        return model.eval(), digest(model.state_dict())
    weights_id, state_dict = load_checkpoint(pretrained, storage)
    load_weights(model, state_dict, f"open_clip's {architecture}", field="model.pretrained")
    return model.eval(), weights_id


def _looks_like_file(value: str) -> bool:
    return is_remote(value) or Path(value).exists()


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
