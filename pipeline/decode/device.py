"""Decode on the model's device: batched JPEG decode (nvJPEG on a GPU through TorchCodec, else torchvision's),
resize and crop there too. Pillow still reads each header (the pixel limit) and the CPU `Decoder` takes what the
device is not trusted with (other formats, CMYK, broken files, DICOM), one image at a time; a refused batch is
retried image by image. Why, and how close to Pillow: docs/design-notes.md ("On the model's device")."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.decode.hashes import content_hash, hash_columns, perceptual_hash
from pipeline.decode.image import Decoder, pixel_limit
from pipeline.job.rows import error_columns

try:  # imported once per process (in the model actor), so this warns once
    from torchcodec.decoders import decode_jpeg

    BACKEND = "torchcodec"
except Exception as exc:  # noqa: BLE001 - ImportError, or OSError from its native libraries
    from torchvision.io import decode_jpeg

    BACKEND = "torchvision"
    warnings.warn(f"torchcodec did not load ({type(exc).__name__}: {exc}); JPEGs are decoded on the device by "
                  "torchvision's deprecated decode_jpeg instead", RuntimeWarning, stacklevel=2)

_INTERPOLATION = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
                  "bicubic": InterpolationMode.BICUBIC}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert("L")
_PHASH_SIDE = 32  # imagehash.phash's own resize: 8 x 8 bits, 4 x the frequency
_DEVICE_MODES = {"RGB", "L"}  # JPEG colour modes the device decoder turns into RGB itself


class DeviceDecoder:
    """Batch of encoded bytes -> the batch with sizes, errors and `pixels`, uint8 (N, crop, crop, 3) on `device`.

    Without a `Preprocess` (a detector) the pixels are a list of (H, W, 3) images at their own size, None
    for a failed row.
    """

    def __init__(self, cpu: Decoder, device: torch.device):
        self.preprocess = cpu.preprocess
        self.device = device
        self.cpu = cpu

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.cpu.dicom is not None:  # a DICOM job: frames become rows, which only the CPU decoder does
            batch = self.cpu(batch)
            pixels = batch["pixels"]
            if self.preprocess is None:
                batch["pixels"] = [torch.from_numpy(p).to(self.device) for p in pixels]
            else:
                batch["pixels"] = torch.from_numpy(pixels).to(self.device)
            return batch
        data = batch.pop("bytes")
        n = len(data)
        if self.preprocess is None:
            pixels: torch.Tensor | list = [None] * n
        else:
            size = self.preprocess.crop_size
            pixels = torch.zeros((n, size, size, 3), dtype=torch.uint8, device=self.device)
        widths, heights = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
        errors, error_types = error_columns(batch)
        on_device = [i for i in range(n) if errors[i] is None and self.device_can_decode(data[i])]
        decoded = self.decode_jpegs([data[i] for i in on_device])
        hashes = [(content_hash(d) if errors[i] is None else None, None) for i, d in enumerate(data)]
        done = [(i, image) for i, image in zip(on_device, decoded) if image is not None]
        for (i, image), phash in zip(done, device_phashes([image for _, image in done])):
            heights[i], widths[i] = image.shape[-2:]
            pixels[i] = self.resize_and_crop(image).permute(1, 2, 0)
            hashes[i] = (hashes[i][0], phash)
        on_cpu = [i for i in range(n) if errors[i] is None and (widths[i] == 0)]
        if on_cpu:
            pixels = self.decode_on_cpu(on_cpu, data, pixels, widths, heights, errors, error_types, batch, hashes)
        batch.update(image_width=widths, image_height=heights, error=errors, error_type=error_types,
                     **hash_columns(hashes))
        batch["pixels"] = pixels
        return batch

    def device_can_decode(self, data: bytes) -> bool:
        """A JPEG in a mode the device decoder handles and within the pixel limit; anything else, or a header
        Pillow cannot read, goes to the CPU decoder, which says what is wrong with it."""
        try:
            with pixel_limit(self.cpu.max_image_pixels), Image.open(io.BytesIO(data)) as image:
                return (image.format == "JPEG" and image.mode in _DEVICE_MODES
                        and image.width * image.height <= self.cpu.max_image_pixels)
        except Exception:  # noqa: BLE001 - the CPU decoder reports it
            return False

    def decode_jpegs(self, data: list[bytes]) -> list[torch.Tensor | None]:
        """One batched call; if it fails (one bad image fails the whole call), each image alone, so one bad
        file costs only itself: None, and Pillow says what is wrong with it."""
        if not data:
            return []
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        try:
            return list(self._decode(tensors))
        except Exception:  # noqa: BLE001 - RuntimeError from TorchCodec; whatever it is, Pillow retries
            results: list[torch.Tensor | None] = []
            for tensor in tensors:
                try:
                    results.append(self._decode([tensor])[0])
                except Exception:  # noqa: BLE001
                    results.append(None)
            return results

    def _decode(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """(3, H, W) uint8 images on the device, upright: both decoders apply EXIF orientation here."""
        if BACKEND == "torchcodec":
            return decode_jpeg(tensors, mode="RGB", device=self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
            return decode_jpeg(tensors, mode="RGB", device=self.device, apply_exif_orientation=True)

    def resize_and_crop(self, image: torch.Tensor) -> torch.Tensor:
        p = self.preprocess
        if p is None:
            return image
        size = [p.resize_size] if p.resize_mode == "shorter" else [p.crop_size, p.crop_size]
        image = F.resize(image, size, interpolation=_INTERPOLATION[p.interpolation], antialias=True)
        height, width = image.shape[-2:]
        if p.crop_rounding == "floor" and height >= p.crop_size and width >= p.crop_size:
            top, left = (height - p.crop_size) // 2, (width - p.crop_size) // 2
            return image[..., top:top + p.crop_size, left:left + p.crop_size]
        return F.center_crop(image, [p.crop_size])

    def decode_on_cpu(self, rows: list[int], data, pixels, widths, heights, errors, error_types, batch, hashes):
        """Decodes these rows with Pillow into `pixels` (and their phashes into `hashes`); returns the pixels
        (uint16 now if any of these is 16-bit)."""
        encoded = np.empty(len(rows), dtype=object)
        encoded[:] = [data[i] for i in rows]
        sub = {"uri": batch["uri"][rows], "bytes": encoded,
               "error": np.full(len(rows), None, dtype=object), "error_type": np.full(len(rows), None, dtype=object)}
        out = self.cpu(sub)
        if isinstance(pixels, list):
            for j, i in enumerate(rows):
                pixels[i] = torch.from_numpy(out["pixels"][j]).to(self.device)
        elif out["pixels"].dtype == np.uint16:  # a 16-bit image keeps its depth: the batch becomes uint16
            # (torch cannot index-assign uint16, so the batch is assembled as int32 first)
            widened = pixels.to(torch.int32) * 257
            widened[rows] = torch.from_numpy(out["pixels"].astype(np.int32)).to(self.device)
            pixels = widened.to(torch.uint16)
        else:
            pixels[rows] = torch.from_numpy(out["pixels"]).to(self.device)
        for j, i in enumerate(rows):
            widths[i], heights[i] = out["image_width"][j], out["image_height"][j]
            errors[i], error_types[i] = out["error"][j], out["error_type"][j]
            hashes[i] = (hashes[i][0], None if out["phash"][j] is None else int(out["phash"][j]))
        return pixels


def device_phashes(images: list[torch.Tensor]) -> list[int]:
    """The phash of each (3, H, W) uint8 image on the device: made grey (Pillow's luma) and 32 x 32 there, one
    small copy to the host, then hashed by imagehash at that size (decode/hashes.py)."""
    if not images:
        return []
    luma = torch.tensor(_LUMA, device=images[0].device).view(3, 1, 1)
    small = torch.stack([F.resize((image.float() * luma).sum(0, keepdim=True), [_PHASH_SIDE, _PHASH_SIDE],
                                  interpolation=InterpolationMode.BICUBIC, antialias=True) for image in images])
    grey = small.round().clamp(0, 255).to(torch.uint8)[:, 0].cpu().numpy()
    return [perceptual_hash(g) for g in grey]
