"""What the file sources (onnx.py, exported.py) share: reading the model file, its identity, what they refuse, and
preprocessing that fits a model's fixed input size. Not a source itself (no `resolve`/`build`)."""

from __future__ import annotations

import dataclasses
import hashlib

from pipeline.decode.image import Preprocess
from pipeline.io.storage import Storage
from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.resolve import preprocess_with
from pipeline.models.spec import IMAGENET_PREPROCESS

CROP_PCT = 0.875  # ImageNet's resize_size / crop_size (256 / 224)


def read_model_file(uri: str, storage: Storage, kind: str) -> bytes:
    """The model file's bytes, local or in an object store, or one line saying why not."""
    try:
        return storage.read_bytes(uri)
    except Exception as exc:  # noqa: BLE001 - OSError, botocore errors, a bad endpoint...
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"model.weights: cannot read the {kind} file {uri} ({type(exc).__name__}: {detail}); "
                        "check the path and credentials") from None


def digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part)
    return "sha256:" + hasher.hexdigest()


def check_classifier_only(cfg: ModelConfig, what: str) -> None:
    """These files are classifiers with one output: no detection, no embedding (no named layer to tap)."""
    if cfg.task not in ("auto", "classification"):
        raise UserError(f"model.task: {what} runs as a classifier here (logits of shape (batch, classes)); "
                        "remove task or set it to classification")
    if "embedding" in cfg.outputs:
        raise UserError(f"model.outputs: {what} has no layer to tap for an embedding; use outputs: [predictions], "
                        "or export a model whose output is the embedding")


def sized_preprocess(cfg: ModelConfig, fixed: tuple | None, stats: dict) -> Preprocess:
    """The job's `model.preprocess` over the model's own: its fixed input size (height, width; None: any), the
    mean/std the file carries (`stats`), else ImageNet's; resize_size defaults to crop / 0.875."""
    override = cfg.preprocess.model_dump(exclude_none=True)
    crop = override.get("crop_size", IMAGENET_PREPROCESS.crop_size)
    if fixed is not None:
        height, width = fixed
        if height != width:
            raise UserError(f"model.weights: {cfg.display_name} takes {height}x{width} inputs; the pipeline feeds "
                            "square centre crops, so export the model with a square or dynamic input size")
        if "crop_size" in override and override["crop_size"] != height:
            raise UserError(f"model.preprocess.crop_size: model expects {height}x{width}, model.preprocess.crop_size "
                            f"is {override['crop_size']}; remove crop_size or set it to {height}")
        crop = height
    base = dataclasses.replace(IMAGENET_PREPROCESS, crop_size=crop, resize_size=round(crop / CROP_PCT), **stats)
    return preprocess_with(base, override)


def input_channels(cfg: ModelConfig, found: int | None) -> int | None:
    """The channels the model's input says (None: not fixed), checked against `model.input_channels`."""
    wanted = None if cfg.input_channels == "auto" else cfg.input_channels
    if found is not None and wanted is not None and found != wanted:
        raise UserError(f"model.input_channels: {cfg.display_name} takes {found} channel(s), not {wanted}; set "
                        f"input_channels to 'auto' or {found}")
    return found or wanted


def check_dynamic_batch(model, spec, fix: str) -> None:
    """One forward pass on two blank images: a model traced for a batch of one fails here, not on the first batch."""
    import torch

    size = spec.preprocess.crop_size
    try:
        with torch.inference_mode():
            logits = model(torch.zeros(2, spec.input_channels, size, size))
    except Exception as exc:  # noqa: BLE001 - guard failures (AssertionError), shape errors, ORT's own...
        detail = " ".join(str(exc).split())[:160]
        raise UserError(f"model.weights: {spec.name} runs on one image but not on a batch of two "
                        f"({type(exc).__name__}: {detail}); its batch size is fixed: {fix}") from None
    if tuple(logits.shape[:1]) != (2,):
        raise UserError(f"model.weights: {spec.name} returns {tuple(logits.shape)} for a batch of two; its batch size "
                        f"is fixed: {fix}")
