"""The job spec: one validated object, loaded from YAML and command-line overrides.

Validation here is about shape (types, ranges, URI syntax, unknown keys). Whether a bucket exists or a
checkpoint loads is checked before a run starts, which needs the network and the model code.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.job.errors import UserError
from pipeline.privacy.identifying import KEY_TAGS, identifying
from pipeline.privacy.pseudonyms import KEY_HINT, MIN_KEY_BYTES

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "avif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Each store's bucket (container) names, and what a URI of it looks like.
_BUCKETS = {
    "s3": (re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]"), "s3://bucket/prefix",
           "bucket names are 3-63 lowercase letters, digits, dots or hyphens"),
    "gs": (re.compile(r"[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]"), "gs://bucket/prefix",
           "bucket names are 3-222 lowercase letters, digits, dots, hyphens or underscores"),
    "az": (re.compile(r"[a-z0-9](?!.*--)[a-z0-9\-]{1,61}[a-z0-9]"), "az://container/prefix",
           "container names are 3-63 lowercase letters, digits or single hyphens"),
}
_BUCKETS["abfs"] = _BUCKETS["abfss"] = (
    re.compile(r"[a-z0-9](?!.*--)[a-z0-9\-]{1,61}[a-z0-9](@[a-z0-9]{3,24}\.dfs\.core\.windows\.net)?"),
    "abfs://container@account.dfs.core.windows.net/prefix", _BUCKETS["az"][2])
SUPPORTED = "s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or a local path"


def check_uri(value: str) -> str:
    """Accept s3://, gs://, az:// and abfs(s):// URIs with valid bucket names, file://path or a plain local path."""
    if not value.strip():
        raise ValueError("must not be empty")
    scheme, found, rest = value.partition("://")
    if not found or scheme == "file":
        return value
    if scheme not in _BUCKETS:
        raise ValueError(f"scheme '{scheme}://' is not supported; use {SUPPORTED}")
    pattern, form, rule = _BUCKETS[scheme]
    if not pattern.fullmatch(rest.partition("/")[0]):
        raise ValueError(f"'{value}' is not a valid {form} URI ({rule})")
    return value


# What delta-rs is known to keep in a table's path, locally and on S3, besides letters and digits of any script:
# it parses the path as a URL, so `%XX` is decoded, `?` and `#` cut it, and `[ ] ^ | \\` are refused (measured
# with deltalake 1.6.6; the lease, staging and history would use the path as written, the table another one).
DELTA_SAFE_PUNCTUATION = set(" -_.~+=,;:@!$&'(){}/")


def check_delta_path(uri: str) -> None:
    """A Delta output's path in characters delta-rs writes where it was told; else ValueError naming them."""
    if uri.startswith("gs://"):
        raise ValueError(f"output.uri {uri!r}: format delta cannot write to gs:// yet (delta-rs's GCS support "
                         "cannot be tested against any GCS emulator, so it is not offered); use format parquet or "
                         "iceberg on gs://, or a Delta table on s3:// or az://")
    path = uri.partition("://")[2] if "://" in uri else uri
    odd = sorted({c for c in path if not c.isalnum() and c not in DELTA_SAFE_PUNCTUATION})
    if odd:
        raise ValueError(f"output.uri {uri!r}: delta-rs reads a table's path as a URL and would write this one "
                         f"elsewhere (it holds {' '.join(odd)}); for format delta use letters, digits, spaces and "
                         f"{''.join(sorted(DELTA_SAFE_PUNCTUATION - {' '}))} only")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for every s3:// URI of the job; default AWS_ENDPOINT_URL")
    region: str | None = Field(None, description="default AWS_REGION / AWS_DEFAULT_REGION")
    # Every request retries throttling, 5xx, resets and timeouts with exponential backoff, so one request
    # gives up after at most about max_attempts * (timeouts + 20 s of backoff).
    max_attempts: int = Field(10, ge=1, le=50, description="tries per S3 request before it fails")
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0, description="a stalled request is retried after this")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        if value is not None and not _is_http_url(value):
            raise ValueError(f"'{value}' must be an http:// or https:// URL such as http://127.0.0.1:9000")
        return value


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in value


class InputConfig(_Section):
    uri: str = Field(..., description="s3://bucket/prefix, a local folder, or a .parquet/.csv manifest "
                                      "with a 'uri' column")
    extensions: list[str] | None = Field(
        list(DEFAULT_EXTENSIONS), description="file extensions listed from a prefix; null lists every object")
    max_file_bytes: int = Field(256 * 2**20, gt=0, description="larger objects become error rows unread")
    incremental: bool = Field(True, description="skip inputs unchanged since earlier committed runs of the "
                                                "same model and weights (false, or --full: process all)")
    reprocess_errors: bool = Field(False, description="also retry inputs whose earlier row is an error")
    prefix: str | None = Field(
        None, description="S3 Inventory input only (uri: its manifest.json, or its config folder, whose latest "
        "delivery is read): only the inventoried keys that start with this, e.g. photos/2024/ (a key prefix in "
        "the inventoried bucket, not a URI); null reads every key")

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, value: str) -> str:
        return check_uri(value)

    @field_validator("prefix")
    @classmethod
    def _key_prefix(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise ValueError(f"{value!r} is a URI; give a key prefix inside the inventoried bucket, such as "
                             "photos/2024/")
        return value or None

    @model_validator(mode="after")
    def _prefix_needs_inventory(self) -> "InputConfig":
        if self.prefix is not None and self.uri.lower().endswith((".parquet", ".csv")):
            raise ValueError("input.prefix applies to an S3 Inventory (uri: its manifest.json or config folder), "
                             "not to a .parquet/.csv manifest; list only the inputs you want in the manifest")
        return self

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else sorted({e.lower().lstrip(".") for e in value})

    @property
    def is_manifest(self) -> bool:
        return self.uri.lower().endswith((".parquet", ".csv"))


class OutputConfig(_Section):
    uri: str = Field(..., description="folder (local or s3://) that receives the Parquet files, or the table's "
                                      "location for delta and iceberg")
    format: Literal["parquet", "delta", "iceberg"] = Field(
        "parquet", description="parquet: a folder of Parquet files (readers see a run's files appear over its "
        "publish window); delta or iceberg: a table, each run one atomic version (docs/commit-protocol.md)")
    catalog: dict[str, str] | None = Field(
        None, description="iceberg: pyiceberg catalog properties, e.g. {type: sql, uri: postgresql+psycopg://...} "
        "(pip install 'pipeline[iceberg-postgres]') or {type: rest, uri: https://..., warehouse: ...} or "
        "{type: glue}; default: a SQLite catalog in <output>/_catalog/ (local outputs only). `name` (default "
        "'pipeline') is the catalog's name: a SQL catalog files its tables under it, so pyiceberg, Polars, Spark or "
        "Trino must open it by that name. Secrets belong in PYICEBERG_CATALOG__* variables, not here")
    table: str = Field("default.predictions", description="iceberg: the table's identifier, namespace.name")
    conditional_writes: bool = Field(
        True, description="false only for an S3-compatible store that ignores or refuses If-None-Match: nothing "
        "then stops two runs on one output at once, so you must (docs/commit-protocol.md)")
    overwrite: bool = Field(False, description="backfill: process every input and atomically replace the "
                                                "folder's earlier output when this run commits")
    partitioning: str = Field(
        "none", description="run_date: each run's files under run_date=YYYY-MM-DD/ (append-style nightly jobs); or "
        "a string column of the output (modality, label): Hive-style folders such as modality=CT/, the column "
        "kept in the folder name only, as Spark, Athena and DuckDB's hive_partitioning expect")
    rows_per_file: int = Field(100_000, gt=0, description="rows per committed Parquet file")
    checkpoint_rows: int | None = Field(
        None, gt=0, description="progress is made durable every this many rows (default: 8 model batches)...")
    checkpoint_seconds: float = Field(10.0, gt=0, description="...or this often, whichever comes first")

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, value: str) -> str:
        return check_uri(value)

    @field_validator("partitioning")
    @classmethod
    def _partition_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", value):
            raise ValueError("must be 'none', 'run_date' or the name of a string column of the output, such as "
                             "'modality' or 'label'")
        return value

    @property
    def partition_column(self) -> str | None:
        """The string column the output is partitioned by, if any."""
        return None if self.partitioning in ("none", "run_date") else self.partitioning


class PreprocessConfig(_Section):
    """Any field left unset comes from the weights' metadata, else the ImageNet defaults."""
    resize_size: int | None = Field(None, gt=0)
    crop_size: int | None = Field(None, gt=0)
    mean: tuple[float] | tuple[float, float, float] | None = Field(
        None, description="one value per model input channel (3, or 1 for a grey model)")
    std: tuple[float] | tuple[float, float, float] | None = None
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = None


class DetectionConfig(_Section):
    score_threshold: float = Field(0.5, ge=0, le=1, description="detections scoring below this are dropped")
    max_detections: int = Field(100, gt=0, description="at most this many detections per image, best first")
    classes: list[str] | None = Field(None, description="allow-list of labels to keep; null keeps every class")


class EmbeddingConfig(_Section):
    normalize: bool = Field(True, description="L2-normalise each embedding (cosine similarity = dot product)")
    layer: str | None = Field(
        None, description="dotted name of the module whose input is the embedding; default: the classifier head "
        "(fc, classifier, head or heads, else the last Linear), or a detector's backbone output")


MODEL_SOURCES = ("torchvision", "timm", "huggingface", "onnx", "exported", "open_clip")
# Where `name` says what to load; the others load `weights` (a file) and take `name` only for the output's column.
_NAMED_SOURCES = ("torchvision", "timm", "huggingface", "open_clip")


class ZeroShotConfig(_Section):
    """Open-vocabulary tagging: `model.labels` is the vocabulary, each label put into every template."""
    templates: list[str] = Field(["a photo of a {}."], min_length=1,
                                 description="prompts, each with one '{}' for the label; a label's text embedding "
                                             "is the mean of its prompts'")
    activation: Literal["auto", "softmax", "sigmoid"] = Field(
        "auto", description="softmax over the vocabulary (CLIP), or each label on its own (SigLIP); auto: sigmoid "
                            "for models trained with a sigmoid loss (a logit bias), else softmax")
    tag_threshold: float | None = Field(
        None, ge=0, le=1, description="a label whose score reaches this is one of the row's `tags`; default 0.5 "
                                      "with sigmoid, 0.1 with softmax")

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, value: list[str]) -> list[str]:
        for template in value:
            if template.count("{}") != 1:
                raise ValueError(f"'{template}' must hold exactly one '{{}}' where the label goes")
        return value


class OnnxConfig(_Section):
    input_name: str | None = Field(None, description="the graph input that takes the images; default its only one")
    layout: Literal["auto", "NCHW", "NHWC"] = Field(
        "auto", description="the image input's layout; auto: from its shape (channels of 1 or 3 on axis 1 or 3)")


class ModelConfig(_Section):
    source: Literal[MODEL_SOURCES] = Field(  # type: ignore[valid-type]
        "torchvision", description="torchvision (an architecture by name or 'module:build_fn'), timm, huggingface "
        "(a hub id or save_pretrained folder), onnx (an .onnx file), exported (TorchScript or torch.export .pt2), "
        "open_clip")
    name: str | None = Field(None, description="torchvision architecture (resnet50, fasterrcnn_resnet50_fpn) or "
                                               "custom 'module.path:build_fn'; a timm model name; a Hugging Face hub "
                                               "id or local folder; an open_clip architecture (ViT-B-32)")
    task: Literal["auto", "classification", "detection", "zero_shot"] = Field(
        "auto", description="'auto': detection for detection models (torchvision's, a Hugging Face object "
                            "detector), zero_shot for open_clip, else classification; a custom detector says "
                            "'detection'")
    weights: str | None = Field(
        None, description="torchvision weights name (IMAGENET1K_V2, DEFAULT) or a local/s3:// file: a state_dict "
                          "(torchvision, timm), the .onnx file, the TorchScript/.pt2 archive")
    labels: str | list[str] | None = Field(
        None, description="text file, one class name per line (local or s3://); for zero_shot, the vocabulary "
                          "as a list or such a file")
    pretrained: str | None = Field(None, description="open_clip: a pretrained tag (laion2b_s34b_b79k) or a local/"
                                                     "s3:// checkpoint")
    revision: str | None = Field(None, description="huggingface: the hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="huggingface: run the model repository's own Python code")
    outputs: list[Literal["predictions", "embedding"]] = Field(
        ["predictions"], description="what each row holds: the model's predictions (labels or detections), "
                                     "its embedding (pooled features before the head), or both")
    top_k: int = Field(5, gt=0)
    input_channels: Literal["auto", 1, 3] = Field(
        "auto", description="channels the model takes: 'auto' reads them from the checkpoint or the model's first "
        "convolution; 1 adapts a torchvision architecture's stem to grey (pretrained RGB kernels summed). Grey "
        "images are replicated for 3-channel models; colour images become luma for 1-channel ones")
    preprocess: PreprocessConfig = PreprocessConfig()
    detection: DetectionConfig = DetectionConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    zero_shot: ZeroShotConfig = ZeroShotConfig()
    onnx: OnnxConfig = OnnxConfig()

    @field_validator("outputs")
    @classmethod
    def _some_outputs(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one of: predictions, embedding")
        return sorted(set(value), key=["predictions", "embedding"].index)

    @model_validator(mode="after")
    def _what_to_load(self) -> "ModelConfig":
        if self.source in _NAMED_SOURCES and not self.name:
            raise ValueError(f"model.name is required for source {self.source}")
        if self.source not in _NAMED_SOURCES and not self.weights:
            raise ValueError(f"model.weights is required for source {self.source}: the model file (local or s3://)")
        if self.task == "zero_shot" and self.source not in ("open_clip", "huggingface"):
            raise ValueError("task zero_shot needs source open_clip or huggingface (a CLIP or SigLIP model)")
        if isinstance(self.labels, list) and not [label for label in self.labels if label.strip()]:
            raise ValueError("model.labels is an empty vocabulary; give at least one label")
        return self

    @property
    def is_custom(self) -> bool:
        return self.source == "torchvision" and ":" in (self.name or "")

    @property
    def checkpoint(self) -> str | None:
        """The weights as a file URI, or None when they name torchvision weights (or are absent)."""
        if self.weights is None or (self.source == "torchvision" and is_weights_name(self.weights)
                                    and not Path(self.weights).exists()):
            return None
        return self.weights

    @property
    def display_name(self) -> str:
        """What the output's `model` column says: the name, else the model file's."""
        return self.name or Path(urlsplit(self.weights or "").path).name

    def identity(self) -> dict:
        """The settings that make predictions what they are. Settings added since outputs were first written join
        only when set, so an upgrade does not make an incremental job redo its archive."""
        added = {"source", "pretrained", "revision", "trust_remote_code", "zero_shot", "onnx"}
        unset = {name for name in added if getattr(self, name) == type(self).model_fields[name].default}
        if self.input_channels == "auto":
            unset.add("input_channels")
        return self.model_dump(exclude=unset)


def is_weights_name(value: str) -> bool:
    """IMAGENET1K_V2, DEFAULT, or ResNet50_Weights.IMAGENET1K_V2; anything else is a file."""
    return re.fullmatch(r"([A-Za-z0-9]+_Weights\.)?[A-Z][A-Z0-9_]*", value) is not None


class DecodeConfig(_Section):
    max_image_pixels: int = Field(89_478_485, gt=0, description="decompression-bomb guard (Pillow's default)")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where JPEGs are decoded when the model runs on a GPU: 'auto'/'gpu' in the GPU "
        "actor (nvJPEG, batched), 'cpu' in CPU tasks ahead of it. Without GPUs each model actor decodes on "
        "its own core")


class ComputeConfig(_Section):
    batch_size: int = Field(32, gt=0, description="images per model call")
    min_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field("auto", description="'auto': the same as max_actors")
    max_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="the pool autoscales between min and max; 'auto': as many actors as the "
        "cluster's GPUs (or, without GPUs, its CPUs) hold, counting the nodes its autoscaler can add")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float | Literal["auto"] = Field(
        "auto", description="'auto': 1 when the Ray cluster has GPUs or its autoscaler can add GPU nodes, "
        "else 0 (CPU inference)")
    memory_per_actor_gb: float = Field(2.0, gt=0, description="memory Ray reserves for each model actor")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="autocast dtype on GPU")
    channels_last: bool = Field(True, description="NHWC memory layout for the model (faster on CPU and GPU)")
    max_batch_megapixels: float = Field(
        48.0, gt=0, description="detection: a model call takes at most this many decoded pixels (in millions) "
        "however many images batch_size allows, so a batch of large photos is split instead of exhausting memory")
    ray_address: str | None = Field(None, description="existing cluster; default RAY_ADDRESS or a local Ray")
    executor: Literal["auto", "ray", "local"] = Field(
        "auto", description="local: this machine, no Ray (one model process, reading and decoding in threads); "
        "ray: Ray Data, local or a cluster; auto: local unless a cluster is named (ray_address, RAY_ADDRESS) or "
        "the machine has several GPUs")

    @field_validator("max_actors")
    @classmethod
    def _max_not_below_min(cls, value: int | str, info) -> int | str:
        low = info.data.get("min_actors", 1)
        if isinstance(value, int) and isinstance(low, int) and value < low:
            raise ValueError("must be at least compute.min_actors")
        return value


# Common CT windows (center, width) in Hounsfield units.
WINDOW_PRESETS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "soft_tissue": (40.0, 400.0),
                  "brain": (40.0, 80.0), "bone": (400.0, 1800.0)}


class WindowConfig(_Section):
    center: float = Field(..., description="in the modality's output units (Hounsfield units for CT)")
    width: float = Field(..., gt=0)
    function: Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"] = "LINEAR"


class DicomConfig(_Section):
    """Present in a spec: DICOM files are read, and rows carry the DICOM keys (study, series, SOP, frame)."""
    window: Literal["file", "minmax", "lung", "mediastinum", "soft_tissue", "brain", "bone"] | WindowConfig = Field(
        "file", description="'file': the file's window or VOI LUT (else the frame's own range); 'minmax': the "
        "frame's own range; a CT preset; or {center, width} in modality units. Applied after the modality LUT "
        "(RescaleSlope/Intercept)")
    frames: Literal["all", "first", "middle"] | list[int] = Field(
        "all", description="which frames of a multi-frame file become rows: all, first, middle, or indexes "
        "(negative from the end)")
    include_tags: list[str] = Field(
        [], description="DICOM keywords written as extra columns (snake_case). Default none: rows hold only the "
        "UIDs, frame and modality, no patient-identifying data")

    @field_validator("frames")
    @classmethod
    def _some_frames(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one frame index, or be all, first or middle")
        return value

    @field_validator("include_tags")
    @classmethod
    def _known_keywords(cls, value: list[str]) -> list[str]:
        from pydicom.datadict import dictionary_VR, keyword_dict

        for keyword in value:
            if keyword not in keyword_dict:
                hint = difflib.get_close_matches(keyword, list(keyword_dict), n=1)
                raise ValueError(f"'{keyword}' is not a DICOM keyword" + (f"; did you mean '{hint[0]}'?" if hint
                                                                          else " (see pydicom's data dictionary)"))
            if keyword in KEY_TAGS:
                raise ValueError(f"'{keyword}' is always written (a key column); remove it from include_tags")
            if set(dictionary_VR(keyword_dict[keyword]).split(" or ")) & {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}:
                raise ValueError(f"'{keyword}' is a sequence or binary attribute; only single values can be columns")
        return list(dict.fromkeys(value))

    @property
    def window_spec(self) -> tuple[float, float, str] | str:
        """(center, width, function), or 'file' / 'minmax'."""
        if isinstance(self.window, WindowConfig):
            return self.window.center, self.window.width, self.window.function
        if self.window in WINDOW_PRESETS:
            return (*WINDOW_PRESETS[self.window], "LINEAR")
        return self.window


class ErrorPolicy(_Section):
    max_error_rate: float = Field(0.1, ge=0, le=1, description="stop when this fraction of inputs failed")
    min_inputs: int = Field(200, ge=1, description="inputs seen before the rate is checked")


class PrivacyConfig(_Section):
    """Keyed pseudonymisation: see pipeline/privacy/pseudonyms.py. The key itself never appears in a spec."""
    pseudonymize: bool = Field(
        False, description="write the input uri, the DICOM study/series/SOP instance UIDs and allow-listed UID tags "
        "as keyed HMAC-SHA256 tokens (hmac:<hex>); error messages never quote the input's path")
    key_env: str | None = Field(None, description="name of the environment variable holding the key")
    key_file: str | None = Field(None, description="path of a file holding the key (a mounted secret)")
    mapping_uri: str | None = Field(
        None, description="folder (local or s3://) that receives token -> uri Parquet files for re-identification; "
        "default: no mapping is written")

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_spec(cls, data: Any) -> Any:
        if isinstance(data, dict) and set(data) & SECRET_KEYS:
            raise ValueError("a key is never written in the job spec: put it in an environment variable named by "
                             "privacy.key_env, or a file named by privacy.key_file")
        return data

    @field_validator("key_env")
    @classmethod
    def _names_a_variable(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("must name an environment variable (such as PIPELINE_PSEUDONYM_KEY), not hold the key")
        return value

    @field_validator("mapping_uri")
    @classmethod
    def _valid_uri(cls, value: str | None) -> str | None:
        return None if value is None else check_uri(value)

    @model_validator(mode="after")
    def _one_key_source(self) -> "PrivacyConfig":
        if self.key_env and self.key_file:
            raise ValueError("set key_env or key_file, not both")
        if self.pseudonymize and not (self.key_env or self.key_file):
            raise ValueError("pseudonymize needs a key: set key_env to an environment variable's name (such as "
                             "PIPELINE_PSEUDONYM_KEY) or key_file to a secret file's path")
        if self.mapping_uri and not self.pseudonymize:
            raise ValueError("mapping_uri is set but pseudonymize is off; set pseudonymize: true or remove it")
        return self

    def read_key(self) -> bytes:
        """The pseudonymisation key, from where the spec says (on the driver, when the job starts); a missing or
        weak key is one UserError line. No message, record or log ever shows it."""
        if self.key_env:
            value = os.environ.get(self.key_env)
            if value is None:
                raise UserError(f"privacy.key_env: environment variable {self.key_env} is not set; export the "
                                f"pseudonymisation key in it ({KEY_HINT})")
            return _usable_key(value.strip().encode("utf-8"), "privacy.key_env", f"environment variable {self.key_env}")
        try:
            data = Path(self.key_file).expanduser().read_bytes()  # a mounted secret on the driver's machine, not data
        except OSError as exc:
            raise UserError(f"privacy.key_file: cannot read {self.key_file} ({exc.strerror}); check the path and that "
                            "this user may read it") from None
        return _usable_key(data.strip(), "privacy.key_file", f"file {self.key_file}")


def _usable_key(key: bytes, field: str, where: str) -> bytes:
    if not key:
        raise UserError(f"{field}: {where} is empty; put the pseudonymisation key in it ({KEY_HINT})")
    if len(key) < MIN_KEY_BYTES:
        raise UserError(f"{field}: the key in {where} is too short ({len(key)} bytes); use {KEY_HINT}")
    return key


# Keys of `privacy` that would put the secret itself in the spec.
SECRET_KEYS = {"key", "secret", "hmac_key", "pseudonym_key", "password", "key_value"}

DICOM_EXTENSIONS = ("dcm", "dicom")


class JobConfig(_Section):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    storage: StorageConfig = StorageConfig()
    decode: DecodeConfig = DecodeConfig()
    compute: ComputeConfig = ComputeConfig()
    errors: ErrorPolicy = ErrorPolicy()
    dicom: DicomConfig | None = Field(None, description="read DICOM files (see DicomConfig); absent: a DICOM file "
                                                        "is an error row saying so")
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _delta_path(self) -> "JobConfig":
        if self.output.format == "delta":
            check_delta_path(self.output.uri)
        return self

    @model_validator(mode="after")
    def _dicom_extensions(self) -> "JobConfig":
        """A DICOM job lists .dcm/.dicom files unless the spec names its own extensions."""
        if self.dicom is not None and "extensions" not in self.input.model_fields_set:
            self.input.extensions = sorted({*DEFAULT_EXTENSIONS, *DICOM_EXTENSIONS})
        return self

    @model_validator(mode="after")
    def _pseudonymized_tags(self) -> "JobConfig":
        """Pseudonymised output promises no identifying value: an allow-listed one would break that promise."""
        pseudonymized = self.dicom is not None and self.privacy.pseudonymize
        flagged = identifying(self.dicom.include_tags) if pseudonymized else []
        if flagged:
            raise ValueError(f"dicom.include_tags: '{flagged[0]}' identifies the patient, and privacy.pseudonymize "
                             "promises output without identifying values; remove it from include_tags")
        return self


# CLI flag -> dotted field of the spec.
OVERRIDES = {
    "input": "input.uri",
    "prefix": "input.prefix",
    "output": "output.uri",
    "model": "model.name",  # before source: a job without a model is told to name one (--model)
    "source": "model.source",
    "weights": "model.weights",
    "pretrained": "model.pretrained",
    "labels": "model.labels",
    "batch_size": "compute.batch_size",
    "overwrite": "output.overwrite",
    "full": "input.incremental",
    "reprocess_errors": "input.reprocess_errors",
    "partitioning": "output.partitioning",
    "format": "output.format",
    "ray_address": "compute.ray_address",
    "executor": "compute.executor",
}


def load_job(spec_path: str | None, overrides: dict[str, Any]) -> JobConfig:
    """Read the YAML spec (if any), apply the non-None overrides, and validate the result."""
    return validate_spec(merged_spec(spec_path, overrides), spec_path)


def merged_spec(spec_path: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The spec as a mapping, the command line's non-None overrides applied (what `pipeline submit` ships)."""
    raw: dict[str, Any] = {}
    if spec_path is not None:
        raw = _read_yaml(spec_path)
    for flag, value in overrides.items():
        if value is not None:
            _set_dotted(raw, OVERRIDES[flag], value)
    return raw


def validate_spec(raw: dict[str, Any], spec_path: str | None) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_describe(exc, spec_path)) from None


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"job spec {path}: cannot read it ({exc.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"job spec {path}: not a text file; give a YAML job spec") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"job spec {path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"job spec {path}: the top level must be a mapping of sections (input, output, model, ...)")
    return data


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[leaf] = value


def _describe(exc: ValidationError, spec_path: str | None) -> str:
    """One line for the first problem: the field, what is wrong, how to fix it."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"] if not _is_union_member(p))
    where = f"job spec {spec_path}" if spec_path else "job"
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        known = list(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(known)}"
        return f"{where}: unknown key '{field}'; {fix}"
    if err["type"] == "missing":
        # A missing section is reported as its required field (the first override inside it).
        flag, field = next(((k, v) for k, v in OVERRIDES.items() if v == field or v.startswith(field + ".")),
                           (None, field))
        fix = f"set it in the spec or pass --{flag.replace('_', '-')}" if flag else "set it in the spec"
        return f"{where}: '{field}' is required; {fix}"
    message = err["msg"].removeprefix("Value error, ")
    if not field:  # a check across sections names its own field
        return f"{where}: {message}"
    got = err.get("input")
    # What was given under privacy may be a key put in the wrong place: never echoed.
    secret = field.split(".")[0] == "privacy"
    shown = "" if secret or (isinstance(got, str) and got in message) else f" (got {got!r})"
    return f"{where}: '{field}' {message}{shown}"


def _is_union_member(part: Any) -> bool:
    """pydantic names the member of a union that failed ('constrained-int', "literal['auto']") in the path."""
    return isinstance(part, str) and ("-" in part or "[" in part or part in ("int", "float", "str", "bool"))


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = JobConfig
    for key in loc:
        field = model.model_fields.get(str(key))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
