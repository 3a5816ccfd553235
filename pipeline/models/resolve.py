"""Which model, with which weights, labels and preprocessing.

`resolve_model` runs once on the driver: it checks the name, reads the labels, hashes the checkpoint and
builds the model once on the CPU, so a wrong name or a checkpoint that does not fit fails in a second with
one line instead of inside every actor. `build_model` is what each actor calls to get its own copy.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import inspect
import io

import torch
from torch import nn

from pipeline.decode.image import Preprocess
from pipeline.io.storage import Storage
from pipeline.models.embedding import EmbeddingTap
from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.spec import IMAGENET_PREPROCESS, ModelSpec

# The classifier a check built, kept for the build that follows in the same process when `keep_checked` is on
# (the local executor's model process checks the model, then serves with it): not loaded twice. Not for an ONNX
# session (built for the CPU to check) nor a custom builder (it may tell a check from serving).
_checked: dict[tuple, nn.Module] = {}
keep_checked = False


def _checked_key(spec: ModelSpec) -> tuple | None:
    if not keep_checked or spec.source == "onnx" or (spec.source == "torchvision" and ":" in spec.name):
        return None
    return spec.source, spec.name, spec.weights_id, spec.checkpoint


def source_module(source: str):
    """pipeline/models/sources/<source>.py: `resolve(cfg, storage) -> ModelSpec` and `build(spec, storage)`."""
    return importlib.import_module(f"pipeline.models.sources.{source}")


def _torchvision():
    """torchvision, imported only for its own architectures: its import (~1 s of CPU, torch._dynamo among it) is
    paid by every model process, and a custom, ONNX or Hugging Face model never needs it."""
    import torchvision

    return torchvision


def classification_models() -> list[str]:
    torchvision = _torchvision()
    return torchvision.models.list_models(module=torchvision.models)


def detection_models() -> list[str]:
    torchvision = _torchvision()
    return torchvision.models.list_models(module=torchvision.models.detection)


def resolve_task(task: str, name: str) -> str:
    if task != "auto":
        return task
    if ":" in name:  # module:build_fn, never one of torchvision's detectors
        return "classification"
    return "detection" if name in detection_models() else "classification"


def resolve_model(cfg: ModelConfig, storage: Storage) -> ModelSpec:
    if cfg.source != "torchvision":
        return source_module(cfg.source).resolve(cfg, storage)
    task = resolve_task(cfg.task, cfg.name)
    _check_name(cfg.name, cfg.is_custom, task, task_given=cfg.task != "auto")
    weights_enum = _torchvision_weights(cfg.name, cfg.weights, cfg.is_custom) if cfg.weights and not cfg.checkpoint \
        else None
    if cfg.checkpoint and cfg.labels is None:
        raise UserError("model.labels: required with a checkpoint; give a text file with one class name per "
                        "line (its line count sets num_classes)")
    labels = read_labels(cfg.labels, storage) if cfg.labels else None
    preprocess = cfg.preprocess.model_dump(exclude_none=True)  # the job's own settings, over the weights' ones
    if labels is None and weights_enum is not None:
        labels = tuple(weights_enum.meta["categories"])
    if labels is None and not cfg.is_custom:
        raise UserError(f"model.weights: {cfg.name} needs weights: a torchvision weights name (e.g. DEFAULT) "
                        "or a checkpoint with model.labels")
    weights_id, state_dict = load_checkpoint(cfg.checkpoint, storage) if cfg.checkpoint else (None, None)
    spec = ModelSpec(
        name=cfg.name,
        weights_name=str(weights_enum) if weights_enum is not None else None,
        checkpoint=cfg.checkpoint,
        weights_id=weights_id or (str(weights_enum) if weights_enum is not None else "none"),
        labels=labels or (),
        preprocess=resolve_preprocess(preprocess, weights_enum) if task == "classification" else
        _no_preprocess(preprocess),
        top_k=cfg.top_k,
        task=task,
        outputs=tuple(cfg.outputs),
        detection=cfg.detection,
        embedding=cfg.embedding,
        input_channels=None if cfg.input_channels == "auto" else cfg.input_channels,
    )
    if task == "detection" and spec.input_channels == 1:
        raise UserError("model.input_channels: torchvision detectors take 3 channels (grey images are replicated); "
                        "remove input_channels or set it to 3")
    model = _instantiate(spec, state_dict)
    if task == "detection":
        spec = with_channels(spec, model, mean_or_std_given=False)
        _probe_detector(model, spec)
        _check_classes(spec)
        if spec.wants_embedding:
            spec = dataclasses.replace(spec, embedding_dim=probe_embedding(model, spec))
        return spec
    return finish_classifier(spec, model, mean_or_std_given="mean" in preprocess or "std" in preprocess)


def finish_classifier(spec: ModelSpec, model: nn.Module, mean_or_std_given: bool) -> ModelSpec:
    """The spec of a built classifier, checked by one forward pass: its channels, its classes (named by index
    without labels), its embedding's width."""
    spec = with_channels(spec, model, mean_or_std_given)
    num_outputs = probe_classifier(model, spec)
    if not spec.labels:  # a model without a labels file: classes are named by index
        spec = dataclasses.replace(spec, labels=tuple(str(i) for i in range(num_outputs)))
    if num_outputs != len(spec.labels):
        raise UserError(f"model.labels: {len(spec.labels)} labels, but {spec.name} outputs {num_outputs} "
                        "classes; give one line per class, in the model's class order")
    if spec.wants_embedding:
        spec = dataclasses.replace(spec, embedding_dim=probe_embedding(model, spec))
    key = _checked_key(spec)
    if key is not None:
        _checked.clear()
        _checked[key] = model
    return spec


def _check_name(name: str, is_custom: bool, task: str, task_given: bool) -> None:
    if is_custom:
        return
    known = classification_models() if task == "classification" else detection_models()
    if name in known:
        return
    if name in detection_models() + classification_models():
        other = "detection" if task == "classification" else "classification"
        raise UserError(f"model.name: '{name}' is a torchvision {other} model, but model.task is '{task}'; "
                        f"set model.task to '{other}' or 'auto'")
    everything = classification_models() + detection_models()
    wanted = name.lower().replace("-", "_")
    close = [m for m in everything if wanted in m] or difflib.get_close_matches(wanted, everything, n=3, cutoff=0.75)
    hint = f"did you mean {', '.join(close[:5])}?" if close else "see torchvision.models.list_models()"
    kind = task if task_given else "classification or detection"
    raise UserError(f"model.name: '{name}' is not a torchvision {kind} model; {hint} "
                    "(a custom model is 'module.path:build_fn')")


def build_model(spec: ModelSpec, storage: Storage) -> nn.Module:
    """Called once per actor: the model in eval mode on the CPU, weights loaded."""
    kept = _checked.pop(_checked_key(spec), None)
    if kept is not None:
        return kept
    if spec.source != "torchvision":
        return source_module(spec.source).build(spec, storage)
    state_dict = load_checkpoint(spec.checkpoint, storage)[1] if spec.checkpoint else None
    return _instantiate(spec, state_dict)


def _instantiate(spec: ModelSpec, state_dict: dict | None) -> nn.Module:
    num_classes = len(spec.labels) or None
    torchvision = None if ":" in spec.name else _torchvision()
    if ":" in spec.name:
        model = _build_custom(spec.name, num_classes)
    elif spec.weights_name:
        weights = torchvision.models.get_weight(spec.weights_name)
        try:
            model = torchvision.models.get_model(spec.name, weights=weights)
        except Exception as exc:  # download failures surface as URLError, HTTPError, OSError...
            raise UserError(f"model.weights: cannot load {spec.weights_name} ({type(exc).__name__}: {exc}); "
                            "it downloads into TORCH_HOME, so check the network or use a local checkpoint") from None
    elif spec.task == "detection":
        # Detection builders fetch ImageNet backbone weights unless told not to; the checkpoint has them all.
        model = torchvision.models.get_model(spec.name, weights=None, weights_backbone=None, num_classes=num_classes)
    else:
        model = torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes)
    if ":" not in spec.name and spec.task == "classification":
        _fit_stem(model, spec.input_channels, state_dict)
    if state_dict is not None:
        load_weights(model, state_dict, f"{spec.name} with {num_classes} classes")
    return model.eval()


def load_weights(model: nn.Module, state_dict: dict, what: str, field: str = "model.weights") -> None:
    """The state_dict into the model, every tensor; one line when it does not fit (`what`: the model, in words)."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{field}: the checkpoint does not fit {what} ({detail}); check model.name and "
                        "model.labels") from None


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | tuple[None, None]:
    """The stem: the first Conv2d in definition order (conv1, features.conv0, features.0.0, conv_proj...)."""
    return next(((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))


def _fit_stem(model: nn.Module, channels: int | None, state_dict: dict | None) -> None:
    """Give a torchvision architecture the input channels asked for (None: the checkpoint's). Pretrained RGB
    kernels are summed, so a grey image gives the same response as its 3-channel replica."""
    name, conv = first_conv(model)
    if conv is None:
        return
    if channels is None and state_dict is not None and f"{name}.weight" in state_dict:
        channels = int(state_dict[f"{name}.weight"].shape[1])
    stored = state_dict.get(f"{name}.weight") if state_dict is not None else None
    if channels is not None and stored is not None and stored.ndim == 4 and stored.shape[1] != channels:
        raise UserError(f"model.input_channels: the checkpoint's first convolution ({name}) takes "
                        f"{stored.shape[1]} channel(s), not {channels}; set input_channels to 'auto' or "
                        f"{stored.shape[1]}")
    if channels is None or channels == conv.in_channels:
        return
    stem = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        if channels == 1:
            stem.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            stem.bias.copy_(conv.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, stem)


def with_channels(spec: ModelSpec, model: nn.Module, mean_or_std_given: bool) -> ModelSpec:
    """The spec with the model's input channels, and mean/std with one value per channel."""
    _, conv = first_conv(model)
    # No convolution to read (an ONNX session, a TorchScript or torch.export module): what the spec says, else 3.
    channels = conv.in_channels if conv is not None and conv.in_channels in (1, 3) else spec.input_channels or 3
    if spec.input_channels is not None and spec.input_channels != channels:
        raise UserError(f"model.input_channels: {spec.name}'s first convolution takes {channels} channel(s), not "
                        f"{spec.input_channels}; set input_channels to 'auto' or {channels}")
    p = spec.preprocess
    if p is not None and len(p.mean) != channels:
        if mean_or_std_given:
            raise UserError(f"model.preprocess: mean and std need {channels} value(s), one per input channel of "
                            f"{spec.name}")
        # Defaults (ImageNet's) for a grey model: the average over the colour channels.
        p = dataclasses.replace(p, mean=(sum(p.mean) / 3,), std=(sum(p.std) / 3,))
    if p is not None and len(p.std) != len(p.mean):
        raise UserError("model.preprocess: mean and std need the same number of values")
    return ModelSpec(**{**spec.__dict__, "input_channels": channels, "preprocess": p})


def _build_custom(target: str, num_classes: int | None) -> nn.Module:
    module_name, _, fn_name = target.partition(":")
    try:
        build_fn = getattr(importlib.import_module(module_name), fn_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, AttributeError, an error inside the module...
        raise UserError(f"model.name: cannot import '{target}' ({type(exc).__name__}: {exc}); the module must be "
                        "importable (installed, or on PYTHONPATH) and define that function") from None
    if not callable(build_fn):
        raise UserError(f"model.name: '{target}' is not a function")
    try:
        accepts_classes = "num_classes" in inspect.signature(build_fn).parameters
        model = build_fn(num_classes=num_classes) if accepts_classes and num_classes else build_fn()
    except Exception as exc:  # noqa: BLE001 - whatever the user's builder raises
        raise UserError(f"model.name: '{target}' raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.name: '{target}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_weights(name: str, weights: str, is_custom: bool):
    if is_custom:
        raise UserError(f"model.weights: '{weights}' is a torchvision weights name, but a custom model needs "
                        "a checkpoint file (a local path, or s3://, gs:// or az://)")
    torchvision = _torchvision()
    try:
        if "." in weights:
            return torchvision.models.get_weight(weights)
        return torchvision.models.get_model_weights(name)[weights]
    except (KeyError, ValueError) as exc:
        try:
            names = ", ".join(torchvision.models.get_model_weights(name).__members__)
        except (KeyError, ValueError):
            raise UserError(f"model.name: '{name}' is not a torchvision classification model; "
                            "see torchvision.models.list_models()") from exc
        raise UserError(f"model.weights: '{weights}' is not a weights name of {name}; "
                        f"choose one of {names}, or give a checkpoint path") from None


def read_labels(uri: str | list[str], storage: Storage) -> tuple[str, ...]:
    """Class names from a text file (one per line), or a list given in the spec."""
    if isinstance(uri, list):
        return tuple(label.strip() for label in uri if label.strip())
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except Exception as exc:  # noqa: BLE001 - OSError, UnicodeDecodeError, botocore errors...
        raise UserError(f"model.labels: cannot read {uri} ({type(exc).__name__}); give a UTF-8 text file, one "
                        "class name per line") from None
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise UserError(f"model.labels: {uri} is empty; it needs one class name per line")
    return labels


def load_checkpoint(uri: str, storage: Storage) -> tuple[str, dict]:
    """(sha256 id, state_dict). Loaded with weights_only=True: a checkpoint cannot run code."""
    try:
        data = storage.read_bytes(uri)
    except Exception as exc:  # noqa: BLE001 - OSError, botocore's NoCredentialsError, a bad endpoint...
        raise UserError(f"model.weights: cannot read checkpoint {uri} ({type(exc).__name__}: {exc}); "
                        "check the path and credentials") from None
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors all mean "not a checkpoint"
        raise UserError(f"model.weights: {uri} is not a loadable state_dict ({type(exc).__name__}); save it "
                        "with torch.save(model.state_dict(), path)") from None
    return "sha256:" + hashlib.sha256(data).hexdigest(), _unwrap_state_dict(loaded, uri)


def _unwrap_state_dict(loaded, uri: str) -> dict:
    """Accept a bare state_dict, or a training checkpoint holding one under 'state_dict'/'model'."""
    if isinstance(loaded, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"model.weights: {uri} does not hold a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def resolve_preprocess(override: dict, weights_enum) -> Preprocess:
    """The weights' own preprocessing (ImageNet's without weights metadata), with the job's `override` on top."""
    base = IMAGENET_PREPROCESS
    if weights_enum is not None:
        t = weights_enum.transforms()
        if all(hasattr(t, a) for a in ("resize_size", "crop_size", "mean", "std")):
            base = Preprocess(resize_size=int(t.resize_size[0]), crop_size=int(t.crop_size[0]),
                              mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value)
    return preprocess_with(base, override)


def preprocess_with(base: Preprocess, override: dict) -> Preprocess:
    """`base` (the model's own preprocessing) with the job's settings on top, checked."""
    resolved = dataclasses.replace(base, **override)
    if resolved.resize_mode == "shorter" and resolved.crop_size > resolved.resize_size:
        raise UserError(f"model.preprocess: crop_size {resolved.crop_size} is larger than resize_size "
                        f"{resolved.resize_size}; make crop_size <= resize_size")
    return resolved


def _no_preprocess(override: dict) -> None:
    if override:
        raise UserError("model.preprocess: a detector resizes and normalises with its own transform; remove "
                        "model.preprocess from a detection job")
    return None


def _probe_detector(model: nn.Module, spec: ModelSpec) -> None:
    """One forward pass on a small blank image: the detection API (a list of dicts with boxes) or a clear error."""
    try:
        with torch.inference_mode():
            out = model([torch.zeros(3, 96, 128)])
    except Exception as exc:  # noqa: BLE001 - whatever a custom detector raises
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"model.name: {spec.name} fails on a list with one 3x96x128 image ({type(exc).__name__}: "
                        f"{detail}); a detector takes a list of CHW float images in 0..1") from None
    if not (isinstance(out, (list, tuple)) and len(out) == 1 and isinstance(out[0], dict)
            and {"boxes", "labels", "scores"} <= set(out[0])):
        raise UserError(f"model.name: {spec.name} must return one dict with boxes, labels and scores per image, as "
                        "torchvision's detectors do; set model.task to 'classification' if it is a classifier")


def _check_classes(spec: ModelSpec) -> None:
    allowed = spec.detection.classes
    if not allowed or not spec.labels:
        return
    unknown = [c for c in allowed if c not in spec.labels]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], spec.labels, n=3)
        fix = f"did you mean {', '.join(hint)}?" if hint else "use names from the model's labels"
        raise UserError(f"model.detection.classes: '{unknown[0]}' is not one of {spec.name}'s labels; {fix}")


def probe_embedding(model: nn.Module, spec: ModelSpec) -> int:
    """The embedding's width, from one forward pass with the tap attached."""
    tap = EmbeddingTap(model, spec.task, spec.embedding.layer, spec.embedding.normalize)
    size = spec.preprocess.crop_size if spec.preprocess else 128
    with torch.inference_mode():
        model([torch.zeros(3, size, size)] if spec.task == "detection" else
              torch.zeros(1, spec.input_channels, size, size))
    dim = tap.take().shape[1]
    tap.remove()
    return int(dim)


def probe_classifier(model: nn.Module, spec: ModelSpec) -> int:
    """One forward pass on a blank image of the configured size: the number of classes, or a clear error."""
    size, channels = spec.preprocess.crop_size, spec.input_channels
    try:
        with torch.inference_mode():
            logits = model(torch.zeros(1, channels, size, size))
    except Exception as exc:  # noqa: BLE001 - shape errors come as RuntimeError, ValueError, ...
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"model.preprocess: {spec.name} fails on a {channels}x{size}x{size} input ({type(exc).__name__}: "
                        f"{detail}); set model.preprocess.crop_size to what the model expects") from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise UserError(f"model.name: {spec.name} must return class scores of shape (batch, classes), got "
                        f"{getattr(logits, 'shape', type(logits).__name__)}")
    return int(logits.shape[1])
