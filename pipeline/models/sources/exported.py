"""Exported PyTorch: `model: {source: exported, weights: model.pt2}`, a TorchScript archive (torch.jit.save) or a
torch.export one (torch.export.save), told apart by what the archive holds; no Python class needed. Preprocessing
is `model.preprocess` over ImageNet's, at the input size a torch.export archive fixes; a classifier only."""

from __future__ import annotations

import io
import warnings
import zipfile

from pipeline.io.storage import Storage
from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.resolve import finish_classifier, read_labels
from pipeline.models.sources.model_file import (check_classifier_only, check_dynamic_batch, digest, input_channels,
                                                read_model_file, sized_preprocess)
from pipeline.models.spec import ModelSpec

LIBRARY = ("torch",)  # what the local model process imports at its start (pipeline/local/worker.py)

NEITHER = "is not a TorchScript or torch.export archive; save it with torch.jit.save / torch.export.save"
DYNAMIC_BATCH = ('export it with a dynamic batch dimension (torch.export.export(model, (x,), dynamic_shapes={"x": '
                 '{0: Dim("batch")}}), with x a batch of at least two) or script it (torch.jit.script)')


def resolve(cfg: ModelConfig, storage: Storage) -> ModelSpec:
    check_classifier_only(cfg, "an exported model")
    data = read_model_file(cfg.weights, storage, "exported model")
    kind = archive_kind(data, cfg.weights)
    model, shape = _load(data, kind, cfg.weights)
    if shape is not None and isinstance(shape[0], int):
        raise UserError(f"model.weights: {cfg.display_name} was exported for a fixed batch of {shape[0]}; "
                        f"{DYNAMIC_BATCH}")
    fixed = tuple(shape[2:]) if shape is not None and all(isinstance(d, int) for d in shape[2:]) else None
    channels = shape[1] if shape is not None and isinstance(shape[1], int) else None
    spec = ModelSpec(name=cfg.display_name, weights_name=None, checkpoint=cfg.weights, weights_id=digest(data),
                     labels=read_labels(cfg.labels, storage) if cfg.labels else (),
                     preprocess=sized_preprocess(cfg, fixed, {}), top_k=cfg.top_k, task="classification",
                     outputs=tuple(cfg.outputs), embedding=cfg.embedding, input_channels=input_channels(cfg, channels),
                     source="exported", options={"kind": kind})
    given = cfg.preprocess.mean is not None or cfg.preprocess.std is not None
    spec = finish_classifier(spec, model, mean_or_std_given=given)
    check_dynamic_batch(model, spec, DYNAMIC_BATCH)
    return spec


def build(spec: ModelSpec, storage: Storage):
    data = read_model_file(spec.checkpoint, storage, "exported model")
    return _load(data, spec.options["kind"], spec.checkpoint)[0]


def archive_kind(data: bytes, uri: str) -> str:
    """'export' (a .pt2 archive: `archive_format`) or 'torchscript' (`data.pkl` and `code/`), from the zip's
    names, so that neither loader is tried on the other's archive; anything else is one line."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        names = []
    inner = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in inner:
        return "export"
    if "data.pkl" in inner and any(name.startswith("code/") for name in inner):
        return "torchscript"
    raise UserError(f"model.weights: {uri} {NEITHER}")


def _load(data: bytes, kind: str, uri: str) -> tuple:
    """(the module on the CPU, the image input's shape: ints where fixed, None for TorchScript, which has none)."""
    import torch

    try:
        if kind == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
                return torch.jit.load(io.BytesIO(data), map_location="cpu").eval(), None
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - a damaged archive, an op this torch lacks...
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"model.weights: cannot load {uri} ({type(exc).__name__}: {detail}); {NEITHER}") from None
    return program.module(), _input_shape(program, uri)  # no eval(): the exported graph is already in eval mode


def _input_shape(program, uri: str) -> tuple:
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise UserError(f"model.weights: {uri} takes {len(inputs)} inputs ({', '.join(map(str, inputs))}); an image "
                        "classifier takes one batch of images")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    shape = tuple(d if isinstance(d, int) else None for d in node.meta["val"].shape)
    if len(shape) != 4:
        raise UserError(f"model.weights: {uri}'s input has shape {shape}; an image classifier takes (batch, channels, "
                        "height, width)")
    return shape
