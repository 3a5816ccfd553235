"""Decode stage: encoded bytes -> an RGB uint8 array (crop, crop, 3) ready for the model.

Every image goes through the same steps: header check against the pixel limit, first frame, full decode,
EXIF orientation, mode -> RGB, resize of the shorter side, center crop. For a detector (no `Preprocess`)
the image keeps its size after EXIF orientation: the detector resizes it itself and reports boxes in
these pixels. Whatever goes wrong becomes the
row's error ("decode: image file is truncated"); the batch carries on.

Pixels stay height x width x channel, as every image library lays them out: the model stage views that
memory as a channels-last NCHW tensor without a copy.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.rows import StageFailure, error_columns, fail

_NO_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    """Resolved preprocessing: every field set (from the spec, the weights' metadata or ImageNet)."""
    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


class Decoder:
    """Batch function: adds `pixels`, `image_width`, `image_height`; drops `bytes`.

    `pixels` is one (N, crop, crop, 3) array, or without a `Preprocess` an object array of (H, W, 3) arrays
    (0 x 0 for a failed row).
    """

    def __init__(self, preprocess: Preprocess | None, max_image_pixels: int):
        self.preprocess = preprocess
        self.max_image_pixels = max_image_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Pillow reads these globals at decode time, so set them in the worker that decodes. Its own bomb
        # check is off because `decode` checks the header against our limit, with a clearer message.
        Image.MAX_IMAGE_PIXELS = None
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        n = len(batch["uri"])
        if self.preprocess is None:
            pixels = np.empty(n, dtype=object)
            for i in range(n):  # a failed row keeps an empty image: Ray stores the column as ragged tensors
                pixels[i] = _NO_PIXELS
        else:
            pixels = np.zeros((n, self.preprocess.crop_size, self.preprocess.crop_size, 3), dtype=np.uint8)
        widths = np.zeros(n, dtype=np.int32)
        heights = np.zeros(n, dtype=np.int32)
        errors, error_types = error_columns(batch)
        for i, data in enumerate(batch.pop("bytes")):
            if errors[i] is not None:
                continue
            try:
                image = self.decode(data)
                widths[i], heights[i] = image.size
                pixels[i] = self.resize_and_crop(image)
            except Exception as exc:  # noqa: BLE001 - any failure is this image's, not the job's
                errors[i], error_types[i] = fail("decode", exc, describe_decode_error)
        batch.update(pixels=pixels, image_width=widths, image_height=heights, error=errors, error_type=error_types)
        return batch

    def decode(self, data: bytes) -> Image.Image:
        if not data:
            raise StageFailure("empty", "file is empty (0 bytes)")
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > self.max_image_pixels:
            raise StageFailure("too_many_pixels", f"image is {width}x{height} = {width * height:,} pixels, over "
                                                  f"decode.max_image_pixels={self.max_image_pixels:,}")
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)

    def resize_and_crop(self, image: Image.Image) -> np.ndarray:
        p = self.preprocess
        if p is None:
            return np.array(image, dtype=np.uint8)  # writable: torch refuses to wrap read-only memory
        width, height = image.size
        # Shorter side to resize_size, longer side truncated: torchvision's Resize(int) arithmetic.
        if width <= height:
            new_size = (p.resize_size, max(1, int(p.resize_size * height / width)))
        else:
            new_size = (max(1, int(p.resize_size * width / height)), p.resize_size)
        if new_size != image.size:
            image = image.resize(new_size, _RESAMPLE[p.interpolation], reducing_gap=None)
        image = center_crop(image, p.crop_size)
        return np.asarray(image, dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, 16/32-bit and float scaled to 0..255."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((array >> 8).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's center crop on a PIL image, padding with black when the image is smaller."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new("RGB", (max(width, size), max(height, size)))
        padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
        image, width, height = padded, padded.width, padded.height
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def describe_decode_error(exc: Exception) -> tuple[str, str]:
    """(kind, message): stable, path-free words for the failures Pillow reports in many ways."""
    if isinstance(exc, UnidentifiedImageError):
        return "not_an_image", "not a recognised image format"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "too_many_pixels", f"decompression bomb guard: {exc}"
    text = str(exc)
    if "truncated" in text.lower():
        return "truncated", "image file is truncated"
    return "corrupt", f"{type(exc).__name__}: {text}" if text else type(exc).__name__
