"""timm: `model: {source: timm, name: convnext_tiny.fb_in22k_ft_in1k}`. Weights from the name's pretrained tag
(through the Hugging Face hub cache, HF_HOME) or a state_dict file; preprocessing from the model's `pretrained_cfg`
(what `timm.data.resolve_data_config` reads); labels from `model.labels`, else the ImageNet subset its config names."""

from __future__ import annotations

import dataclasses
import difflib

from pipeline.decode.image import Preprocess
from pipeline.io.storage import Storage
from pipeline.job.config import EmbeddingConfig, ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.resolve import finish_classifier, load_checkpoint, load_weights, preprocess_with, read_labels
from pipeline.models.sources import digest, download_failed, require
from pipeline.models.spec import ModelSpec

LIBRARY = ("timm",)  # what the local model process imports at its start (pipeline/local/worker.py)

PREFETCH = ("fetch it once where there is a network (python -c \"import timm; timm.create_model('{name}', "
            "pretrained=True)\", into HF_HOME), or give model.weights a state_dict file")


def resolve(cfg: ModelConfig, storage: Storage) -> ModelSpec:
    timm = require("timm", "timm")
    _check_name(timm, cfg.name)
    if cfg.task not in ("auto", "classification"):
        raise UserError(f"model.task: timm models are classifiers here; remove task or set it to classification")
    labels = read_labels(cfg.labels, storage) if cfg.labels else None
    weights_id, state_dict = load_checkpoint(cfg.checkpoint, storage) if cfg.checkpoint else (None, None)
    num_classes = _checkpoint_classes(timm, cfg.name, state_dict, labels)
    model = _create(timm, cfg.name, num_classes, state_dict)
    if state_dict is None:
        weights_id = digest(model.state_dict())
        labels = labels or _dataset_labels(model)
    preprocess = cfg.preprocess.model_dump(exclude_none=True)
    head = model.pretrained_cfg.get("classifier")
    embedding = cfg.embedding if cfg.embedding.layer or not head else \
        EmbeddingConfig(normalize=cfg.embedding.normalize, layer=head)  # its input: timm's pre-logits features
    spec = ModelSpec(name=cfg.name, weights_name=None, checkpoint=cfg.checkpoint, weights_id=weights_id,
                     labels=labels or (), preprocess=preprocess_with(_data_config(model, cfg.name), preprocess),
                     top_k=cfg.top_k, task="classification", outputs=tuple(cfg.outputs), embedding=embedding,
                     input_channels=None if cfg.input_channels == "auto" else cfg.input_channels, source="timm",
                     options={"num_classes": num_classes})
    return finish_classifier(spec, model, mean_or_std_given="mean" in preprocess or "std" in preprocess)


def build(spec: ModelSpec, storage: Storage):
    timm = require("timm", "timm")
    state_dict = load_checkpoint(spec.checkpoint, storage)[1] if spec.checkpoint else None
    return _create(timm, spec.name, spec.options["num_classes"], state_dict).eval()


def _checkpoint_classes(timm, name: str, state_dict: dict | None, labels: tuple | None) -> int | None:
    """A checkpoint's class count: its labels', else its head's rows. None: the pretrained head's."""
    if state_dict is None:
        return None
    if labels:
        return len(labels)
    head = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier") or ""
    weight = state_dict.get(f"{head}.weight")
    return int(weight.shape[0]) if weight is not None else None


def _create(timm, name: str, num_classes: int | None, state_dict: dict | None):
    """The model: with the tag's pretrained weights, or with the state_dict's (`num_classes` classes)."""
    extra = {"num_classes": num_classes} if num_classes else {}
    try:
        model = timm.create_model(name, pretrained=state_dict is None, **extra)
    except Exception as exc:  # noqa: BLE001 - hub errors (offline, unknown tag), missing files, ...
        raise download_failed(f"timm weights for {name}", exc, PREFETCH.format(name=name)) from None
    if state_dict is not None:
        load_weights(model, state_dict, f"timm's {name} with {num_classes or 'its'} classes")
    return model.eval()


def _check_name(timm, name: str) -> None:
    if timm.is_model(name):
        return
    known = timm.list_models() + timm.list_pretrained()
    close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() and timm.list_pretrained()"
    raise UserError(f"model.name: '{name}' is not a timm model; {hint}")


def _data_config(model, name: str) -> Preprocess:
    """timm's eval transform as our preprocessing: shorter side to size / crop_pct, then the centre crop."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    crop_pct = config.get("crop_pct") or 1.0
    squash = config.get("crop_mode") == "squash"
    if height != width or config.get("crop_mode", "center") not in ("center", "squash") or squash and crop_pct != 1:
        raise UserError(f"model.preprocess: {name} takes {height}x{width} inputs cropped by "
                        f"'{config.get('crop_mode')}'; set model.preprocess (resize_size, crop_size) to a square crop")
    interpolation = config["interpolation"] if config["interpolation"] in ("nearest", "bilinear") else "bicubic"
    base = Preprocess(resize_size=int(height / crop_pct), crop_size=height, mean=tuple(config["mean"]),
                      std=tuple(config["std"]), interpolation=interpolation)
    return dataclasses.replace(base, resize_mode="exact") if squash else base


def _dataset_labels(model) -> tuple[str, ...] | None:
    """Class names of the ImageNet subset the pretrained config names (timm ships them); None: by index."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if not subset:
        return None
    info = ImageNetInfo(subset)
    return tuple(info.index_to_description(i).split(",")[0] for i in range(model.num_classes))
