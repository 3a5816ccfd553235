"""Hugging Face transformers: `model: {source: huggingface, name: google/vit-base-patch16-224}`, a hub id (cached in
HF_HOME; `revision` picks a branch, tag or commit) or a local `save_pretrained` folder. Image classifiers run in
`Classifier`, with the model's image processor (its PIL backend) mapped onto our preprocessing; object detectors
run in `HuggingFaceDetector`, which uses the processor itself and maps boxes back to each image's own pixels."""

from __future__ import annotations

import difflib
import os
import sys
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.decode.image import Preprocess
from pipeline.io.storage import Storage
from pipeline.job.config import EmbeddingConfig, ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.resolve import finish_classifier, preprocess_with, read_labels
from pipeline.models.sources import digest, download_failed, huggingface_clip, require
from pipeline.models.spec import ModelSpec
from pipeline.models.stage import ModelStage

LIBRARY = ("transformers", "transformers.modeling_utils", "transformers.image_processing_utils")  # imported by
# the local model process at its start (pipeline/local/worker.py)

PREFETCH = ("fetch it once where there is a network (hf download {name}, or python -c \"import huggingface_hub; "
            "huggingface_hub.snapshot_download('{name}')\", into HF_HOME), or point model.name to a local "
            "save_pretrained folder")
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's filter numbers, as processors store them
_PLAIN_STEPS = {"do_resize", "do_rescale", "do_normalize", "do_center_crop", "do_convert_rgb", "do_reduce_labels"}
_HEADS = ("classifier", "head", "fc")
_PROBE_SIZE = (96, 128)


def resolve(cfg: ModelConfig, storage: Storage) -> ModelSpec:
    transformers = _library()
    if cfg.weights:
        raise UserError("model.weights: a Hugging Face model's weights come with model.name (a hub id or a "
                        "save_pretrained folder); remove model.weights")
    config = _load(transformers.AutoConfig, cfg, "model config")
    task = _task(cfg, config)
    if task == "zero_shot":
        return huggingface_clip.resolve_zero_shot(sys.modules[__name__], transformers, cfg, config, storage)
    resolvers = {"classification": _resolve_classifier, "detection": _resolve_detector}
    return resolvers[task](transformers, cfg, config, storage)


def build(spec: ModelSpec, storage: Storage) -> nn.Module:
    transformers = _library()
    cfg = ModelConfig(source="huggingface", name=spec.name, revision=spec.options["revision"],
                      trust_remote_code=spec.options["trust_remote_code"])
    if spec.task == "detection":
        return _weights(transformers.AutoModelForObjectDetection, cfg)
    if spec.task == "zero_shot":
        return huggingface_clip.build_zero_shot(sys.modules[__name__], transformers, cfg, spec)
    return Logits(_weights(transformers.AutoModelForImageClassification, cfg)).eval()


def encode_texts(cfg: ModelConfig, storage: Storage, texts: list[str]) -> np.ndarray:
    """What `pipeline search` ranks by: the texts in a CLIP or SigLIP model's embedding space, unit length."""
    return huggingface_clip.encode_texts(sys.modules[__name__], _library(), cfg, texts)


def stage_class(spec: ModelSpec):
    """The model stage: our own for detectors; classifiers run in the shared `Classifier`."""
    if spec.task == "detection":
        return HuggingFaceDetector
    from pipeline.models.classify import Classifier

    return Classifier


class Logits(nn.Module):
    """A transformers classifier as `Classifier` calls a model: normalised NCHW pixels in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


# ---- resolving ------------------------------------------------------------------------------------------------


def _resolve_classifier(transformers, cfg: ModelConfig, config, storage: Storage) -> ModelSpec:
    model = _weights(transformers.AutoModelForImageClassification, cfg)
    override = cfg.preprocess.model_dump(exclude_none=True)
    preprocess = _classifier_preprocess(_processor(transformers, cfg), cfg.name, override)
    multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
    spec = ModelSpec(name=cfg.name, weights_name=None, checkpoint=None, weights_id=digest(model.state_dict()),
                     labels=read_labels(cfg.labels, storage) if cfg.labels else _config_labels(config),
                     preprocess=preprocess, top_k=cfg.top_k, task="classification", outputs=tuple(cfg.outputs),
                     embedding=_embedding(cfg.embedding, model),
                     input_channels=None if cfg.input_channels == "auto" else cfg.input_channels,
                     source="huggingface", options=_options(cfg, config),
                     activation="sigmoid" if multi_label else "softmax")
    return finish_classifier(spec, Logits(model).eval(), mean_or_std_given="mean" in override or "std" in override)


def _resolve_detector(transformers, cfg: ModelConfig, config, storage: Storage) -> ModelSpec:
    if cfg.preprocess.model_dump(exclude_none=True):
        raise UserError("model.preprocess: a Hugging Face detector resizes and normalises with its own image "
                        "processor; remove model.preprocess from a detection job")
    if "embedding" in cfg.outputs:
        raise UserError("model.outputs: Hugging Face detectors give predictions only here; drop 'embedding' from "
                        "model.outputs")
    if cfg.input_channels == 1:
        raise UserError("model.input_channels: detectors take 3 channels (grey images are replicated); remove "
                        "input_channels or set it to 3")
    model = _weights(transformers.AutoModelForObjectDetection, cfg)
    spec = ModelSpec(name=cfg.name, weights_name=None, checkpoint=None, weights_id=digest(model.state_dict()),
                     labels=read_labels(cfg.labels, storage) if cfg.labels else _config_labels(config),
                     preprocess=None, top_k=cfg.top_k, task="detection", outputs=tuple(cfg.outputs),
                     detection=cfg.detection, input_channels=3, source="huggingface", options=_options(cfg, config))
    _probe_detector(model, _processor(transformers, cfg), spec)
    _check_classes(spec)
    return spec


def _task(cfg: ModelConfig, config) -> str:
    """auto: detection for an object-detection architecture (transformers' own, or a remote-code one), zero_shot for
    a zero-shot image classifier (CLIP, SigLIP), else classification. An explicit task must fit the architecture."""
    from transformers.models.auto import modeling_auto

    detector = (config.model_type in modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES
                or "AutoModelForObjectDetection" in (getattr(config, "auto_map", None) or {}))
    zero_shot = config.model_type in modeling_auto.MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES
    if cfg.task == "auto":
        return "detection" if detector else "zero_shot" if zero_shot else "classification"
    if cfg.task == "classification" and detector:
        raise UserError(f"model.task: {cfg.name} is an object detector ({config.model_type}); set model.task to "
                        "detection or auto")
    if cfg.task == "detection" and not detector:
        raise UserError(f"model.task: {cfg.name} ({config.model_type}) is not an object-detection model; set "
                        "model.task to classification or auto")
    return cfg.task


def _options(cfg: ModelConfig, config) -> dict:
    """What `build` loads again in each model process: a hub model at the very commit the driver resolved."""
    return {"revision": getattr(config, "_commit_hash", None) or cfg.revision,
            "trust_remote_code": cfg.trust_remote_code}


def _config_labels(config) -> tuple[str, ...]:
    """Class names by index from the config's id2label; a gap is named by its index."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    count = max([len(id2label), *(k + 1 for k in id2label)]) if id2label else 0
    return tuple(id2label.get(i, str(i)) for i in range(count))


def _embedding(cfg: EmbeddingConfig, model: nn.Module) -> EmbeddingConfig:
    """Layer names are the transformers model's own (the `Logits` wrapper holds it as `model`); by default the
    input of its classification head."""
    layer = cfg.layer or next((name for name in _HEADS if isinstance(getattr(model, name, None), nn.Module)), None)
    return EmbeddingConfig(normalize=cfg.normalize, layer=f"model.{layer}" if layer else None)


def _check_classes(spec: ModelSpec) -> None:
    unknown = [c for c in spec.detection.classes or () if c not in spec.labels]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], spec.labels, n=3)
        fix = f"did you mean {', '.join(hint)}?" if hint else "use names from the model's config (id2label)"
        raise UserError(f"model.detection.classes: '{unknown[0]}' is not one of {spec.name}'s labels; {fix}")


def _probe_detector(model: nn.Module, processor, spec: ModelSpec) -> None:
    """One pass on a small blank image through the stage's own steps: boxes, or one line."""
    blank = np.zeros((*_PROBE_SIZE, 3), dtype=np.uint8)
    try:
        with torch.inference_mode():
            out = detect(model, processor, [model_inputs(processor, blank)], [_PROBE_SIZE], threshold=0.0)
    except Exception as exc:  # noqa: BLE001 - whatever the model or its post-processing raises
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"model.name: {spec.name} fails on one blank {_PROBE_SIZE[1]}x{_PROBE_SIZE[0]} image "
                        f"({type(exc).__name__}: {detail})") from None
    if not (len(out) == 1 and isinstance(out[0], dict) and {"boxes", "labels", "scores"} <= set(out[0])):
        raise UserError(f"model.name: {spec.name}'s image processor gives no boxes, labels and scores from "
                        "post_process_object_detection; it is not an object detector this pipeline can run")


# ---- loading --------------------------------------------------------------------------------------------------


def _library():
    transformers = require("transformers", "huggingface")
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would fill stderr in every process
    transformers.utils.logging.set_verbosity_error()
    return transformers


def _load(loader, cfg: ModelConfig, what: str, **extra):
    options = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, **extra}
    try:
        return loader.from_pretrained(cfg.name, **options)
    except Exception as exc:  # noqa: BLE001 - OSError offline, ValueError for remote code, EnvironmentError...
        raise _load_error(cfg.name, what, exc) from None


def _load_error(name: str, what: str, exc: Exception) -> UserError:
    detail = " ".join(str(exc).split())[:200]
    if "trust_remote_code" in str(exc):
        return UserError(f"model.trust_remote_code: {name} runs its own Python code from its repository; set "
                         "model.trust_remote_code: true if you trust it")
    if os.path.isdir(name):
        return UserError(f"model.name: {name} holds no transformers {what} ({type(exc).__name__}: {detail}); give "
                         "a folder written by save_pretrained (the model and its image processor), or a hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return UserError(f"model.name: there is no folder {name}; give a save_pretrained folder or a hub id "
                         "(organisation/name)")
    return download_failed(f"the Hugging Face {what} of {name}", exc, PREFETCH.format(name=name))


def _weights(loader, cfg: ModelConfig) -> nn.Module:
    """The model in float32, eval mode; one line when the checkpoint lacks trained weights for the task's head."""
    model, info = _load(loader, cfg, "weights", dtype=torch.float32, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise UserError(f"model.name: {cfg.name} has no trained weights for {', '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''}; it is not a checkpoint fine-tuned for this task "
                        "(those weights would be random): choose one that is")
    return model.eval()


def _processor(transformers, cfg: ModelConfig):
    """The model's image processor, PIL backend (the reference semantics; the torchvision one resizes differently)."""
    return _load(transformers.AutoImageProcessor, cfg, "image processor", backend="pil")


# ---- classifiers' preprocessing ---------------------------------------------------------------------------------


def _classifier_preprocess(processor, name: str, override: dict) -> Preprocess:
    """The processor's steps as our `Preprocess`, with the job's settings on top. A processor we cannot repeat is
    one line, unless the job sets every size and statistic itself."""
    try:
        base = processor_preprocess(processor)
    except ValueError as exc:
        needed = ("resize_size", "crop_size", "mean", "std")
        if not set(needed) <= override.keys():
            raise UserError(f"model.preprocess: {name}'s image processor {exc}, which this pipeline cannot repeat; "
                            f"set model.preprocess ({', '.join(needed)}) for a square centre crop") from None
        base = Preprocess(**{k: override[k] for k in needed})
    return preprocess_with(base, override)


def processor_preprocess(processor) -> Preprocess:
    """A PIL-backend image processor's steps: square `size` (ViT) -> "exact"; `shortest_edge` and a square
    `crop_size` (BiT, DINOv2) or ConvNeXt's `crop_pct` -> "shorter". ValueError says what does not fit."""
    steps = processor.to_dict()
    extra = sorted(k for k, v in steps.items() if k.startswith("do_") and v and k not in _PLAIN_STEPS)
    if extra:
        raise ValueError(f"does {', '.join(extra)}")
    if not steps.get("do_resize") or not steps.get("do_rescale") or \
            abs(steps.get("rescale_factor", 0) * 255 - 1) > 1e-6:
        raise ValueError("takes images unresized or scaled other than by 1/255")
    interpolation = _RESAMPLE.get(int(steps.get("resample", 2)))
    if interpolation is None:
        raise ValueError(f"resamples with PIL filter {steps['resample']} (not nearest, bilinear or bicubic)")
    normalize = steps.get("do_normalize")
    mean = _per_channel(steps["image_mean"]) if normalize else (0.0, 0.0, 0.0)
    std = _per_channel(steps["image_std"]) if normalize else (1.0, 1.0, 1.0)
    resize_size, crop_size, mode = _sizes(processor, steps)
    return Preprocess(resize_size=resize_size, crop_size=crop_size, mean=mean, std=std, interpolation=interpolation,
                      resize_mode=mode, crop_rounding="floor")


def _sizes(processor, steps: dict) -> tuple[int, int, str]:
    """(resize_size, crop_size, resize_mode) from the processor's size, crop and crop_pct."""
    from transformers.image_processing_backends import PilBackend

    size, crop = steps.get("size") or {}, steps.get("crop_size") if steps.get("do_center_crop") else None
    if crop is not None and crop.get("height") != crop.get("width"):
        raise ValueError(f"crops to {crop}, not a square")
    convnext = "crop_pct" in steps and type(processor).__name__.startswith("ConvNext")
    if not convnext and (type(processor).resize is not PilBackend.resize
                         or type(processor)._preprocess is not PilBackend._preprocess):
        raise ValueError(f"({type(processor).__name__}) resizes its own way")
    if set(size) == {"height", "width"} and size["height"] == size["width"] and crop in (None, size):
        return size["height"], size["height"], "exact"
    if set(size) == {"shortest_edge"} and convnext and crop is None:
        edge = size["shortest_edge"]
        return (int(edge / steps["crop_pct"]), edge, "shorter") if edge < 384 else (edge, edge, "exact")
    if set(size) == {"shortest_edge"} and crop is not None and not convnext:
        return size["shortest_edge"], crop["height"], "shorter"
    raise ValueError(f"resizes to {size}" + (f" and crops to {crop}" if crop else " without a square crop"))


def _per_channel(value) -> tuple[float, ...]:
    values = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values * 3 if len(values) == 1 else values


# ---- detection stage ------------------------------------------------------------------------------------------


def model_inputs(processor, image: np.ndarray) -> dict[str, torch.Tensor]:
    """One (H, W, 3) image through the processor alone: its tensors at its own resized size, unpadded."""
    if torch.is_tensor(image):  # decoded on the GPU (nvJPEG): the processor works on the CPU
        image = image.cpu().numpy()
    if image.dtype != np.uint8:  # 16-bit: what Pillow would make of it
        image = np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
    return dict(processor(images=[image], return_tensors="pt", input_data_format="channels_last"))


def detect(model: nn.Module, processor, inputs: list[dict], sizes: list, threshold: float,
           device: torch.device | None = None) -> list[dict]:
    """One model call on images of one processed size: per image, post-processed boxes in its original pixels."""
    batch = {k: torch.cat([one[k] for one in inputs]).to(device or "cpu") for k in inputs[0]}
    outputs = model(**batch)
    return processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=list(sizes))


class HuggingFaceDetector(ModelStage):
    """Images at their own size -> one list of boxes per image. Images are grouped by the size the processor
    resizes them to, so none is padded by another: each gets exactly its own result. Runs in float32."""

    def __init__(self, spec: ModelSpec, storage: Storage, max_batch_megapixels: float = 48.0, **kwargs):
        super().__init__(spec, storage, **kwargs)
        self.autocast_dtype = None  # boxes from half-precision heads are pixels off
        self.processor = _processor(_library(), ModelConfig(source="huggingface", name=spec.name, **spec.options))
        self.allowed = set(spec.detection.classes) if spec.detection.classes else None
        self.max_batch_pixels = int(max_batch_megapixels * 1e6)

    def empty_columns(self, n: int) -> dict[str, np.ndarray]:
        return {"detections": np.full(n, None, dtype=object), "num_detections": np.full(n, np.nan, dtype=np.float32)}

    @torch.inference_mode()
    def predict(self, images: Sequence) -> dict[str, Sequence]:
        sizes = [tuple(int(s) for s in image.shape[:2]) for image in images]  # (height, width)
        inputs = [model_inputs(self.processor, image) for image in images]
        threshold = self.spec.detection.score_threshold
        chunks = self.in_chunks(lambda limit: self.plan(inputs, limit), lambda rows: detect(
            self.model, self.processor, [inputs[i] for i in rows], [sizes[i] for i in rows], threshold, self.device))
        detections: list = [None] * len(images)
        for rows, results in chunks:
            for i, result in zip(rows, results):
                detections[i] = self.to_rows(result, *sizes[i])
        return {"detections": detections, "num_detections": [len(d) for d in detections]}

    def plan(self, inputs: list[dict], max_images: int | None) -> list[np.ndarray]:
        """Model calls: images of one processed size together, within the image and pixel caps."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, one in enumerate(inputs):
            groups[tuple(one["pixel_values"].shape[-2:])].append(i)
        chunks = []
        for (height, width), members in groups.items():
            per_call = max(1, min(max_images or len(members), self.max_batch_pixels // (height * width)))
            chunks += [np.array(members[start:start + per_call]) for start in range(0, len(members), per_call)]
        return chunks

    def to_rows(self, result: dict, height: int, width: int) -> list[dict]:
        """Allowed classes, best first, at most max_detections, inside the image."""
        scores = result["scores"].float().cpu().numpy()
        boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)
        labels = self.spec.labels
        names = [labels[i] if 0 <= i < len(labels) else str(i) for i in result["labels"].cpu().numpy().tolist()]
        kept = [k for k in np.argsort(-scores, kind="stable") if self.allowed is None or names[k] in self.allowed]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        return [{"label": names[k], "score": float(scores[k]), "x1": float(boxes[k, 0]), "y1": float(boxes[k, 1]),
                 "x2": float(boxes[k, 2]), "y2": float(boxes[k, 3])}
                for k in kept[:self.spec.detection.max_detections]]
