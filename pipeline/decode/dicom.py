"""DICOM: encoded bytes -> frames of display values at full depth (uint16 after windowing; colour keeps its
depth), and the tags a row may carry. Each frame goes stored values -> modality LUT -> VOI window ->
MONOCHROME1 inverted, per frame for enhanced objects (docs/design-notes.md, "DICOM"). A row carries only the
keys, the modality and the allow-listed tags (`pipeline.privacy.identifying`); messages never quote a value read
from the file."""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, iter_pixels
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.decode.hashes import content_hash, perceptual_hash
from pipeline.job.rows import StageFailure
from pipeline.privacy.identifying import KEY_TAGS
from pipeline.privacy.redact import redact_dicom_values
from pipeline.privacy.safe_errors import class_name

# What `pip install` names the decoders pydicom's plugins ask for.
_PACKAGES = {"gdcm": "python-gdcm", "pylibjpeg-libjpeg": "pylibjpeg-libjpeg", "pylibjpeg-openjpeg":
             "pylibjpeg-openjpeg", "pylibjpeg-rle": "pylibjpeg-rle", "pyjpegls": "pyjpegls",
             "pylibjpeg": "pylibjpeg"}
U16_MAX = 65535

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"  # LINEAR | LINEAR_EXACT | SIGMOID (PS3.3 C.11.2.1.2)


@dataclass(frozen=True)
class DicomSettings:
    """Resolved from the job's `dicom` section."""
    window: Window | str = "file"  # a Window, "file" (the file's VOI, else min-max) or "minmax"
    frames: str | tuple[int, ...] = "all"  # "all", "first", "middle" or frame indexes (negative from the end)
    tags: tuple[str, ...] = ()  # allow-listed keywords, written as extra columns


def dicom_settings(cfg) -> DicomSettings | None:
    """From the job's `dicom` section (config.DicomConfig), or None when the job does not read DICOM."""
    if cfg is None:
        return None
    window = cfg.window_spec
    return DicomSettings(window=Window(*window) if isinstance(window, tuple) else window,
                         frames=cfg.frames if isinstance(cfg.frames, str) else tuple(cfg.frames),
                         tags=tuple(cfg.include_tags))


@dataclass
class DicomImage:
    # (frame index, prepared pixels, (width, height), (content_hash of the stored pixels, phash of the shown frame))
    frames: list[tuple[int, np.ndarray, tuple[int, int], tuple[str, int]]]
    tags: dict[str, str | None]  # KEY_TAGS and the allow-listed ones


def is_dicom(data: bytes) -> bool:
    """A Part 10 file: 128-byte preamble, then 'DICM'."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_dicom(data: bytes, settings: DicomSettings, max_pixels: int, force: bool = False,
               prepare: Callable[[np.ndarray], np.ndarray] = lambda frame: frame,
               safe_errors: bool = False) -> DicomImage:
    """The selected frames, windowed and then `prepare`d (resized for the model), and the row's tags. Raises
    DicomFailure with a value-free message (`safe_errors`: none of pydicom's text at all).

    Frames are decoded and prepared one at a time, so a long multi-frame file is never held at full size."""
    ds = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
            assume_syntax(ds)
            tags = _tags_of(ds, settings)
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                kind = tags.get("Modality") or "no modality"
                raise StageFailure("no_pixel_data", f"DICOM object without pixel data ({kind})")
            check_decoder(ds)
            rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
            if rows * columns > max_pixels:
                raise StageFailure("too_many_pixels", f"frames are {columns}x{rows} = {rows * columns:,} pixels, "
                                                      f"over decode.max_image_pixels={max_pixels:,}")
            wanted = select_frames(settings.frames, int(ds.get("NumberOfFrames") or 1))
            frames = []
            for i, stored in zip(wanted, iter_pixels(ds, indices=wanted)):
                shown = to_display(ds, i, stored, settings.window)
                hashes = (content_hash(np.ascontiguousarray(stored).tobytes()), perceptual_hash(shown))
                frames.append((i, prepare(shown), (shown.shape[1], shown.shape[0]), hashes))
            return DicomImage(frames, tags)
    except StageFailure as exc:
        raise DicomFailure(exc.kind, str(exc), _tags_of(ds, settings)) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for one broken file
        raise DicomFailure(*describe_dicom_error(exc, ds, safe_errors), _tags_of(ds, settings)) from None


class DicomFailure(StageFailure):
    """A DICOM file that cannot become rows, with what its header said (its error row keeps the keys)."""

    def __init__(self, kind: str, message: str, tags: dict[str, str | None]):
        super().__init__(kind, message)
        self.tags = tags


def _tags_of(ds: Dataset | None, settings: DicomSettings) -> dict[str, str | None]:
    if ds is None:
        return {}
    try:
        return {kw: tag_text(ds, kw) for kw in KEY_TAGS + settings.tags}
    except Exception:  # noqa: BLE001 - a header too broken to read its tags
        return {}


def assume_syntax(ds: Dataset) -> None:
    """A data set without a transfer syntax (no file meta, or a meta without one) is uncompressed in the
    encoding the reader found: say so, as DICOM viewers do, so its pixels can be read."""
    if "TransferSyntaxUID" in getattr(ds, "file_meta", Dataset()):
        return
    implicit, little = ds.original_encoding
    if not hasattr(ds, "file_meta"):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def check_decoder(ds: Dataset) -> None:
    """A compressed syntax without an installed decoder names the syntax and what to install."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise StageFailure("no_decoder", f"pydicom has no decoder for transfer syntax {_syntax(syntax)}") from None
    if not decoder.is_available:
        packages = " or ".join(_packages(decoder.missing_dependencies)) or "a decoder plugin for pydicom"
        raise StageFailure("no_decoder", f"no decoder installed for {_syntax(syntax)}; install {packages}")


def _syntax(uid) -> str:
    name = getattr(uid, "name", "")
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def _packages(missing: list[str]) -> list[str]:
    """['gdcm - requires gdcm>=3.0.10', 'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1'] ->
    ['python-gdcm', 'pylibjpeg-libjpeg']: for each plugin, the package it lacks, not the ones installed."""
    from importlib.metadata import PackageNotFoundError, version

    options: list[str] = []
    for line in missing or []:
        wanted = [re.split(r"[<>=]", name.strip())[0] for name in line.split("requires", 1)[-1].split(" and ")]
        absent = []
        for name in wanted:
            package = _PACKAGES.get(name, name)
            try:
                version(package)
            except PackageNotFoundError:
                absent.append(package)
        options.append(" + ".join(absent or wanted))
    return sorted(set(options), key=options.index)


def select_frames(frames: str | tuple[int, ...], count: int) -> list[int]:
    if frames == "all":
        return list(range(count))
    if frames == "first":
        return [0]
    if frames == "middle":
        return [count // 2]
    chosen = sorted({i % count for i in frames if -count <= i < count})
    if not chosen:
        raise StageFailure("no_frame", f"none of dicom.frames {list(frames)} exists in a file of {count} frame(s)")
    return chosen


def to_display(ds: Dataset, index: int, stored: np.ndarray, window: Window | str) -> np.ndarray:
    """One frame's stored values -> H x W x C display values (uint16 after windowing, else the colour depth)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        return _full_depth(apply_color_lut(stored, ds))
    if stored.ndim == 3:  # RGB, or YBR already converted to RGB by pydicom
        return _full_depth(stored, int(ds.get("BitsStored") or stored.dtype.itemsize * 8))
    values = modality_values(ds, index, stored)
    shown = voi(ds, index, values, window)
    if photometric == "MONOCHROME1":
        shown = 1.0 - shown
    return np.round(shown * U16_MAX).astype(np.uint16)[..., np.newaxis]


def modality_values(ds: Dataset, index: int, stored: np.ndarray) -> np.ndarray:
    """Stored values -> output units of the modality LUT (e.g. Hounsfield units), as float64."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(stored, ds).astype(np.float64)
    transform = frame_item(ds, index, "PixelValueTransformationSequence")
    slope = float(_value(transform, ds, "RescaleSlope", 1.0))
    intercept = float(_value(transform, ds, "RescaleIntercept", 0.0))
    return stored.astype(np.float64) * slope + intercept


def voi(ds: Dataset, index: int, values: np.ndarray, window: Window | str) -> np.ndarray:
    """Modality values -> 0..1: the job's window, else the file's window or VOI LUT, else the frame's range."""
    if isinstance(window, Window):
        return apply_window(values, window)
    if window == "file":
        file_window = file_window_of(ds, index)
        if file_window is not None:
            return apply_window(values, file_window)
        if "VOILUTSequence" in ds:
            item = ds.VOILUTSequence[0]
            bits = int(item.LUTDescriptor[2]) or 16
            return np.clip(apply_voi(values, ds).astype(np.float64) / (2 ** bits - 1), 0.0, 1.0)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def file_window_of(ds: Dataset, index: int) -> Window | None:
    """The first window the file gives for this frame (its own VOI group, the shared one, or the top level)."""
    item = frame_item(ds, index, "FrameVOILUTSequence")
    center, width = _value(item, ds, "WindowCenter", None), _value(item, ds, "WindowWidth", None)
    if center is None or width is None:
        return None
    first = lambda v: float(v[0] if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else v)  # noqa: E731
    function = str(_value(item, ds, "VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if first(width) <= 0:
        return None
    return Window(first(center), first(width), function if function in ("LINEAR_EXACT", "SIGMOID") else "LINEAR")


def apply_window(x: np.ndarray, w: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 with an output range of 0..1."""
    c, width = w.center, w.width
    if w.function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / width))
    if w.function == "LINEAR_EXACT":
        return np.clip((x - c) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise StageFailure("bad_window", f"window width {width} is below 1, which LINEAR windows do not allow")
    if width == 1:  # the standard's formula divides by width - 1: a threshold at the center
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def frame_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The functional-group item `sequence` for frame `index`: its per-frame one, else the shared one."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        found = items[i].get(sequence) if items is not None and i < len(items) else None
        if found:
            return found[0]
    return None


def _value(item: Dataset | None, ds: Dataset, keyword: str, default):
    if item is not None and keyword in item:
        return item[keyword].value
    return ds.get(keyword, default) if ds.get(keyword) not in (None, "") else default


def _full_depth(rgb: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Colour values as uint8, or scaled to uint16 when deeper than 8 bits."""
    if rgb.dtype == np.uint8:
        return rgb
    bits = bits or rgb.dtype.itemsize * 8
    scaled = rgb.astype(np.float64) * (U16_MAX / (2 ** bits - 1))
    return np.clip(np.round(scaled), 0, U16_MAX).astype(np.uint16)


def tag_text(ds: Dataset, keyword: str) -> str | None:
    """A tag's value as text (multiple values joined with a backslash, as DICOM writes them), None if absent."""
    element = ds.get(keyword)
    if element is None or element == "":
        return None
    if isinstance(element, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in element)
    return str(element).strip() or None


def describe_dicom_error(exc: Exception, ds: Dataset | None, safe: bool = False) -> tuple[str, str]:
    """(kind, message) with every text value of the dataset redacted from pydicom's message; `safe`: without
    pydicom's message, our words and the exception's class only."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pydicom.errors.InvalidDicomError):
        return "not_dicom", "not a valid DICOM file"
    if text.startswith("Unable to decode as exceptions were raised by all available plugins"):
        # Installed decoders tried and failed (Pillow and 12-bit JPEG, a damaged codestream): say which
        # syntax, why, and which decoder the job does not have yet.
        syntax = ds.file_meta.get("TransferSyntaxUID") if ds is not None and hasattr(ds, "file_meta") else None
        reason = "no installed decoder could decode it" if safe else redact_dicom_values(text.split(":", 1)[1].strip(), ds)
        missing = _packages(get_decoder(syntax).missing_dependencies) if syntax is not None else []
        other = f"; not installed: {' or '.join(missing)}" if missing else ""
        return "undecodable", f"{_syntax(syntax) if syntax else 'pixel data'}: {reason}{other}"[:400]
    if "less than expected" in text or isinstance(exc, EOFError) or "truncated" in text.lower():
        kind = "truncated"
    else:
        kind = "corrupt"
    if safe:
        what = "pixel data shorter than its header says" if kind == "truncated" else "a damaged file"
        return kind, f"{class_name(exc)} ({what})"
    return kind, f"{type(exc).__name__}: {redact_dicom_values(text, ds)}"[:300]

