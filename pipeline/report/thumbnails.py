"""Thumbnails for the report's contact sheet: each sample fetched from the input storage, upright (EXIF), small,
with a detection's boxes drawn in the photo's own pixels and a DICOM frame windowed as the job saw it, as an
embedded JPEG. An input that cannot be fetched or read becomes None, and the report shows a placeholder."""

from __future__ import annotations

import base64
import hashlib
import io
import logging

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from pipeline.io.storage import Storage
from pipeline.report.facts import Sample

logger = logging.getLogger(__name__)

THUMBNAIL_PX = 160
FETCH_AT_ONCE = 8  # inputs in memory at a time: a DICOM series file can be hundreds of MB
MAX_PIXELS = 89_478_485  # for DICOM frames; photos get Pillow's own bomb check (refused at twice this)
# Box outlines: light, saturated colours that stand out on photos; a label keeps its colour on every thumbnail.
PALETTE = ["#ffe119", "#42d4f4", "#bfef45", "#f032e6", "#ffffff", "#fabed4", "#aaffc3", "#ff8c1a"]


def thumbnails(storage: Storage, samples: list[Sample]) -> dict[Sample, str | None]:
    """Each sample's thumbnail as a data: URI, or None where its input is gone or unreadable."""
    shown: dict[Sample, str | None] = {}
    for start in range(0, len(samples), FETCH_AT_ONCE):
        group = samples[start:start + FETCH_AT_ONCE]
        for sample, data in zip(group, storage.read_many([s.uri for s in group])):
            shown[sample] = None if isinstance(data, Exception) else _thumbnail(data, sample)
    return shown


def _thumbnail(data: bytes, sample: Sample) -> str | None:
    try:
        image = _dicom_frame(data, sample.frame) if _is_dicom(data) else _photo(data)
        image = fit(image).convert("RGB")
        if sample.boxes and sample.size:
            _draw_boxes(image, sample)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
    except Exception as exc:  # noqa: BLE001 - any unreadable input becomes a placeholder, never a failed report
        logger.debug("no thumbnail for a sample: %s", type(exc).__name__)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def fit(image: Image.Image) -> Image.Image:
    """Shrunk into the thumbnail's box; a small image (a 32 px digit, a 64 px scan) enlarged into it so it can be
    seen, with hard edges rather than blur."""
    scale = THUMBNAIL_PX / max(image.size)
    if scale >= 1:
        size = (round(image.width * scale), round(image.height * scale))
        return image.resize(size, Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return image


def _is_dicom(data: bytes) -> bool:
    from pipeline.decode.dicom import is_dicom

    return is_dicom(data)


def _photo(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))  # decoded at 1/2..1/8 scale: fast and small
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "F"):
        return Image.fromarray(_to_8bit(np.asarray(image, dtype=np.float64)))
    return image.convert("RGB")


def _dicom_frame(data: bytes, frame: int | None) -> Image.Image:
    """The frame with its modality LUT and the file's own window (its VOI, else its range), as the job shows
    a model; no tag value is read into the report."""
    from pipeline.decode.dicom import DicomSettings, read_dicom

    dicom = read_dicom(data, DicomSettings(window="file", frames=(frame or 0,)), MAX_PIXELS)
    pixels = dicom.frames[0][1]
    full_scale = {np.dtype(np.uint16): 65535.0, np.dtype(np.uint8): 255.0}.get(pixels.dtype)
    return Image.fromarray(_to_8bit(pixels.astype(np.float64), full_scale))


def _to_8bit(values: np.ndarray, full_scale: float | None = None) -> np.ndarray:
    low, high = (0.0, full_scale) if full_scale else (float(values.min()), float(values.max()))
    scaled = (values - low) / (high - low or 1.0) * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8).squeeze()


def _draw_boxes(image: Image.Image, sample: Sample) -> None:
    """Each box in its label's colour, with the label and score on a dark tab above it (inside when at the top)."""
    draw = ImageDraw.Draw(image)
    scale = image.width / sample.size[0]
    for label, score, x1, y1, x2, y2 in sample.boxes:
        colour = label_colour(label)
        box = [x1 * scale, y1 * scale, x2 * scale, y2 * scale]
        draw.rectangle(box, outline=colour, width=2)
        text = f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        y = box[1] - bottom - 2 if box[1] >= bottom + 2 else box[1] + 2
        draw.rectangle([box[0], y, box[0] + right + 3, y + bottom + 1], fill="#202020")
        draw.text((box[0] + 2, y), text, fill=colour)


def label_colour(label: str) -> str:
    return PALETTE[hashlib.blake2b(label.encode(), digest_size=1).digest()[0] % len(PALETTE)]
