"""Decode stage: encoded bytes -> pixels ready for the model, height x width x channels.

Header check against the pixel limit, first frame, EXIF orientation, the model's channels, resize and center
crop (a detector's images keep their size); 16-bit images and windowed DICOM frames stay uint16, and each
selected DICOM frame becomes a row. Whatever goes wrong becomes the row's error ("decode: image file is
truncated"); the batch carries on. Steps and depth: docs/design-notes.md ("Steps and depth").
"""

from __future__ import annotations

import io
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.decode.hashes import content_hash, hash_columns, perceptual_hash
from pipeline.job.rows import StageFailure, error_columns, fail
from pipeline.job.stage import Batch, Resources, Stage
from pipeline.privacy.identifying import KEY_TAGS, column_name
from pipeline.privacy.safe_errors import exception_text

_NO_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as Pillow's convert("L")
_PNG = b"\x89PNG\r\n\x1a\n"
# One output row of a decoded input: (DICOM frame or None, prepared pixels, upright (width, height),
# (content_hash, phash)); a failed row has no pixels, and no phash.
Decoded = tuple[int | None, "np.ndarray | None", tuple[int, int], tuple["str | None", "int | None"]]
DRAFT_GAP = 2  # a JPEG is decoded at a reduced scale only down to this many times the resize target


@dataclass(frozen=True)
class Preprocess:
    """Resolved preprocessing: every field set (from the spec, the weights' metadata or ImageNet)."""
    resize_size: int
    crop_size: int
    mean: tuple[float, ...]  # one value per model input channel
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    resize_mode: str = "shorter"  # shorter side to resize_size, then the centre crop; "exact": to crop x crop
    crop_rounding: str = "round"  # the crop's offset: round(margin / 2) as torchvision; "floor" as transformers


class Decoder(Stage):
    """Batch function: adds `pixels`, `image_width`, `image_height`; drops `bytes`.

    `pixels` is one (N, crop, crop, channels) array, or without a `Preprocess` an object array of (H, W, 3)
    arrays (0 x 0 for a failed row). With DICOM enabled (`dicom` settings) it also adds `frame`, the DICOM key
    and allow-listed tag columns and `rows_of_input`, one row per selected frame.
    `safe_errors` (privacy.pseudonymize): messages built from known-safe parts only (privacy/safe_errors.py).
    """
    # As a stage of its own (ahead of GPU model processes), a decoder takes a core per block; an input that kills
    # its process (a native crash in a codec) becomes that input's error row.
    name = "decode"
    isolates_crashes = True
    resources = Resources(cpus=1)

    def __init__(self, preprocess: Preprocess | None, max_image_pixels: int, channels: int = 3, dicom=None,
                 safe_errors: bool = False):
        self.preprocess = preprocess
        self.max_image_pixels = max_image_pixels
        self.channels = channels
        self.dicom = dicom  # dicom.DicomSettings, or None: DICOM files are reported, not read
        self.safe_errors = safe_errors

    def process(self, batch: Batch) -> Batch:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a global Pillow reads at decode time, in this worker
        errors, error_types = error_columns(batch)
        rows: list[list[Decoded]] = []  # per input: its frames
        tags: list[dict] = []
        for i, data in enumerate(batch.pop("bytes")):
            rows.append([(None, None, (0, 0), (None, None))])
            tags.append({})
            if errors[i] is not None:
                continue
            try:
                rows[i], tags[i] = self.decode(data)
            except Exception as exc:  # noqa: BLE001 - any failure is this image's, not the job's
                errors[i], error_types[i] = fail("decode", exc, partial(describe_decode_error, safe=self.safe_errors))
                rows[i] = [(None, None, (0, 0), (content_hash(data) if data is not None else None, None))]
                tags[i] = getattr(exc, "tags", {})  # a DICOM error row keeps its study, series and SOP UIDs
        counts = np.array([len(r) for r in rows])
        owner = np.repeat(np.arange(len(rows)), counts)  # output row -> input row
        if len(owner) != len(rows):
            batch.update({name: column[owner] for name, column in batch.items()})  # in place: callers hold it
        flat = [row for input_rows in rows for row in input_rows]
        batch.update(pixels=self.stack([image for _, image, _, _ in flat]),
                     image_width=np.array([w for _, _, (w, _), _ in flat], dtype=np.int32),
                     image_height=np.array([h for _, _, (_, h), _ in flat], dtype=np.int32),
                     error=errors[owner], error_type=error_types[owner],
                     **hash_columns([hashes for *_, hashes in flat]))
        if self.dicom is not None:
            batch.update(dicom_columns(self.dicom, [f for f, *_ in flat], [tags[i] for i in owner], counts[owner]))
        return batch

    def decode(self, data: bytes) -> tuple[list[Decoded], dict]:
        """[(frame, prepared pixels, (width, height), (content_hash, phash))] and tags: one row at frame None for
        an ordinary image, one per selected frame of a DICOM file (hashing that frame's pixels)."""
        from pipeline.decode.dicom import is_dicom, read_dicom

        if not data:
            raise StageFailure("empty", "file is empty (0 bytes)")
        if is_dicom(data):
            if self.dicom is None:
                raise StageFailure("dicom_not_enabled", "a DICOM file; add a 'dicom:' section to the job spec to "
                                                        "read DICOM")
            dicom = read_dicom(data, self.dicom, self.max_image_pixels, prepare=self.prepare,
                               safe_errors=self.safe_errors)
            return dicom.frames, dicom.tags
        try:
            resize_size = self.preprocess.resize_size if self.preprocess is not None else None
            image, size = open_upright(data, self.max_image_pixels, resize_size)
        except UnidentifiedImageError:
            if self.dicom is None:
                raise
            try:  # a DICOM data set without the Part 10 preamble
                dicom = read_dicom(data, self.dicom, self.max_image_pixels, force=True, prepare=self.prepare,
                                   safe_errors=self.safe_errors)
            except StageFailure as exc:
                if getattr(exc, "tags", {}).get("SOPInstanceUID"):  # it was DICOM, without usable pixels
                    raise
                raise UnidentifiedImageError() from None
            return dicom.frames, dicom.tags
        return [(None, self.prepare(image), size, (content_hash(data), perceptual_hash(image)))], {}

    def prepare(self, image: "Image.Image | np.ndarray") -> np.ndarray:
        """The model's channels, resized and cropped (whole, for a detector): (h, w, channels) uint8/uint16."""
        channels = 3 if self.preprocess is None else self.channels
        if isinstance(image, Image.Image):
            if channels == 1:
                image = image.convert("L")
            if self.preprocess is not None:
                image = resize_and_crop(image, self.preprocess)
            array = np.array(image, dtype=np.uint8)  # writable: torch refuses to wrap read-only memory
            return with_channels(array[..., np.newaxis] if array.ndim == 2 else array, channels)
        array = with_channels(image, channels)
        if self.preprocess is not None:
            array = resize_and_crop_deep(array, self.preprocess)
        return array

    def stack(self, images: list[np.ndarray | None]) -> np.ndarray:
        """One batch array (object array of whole images for a detector); uint16 if any image is."""
        deep = any(image is not None and image.dtype == np.uint16 for image in images)
        dtype = np.uint16 if deep else np.uint8
        if self.preprocess is None:
            pixels = np.empty(len(images), dtype=object)
            for i, image in enumerate(images):  # a failed row keeps an empty image: Ray stores ragged tensors
                pixels[i] = _NO_PIXELS.astype(dtype) if image is None else as_dtype(image, dtype)
            return pixels
        size = self.preprocess.crop_size
        pixels = np.zeros((len(images), size, size, self.channels), dtype=dtype)
        for i, image in enumerate(images):
            if image is not None:
                pixels[i] = as_dtype(image, dtype)
        return pixels


def open_upright(data: bytes, max_image_pixels: int, resize_size: int | None = None
                 ) -> "tuple[Image.Image | np.ndarray, tuple[int, int]]":
    """An 8-bit Pillow image in RGB or L, or a uint16 (H, W, C) array for 16-bit and float images; and the
    upright image's full (width, height), which a JPEG decoded at a reduced scale is smaller than. `resize_size`:
    the model's resize target, for `draft`; None (a detector) decodes at full size.

    Image.open has already placed a file at its first frame (for a layered Photoshop file: the flattened
    image), so nothing is sought here.
    """
    with pixel_limit(max_image_pixels):
        image = Image.open(io.BytesIO(data))
        full_size = image.size
        deep = deep_colour(data, image)
        if deep is not None:
            deep = orient(deep, image)
            return deep, size_of(deep)
        draft(image, resize_size)
        try:
            image.load()
        except OSError as exc:
            if image.format != "TIFF":
                raise
            image = tiff_fallback(data, exc)
    decoded_size = image.size
    image = ImageOps.exif_transpose(image)
    upright_size = full_size if image.size == decoded_size else full_size[::-1]  # turned a quarter
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)[..., np.newaxis], upright_size
    if image.mode in ("I", "F"):
        return stretch(np.asarray(image, dtype=np.float64))[..., np.newaxis], upright_size
    return to_rgb(image), upright_size


def draft(image: Image.Image, resize_size: int | None) -> None:
    """A large JPEG decoded at 1/2, 1/4 or 1/8 scale (libjpeg scales in the DCT, for a fraction of the
    work) when its shorter side stays at least twice the resize target, so the antialiased resize that
    follows still makes the model's pixels, as Pillow's own `thumbnail` does: a 12-megapixel photo for a
    256-pixel resize decodes at 1/4. Not for a detector (no resize target), which takes the image at its own size."""
    if resize_size is None or image.format != "JPEG":
        return
    width, height = image.size
    wanted = DRAFT_GAP * resize_size
    if min(width, height) >= 2 * wanted:  # at least one halving fits
        scale = wanted / min(width, height)
        image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))


@contextmanager
def pixel_limit(max_pixels: int):
    """Pillow's own bomb check, at our limit and raised rather than warned. It is the check that also sees the
    images a container embeds (ICO, ICNS), whose headers can claim far more than the outer one, and that Image.open
    itself may already load. Pillow reads the limit from a global, so it is set in the worker that decodes."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            claimed = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(claimed[1]):,} pixels" if claimed else "too many pixels"
            raise StageFailure("too_many_pixels", f"image claims {size} (in its header or that of an image inside "
                                                  f"it), over decode.max_image_pixels={max_pixels:,}") from None


def size_of(image: "Image.Image | np.ndarray") -> tuple[int, int]:
    return image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])


# EXIF orientation (1-8) -> the numpy steps that show the image upright, as ImageOps.exif_transpose does.
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: a.transpose(1, 0, 2)[::-1]}


def orient(array: np.ndarray, image: Image.Image) -> np.ndarray:
    """A (H, W, C) array decoded outside Pillow, turned upright by the file's EXIF orientation."""
    step = _ORIENT.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    return np.ascontiguousarray(step(array)) if step else array


def as_dtype(image: np.ndarray, dtype) -> np.ndarray:
    if image.dtype == dtype:
        return image
    return image.astype(np.uint16) * np.uint16(257)  # uint8 -> uint16: 255 -> 65535 exactly


def with_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, c) -> (H, W, channels): grey replicated to 3, colour to luma for 1."""
    have = array.shape[2]
    if have == channels:
        return array
    if have == 1:
        return np.repeat(array, channels, axis=2)
    luma = array[..., :3].astype(np.float64) @ _LUMA
    return np.round(luma).astype(array.dtype)[..., np.newaxis]


def stretch(values: np.ndarray) -> np.ndarray:
    """32-bit integer or float pixels (no fixed range) -> their own min..max as uint16."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (65535.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.round(scaled).astype(np.uint16)


def deep_colour(data: bytes, image: Image.Image) -> np.ndarray | None:
    """16-bit colour PNG and TIFF, which Pillow would cut to 8 bits: uint16 (H, W, 3), alpha on white."""
    if data.startswith(_PNG) and len(data) > 25 and data[24] == 16 and data[25] in (2, 6):
        import torch
        from torchvision.io import ImageReadMode, decode_png

        decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        array = decoded.permute(1, 2, 0).numpy()
    elif image.format == "TIFF" and image.mode in ("RGB", "RGBA", "RGBX") and max(
            image.tag_v2.get(258, (8,))) > 8:
        array = read_tiff(data)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise StageFailure("unsupported", f"16-bit TIFF laid out as {array.shape}, not height x width x colour")
    else:
        return None
    array = array.astype(np.uint16)
    if array.shape[2] == 4:  # composite on white, as 8-bit images are
        alpha = array[..., 3:].astype(np.float64) / 65535.0
        array = np.round(array[..., :3] * alpha + 65535.0 * (1 - alpha)).astype(np.uint16)
    return array


def read_tiff(data: bytes) -> np.ndarray:
    """A TIFF's first image through tifffile and imagecodecs (every compression they know, which is more than the
    libtiff Pillow was built with): (H, W) or (H, W, samples), planar files turned pixel-interleaved."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        page = tiff.pages.first
        array = page.asarray()
        if array.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
            array = np.moveaxis(array, 0, -1)
    return np.ascontiguousarray(array)


def tiff_fallback(data: bytes, error: Exception) -> Image.Image:
    """An 8-bit TIFF whose compression Pillow's libtiff lacks (WebP, JPEG XL, ZStandard...), read by tifffile."""
    try:
        array = read_tiff(data)
    except Exception:  # noqa: BLE001 - neither decoder can: report Pillow's error, the usual one
        raise error from None
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise error
    return Image.fromarray(array)


def dicom_columns(settings, frames: list[int | None], tags: list[dict], rows_of_input: np.ndarray) -> dict:
    """The DICOM columns of a decoded batch: frame (NaN: none), key and allow-listed tags, rows per input."""
    columns = {"frame": np.array([np.nan if f is None else f for f in frames], dtype=np.float64),
               "rows_of_input": rows_of_input.astype(np.int64)}
    for keyword in KEY_TAGS + settings.tags:
        columns[column_name(keyword)] = np.array([t.get(keyword) for t in tags], dtype=object)
    return columns


def resize_and_crop(image: Image.Image, p: Preprocess) -> Image.Image:
    width, height = image.size
    new_size = resized(width, height, p.resize_size) if p.resize_mode == "shorter" else (p.crop_size, p.crop_size)
    if new_size != image.size:
        image = image.resize(new_size, _RESAMPLE[p.interpolation], reducing_gap=None)
    return center_crop(image, p.crop_size, p.crop_rounding)


def resize_and_crop_deep(array: np.ndarray, p: Preprocess) -> np.ndarray:
    """uint16 (H, W, C): each channel resized as 32-bit float by Pillow (the same filter as 8-bit images)."""
    height, width = array.shape[:2]
    new_size = resized(width, height, p.resize_size) if p.resize_mode == "shorter" else (p.crop_size, p.crop_size)
    planes = []
    for c in range(array.shape[2]):
        plane = Image.fromarray(array[..., c].astype(np.float32), "F")
        if new_size != plane.size:
            plane = plane.resize(new_size, _RESAMPLE[p.interpolation], reducing_gap=None)
        planes.append(np.asarray(center_crop(plane, p.crop_size, p.crop_rounding)))
    return np.clip(np.round(np.stack(planes, axis=2)), 0, 65535).astype(np.uint16)


def resized(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """Shorter side to resize_size, longer side truncated: torchvision's Resize(int) arithmetic."""
    if width <= height:
        return resize_size, max(1, int(resize_size * height / width))
    return max(1, int(resize_size * width / height)), resize_size


def to_rgb(image: Image.Image) -> Image.Image:
    """Any 8-bit Pillow mode to RGB (grey stays L): alpha composited on white."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop(image: Image.Image, size: int, rounding: str = "round") -> Image.Image:
    """torchvision's center crop on a PIL image, padding with black when the image is smaller; `rounding` "floor":
    the offset transformers' image processors take."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
        image, width, height = padded, padded.width, padded.height
    offset = (lambda margin: margin // 2) if rounding == "floor" else (lambda margin: int(round(margin / 2.0)))
    left, top = offset(width - size), offset(height - size)
    return image.crop((left, top, left + size, top + size))


def describe_decode_error(exc: Exception, safe: bool = False) -> tuple[str, str]:
    """(kind, message): stable, path-free words for the failures Pillow reports in many ways; `safe`: none of
    the library's own text either."""
    if isinstance(exc, UnidentifiedImageError):
        return "not_an_image", "not a recognised image format"
    text = str(exc)
    stub = re.match(r"cannot find loader for this (\w+) file", text)
    if stub:  # a format Pillow recognises but leaves to an application-installed handler (GRIB, BUFR, HDF5, WMF)
        return "unsupported", f"a {stub[1]} file: no decoder for it here"
    if "truncated" in text.lower():
        return "truncated", "image file is truncated"
    return "corrupt", exception_text(exc, safe)
