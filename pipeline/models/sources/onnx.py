"""ONNX: `model: {source: onnx, weights: model.onnx}`, run by onnxruntime (CUDA where torch and onnxruntime both
have it, else the CPU). The image input is `onnx.input_name` or the graph's only input; its layout and size come
from its shape (`onnx.layout` overrides), its mean/std from `model.preprocess`, else the model's metadata_props
`mean`/`std`, else ImageNet's. The batch axis must be dynamic. A local model may keep its weights beside it
(`model.onnx.data`); a model in an object store must be a single file (exported with external_data=False)."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from pipeline.io.storage import Storage
from pipeline.io.uris import is_remote
from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.resolve import finish_classifier, read_labels
from pipeline.models.sources import require
from pipeline.models.sources.model_file import (check_classifier_only, check_dynamic_batch, digest, input_channels,
                                                read_model_file, sized_preprocess)
from pipeline.models.spec import ModelSpec

LIBRARY = ("onnxruntime",)  # what the local model process imports at its start (pipeline/local/worker.py)

DYNAMIC_BATCH = ('re-export it with a dynamic batch axis (torch.onnx.export(..., dynamic_shapes={"x": {0: '
                 'Dim("batch")}}))')
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


class OnnxClassifier(nn.Module):
    """An onnxruntime session as a torch module: NCHW float images in, the graph's first output (logits) out."""

    def __init__(self, session, input_name: str, layout: str, dtype: str, remake=None):
        super().__init__()
        self.session, self.input_name, self.layout, self.dtype = session, input_name, layout, np.dtype(dtype)
        self.remake = remake  # threads -> a session on the CPU with that many; None: this session stays
        self.threads = torch.get_num_threads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.remake is not None and torch.get_num_threads() != self.threads:
            # onnxruntime takes its thread count when a session is made: it follows torch's, which the local
            # executor sets once it has weighed the model against decoding (pipeline/local/worker.py, CoreSplit).
            self.threads = torch.get_num_threads()
            self.session = self.remake(self.threads)
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy().astype(self.dtype, copy=False)
        logits = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(np.asarray(logits)).to(x.device)


def resolve(cfg: ModelConfig, storage: Storage) -> ModelSpec:
    ort = require("onnxruntime", "onnx")
    check_classifier_only(cfg, "an ONNX model")
    data = read_model_file(cfg.weights, storage, "ONNX")
    session = _session(ort, cfg.weights, data, storage, ["CPUExecutionProvider"])
    image = _image_input(session, cfg)
    layout, channels, fixed = _geometry(image, cfg)
    stats = _metadata_stats(session, cfg)
    options = {"input_name": image.name, "layout": layout, "dtype": _dtype(image, cfg)}
    spec = ModelSpec(name=cfg.display_name, weights_name=None, checkpoint=cfg.weights,
                     weights_id=digest(data, *_external_data(cfg.weights, storage)),
                     labels=read_labels(cfg.labels, storage) if cfg.labels else (),
                     preprocess=sized_preprocess(cfg, fixed, stats), top_k=cfg.top_k, task="classification",
                     outputs=tuple(cfg.outputs), embedding=cfg.embedding, input_channels=input_channels(cfg, channels),
                     source="onnx", options=options)
    model = OnnxClassifier(session, **options)
    given = bool(stats) or cfg.preprocess.mean is not None or cfg.preprocess.std is not None
    spec = finish_classifier(spec, model, mean_or_std_given=given)
    check_dynamic_batch(model, spec, DYNAMIC_BATCH)
    return spec


def build(spec: ModelSpec, storage: Storage) -> OnnxClassifier:
    ort = require("onnxruntime", "onnx")
    data = read_model_file(spec.checkpoint, storage, "ONNX")
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    def on_cpu(threads: int):
        return _session(ort, spec.checkpoint, data, storage, providers, threads=threads)

    return OnnxClassifier(on_cpu(torch.get_num_threads()), **spec.options, remake=None if cuda else on_cpu)


def _session(ort, uri: str, data: bytes, storage: Storage, providers: list[str], threads: int = 0):
    """A local model loads from its path (its external data beside it); one in an object store from its bytes."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings would be lines on the job's stderr
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(data if is_remote(uri) else storage.fs(uri)[1], sess_options=options,
                                    providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
        detail = " ".join(str(exc).split())[:200]
        if is_remote(uri) and "external" in detail.lower():
            raise UserError(f"model.weights: {uri} keeps its weights in a separate file; an ONNX model in an object store must be "
                            "a single file: export it with torch.onnx.export(..., external_data=False)") from None
        raise UserError(f"model.weights: {uri} is not an ONNX model onnxruntime can load ({type(exc).__name__}: "
                        f"{detail}); export it with torch.onnx.export") from None


def _external_data(uri: str, storage: Storage) -> list[bytes]:
    """The weights torch.onnx.export keeps beside a local model (`<file>.data`): part of the model's identity."""
    beside = uri + ".data"
    return [storage.read_bytes(beside)] if not is_remote(uri) and storage.exists(beside) else []


def _image_input(session, cfg: ModelConfig):
    inputs = session.get_inputs()
    names = ", ".join(i.name for i in inputs)
    wanted = cfg.onnx.input_name
    if wanted is not None:
        match = [i for i in inputs if i.name == wanted]
        if not match:
            raise UserError(f"model.onnx.input_name: {cfg.display_name} has no input '{wanted}'; its inputs are "
                            f"{names}")
        return match[0]
    if len(inputs) != 1:
        raise UserError(f"model.onnx.input_name: {cfg.display_name} has {len(inputs)} inputs ({names}); name the "
                        "one that takes the images")
    return inputs[0]


def _geometry(image, cfg: ModelConfig) -> tuple[str, int | None, tuple[int, int] | None]:
    """(layout, channels or None, fixed (height, width) or None) from the input's shape."""
    shape = list(image.shape)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(shape) != 4:
        raise UserError(f"model.weights: {cfg.display_name}'s input {image.name} has shape {shape}; an image "
                        "classifier takes (batch, channels, height, width) or (batch, height, width, channels)")
    if fixed[0] is not None:
        raise UserError(f"model.weights: {cfg.display_name} takes a fixed batch of {fixed[0]} (input {image.name} "
                        f"is {shape}); {DYNAMIC_BATCH}")
    layout = cfg.onnx.layout
    if layout == "auto":
        layout = "NCHW" if fixed[1] in (1, 3) else "NHWC" if fixed[3] in (1, 3) else None
    if layout is None:
        raise UserError(f"model.onnx.layout: cannot tell where the channels are in {cfg.display_name}'s input "
                        f"{image.name} {shape}; set layout to NCHW or NHWC")
    channel, height, width = (fixed[1], fixed[2], fixed[3]) if layout == "NCHW" else (fixed[3], fixed[1], fixed[2])
    size = None if height is None and width is None else (height or width, width or height)
    return layout, channel, size


def _dtype(image, cfg: ModelConfig) -> str:
    if image.type not in _DTYPES:
        raise UserError(f"model.weights: {cfg.display_name}'s input {image.name} is {image.type}; the pipeline "
                        "feeds float images (float, float16 or double)")
    return _DTYPES[image.type]


def _metadata_stats(session, cfg: ModelConfig) -> dict:
    """mean/std from the model's metadata_props ("0.5,0.5,0.5" or JSON), where the job does not set them."""
    found = session.get_modelmeta().custom_metadata_map
    stats = {}
    for key in ("mean", "std"):
        if key not in found or getattr(cfg.preprocess, key) is not None:
            continue
        text = found[key].strip()
        try:
            values = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",")]
            stats[key] = tuple(float(v) for v in values)
        except (ValueError, TypeError):
            raise UserError(f"model.weights: {cfg.display_name}'s metadata '{key}' ({text[:60]}) is not a list of "
                            f"numbers; set model.preprocess.{key}") from None
    return stats
