"""Decode stage: every mode to RGB, EXIF orientation, first frame, bomb guard, and errors as rows."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import encode, encoded_batch, photo
from pipeline.decode.image import Decoder, Preprocess, to_rgb

PREPROCESS = Preprocess(resize_size=64, crop_size=56, mean=(0.5,) * 3, std=(0.5,) * 3)


def decode_batch(payloads: list[bytes], max_image_pixels: int = 10**8) -> dict:
    return Decoder(PREPROCESS, max_image_pixels)(encoded_batch(payloads))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"])
def test_every_mode_becomes_three_channels(mode):
    source = photo(40, 30)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(source.convert("L"), dtype=np.uint16) * 257)
    elif mode in ("I", "F"):
        image = source.convert("L").convert(mode)
    else:
        image = source.convert(mode)
    batch = Decoder(None, 10**8)({"uri": np.array(["x"], dtype=object), "error": np.array([None]),
                                  "error_type": np.array([None]),
                                  "bytes": np.array([encode(image, "TIFF")], dtype=object)})
    pixels = batch["pixels"][0]
    assert batch["error"][0] is None and pixels.shape == (30, 40, 3)
    # Content survives the conversion: the result tracks the source's brightness, not a flat image.
    if mode != "1":
        grey = pixels.astype(float).mean(axis=2)
        assert np.corrcoef(grey.ravel(), np.asarray(source.convert("L"), dtype=float).ravel())[0, 1] > 0.9


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(to_rgb(image)).min() == 255


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats_decode(fmt):
    batch = decode_batch([encode(photo(), fmt)])
    assert batch["error"][0] is None
    assert batch["pixels"].shape == (1, 56, 56, 3) and batch["pixels"].dtype == np.uint8
    assert (batch["image_width"][0], batch["image_height"][0]) == (96, 72)
    assert "bytes" not in batch


def test_exif_orientation_is_applied():
    image = photo(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    batch = decode_batch([encode(image, "JPEG", exif=exif.tobytes())])
    assert (batch["image_width"][0], batch["image_height"][0]) == (40, 80)


def test_animated_image_uses_first_frame():
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    gif = encode(red, "GIF", save_all=True, append_images=[blue], duration=100)
    pixels = decode_batch([gif])["pixels"][0]
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


@pytest.mark.parametrize("payload, error, error_type", [
    (b"", "decode: file is empty (0 bytes)", "decode.empty"),
    (b"GIF89a but not really", "decode: ", "decode."),
    (b"plain text, not an image", "decode: not a recognised image format", "decode.not_an_image"),
])
def test_bad_bytes_become_error_rows(payload, error, error_type):
    batch = decode_batch([encode(photo(), "PNG"), payload])
    assert batch["error"][0] is None
    assert batch["error"][1].startswith(error) and batch["error_type"][1].startswith(error_type)
    assert not batch["pixels"][1].any()


def test_truncated_image():
    jpeg = encode(photo(200, 150), "JPEG")
    batch = decode_batch([jpeg[: len(jpeg) // 2]])
    assert batch["error"][0] == "decode: image file is truncated"
    assert batch["error_type"][0] == "decode.truncated"


def test_decompression_bomb_guard():
    big = encode(Image.new("L", (2000, 2000)), "PNG")  # tiny file, 4 million pixels
    batch = decode_batch([big, encode(photo(), "PNG")], max_image_pixels=1_000_000)
    assert batch["error_type"][0] == "decode.too_many_pixels"
    assert "max_image_pixels=1,000,000" in batch["error"][0]
    assert batch["error"][1] is None


def test_rows_that_already_failed_pass_through():
    batch = {
        "uri": np.array(["a", "b"], dtype=object),
        "bytes": np.array([b"", encode(photo(), "PNG")], dtype=object),
        "error": np.array(["read: object not found", float("nan")], dtype=object),
        "error_type": np.array(["read.not_found", float("nan")], dtype=object),
    }
    out = Decoder(PREPROCESS, 10**8)(batch)
    assert list(out["error"]) == ["read: object not found", None]


@pytest.mark.parametrize("size", [(96, 72), (50, 200), (300, 301), (40, 40)])
def test_resize_and_crop_match_torchvision(size):
    """Same pixels as torchvision's Resize(int) + CenterCrop on a PIL image."""
    image = photo(*size, seed=3)
    expected = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(56), transforms.PILToTensor()])(image)
    got = decode_batch([encode(image, "PNG")])["pixels"][0]
    assert torch.equal(torch.from_numpy(got), expected.permute(1, 2, 0))


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_jpeg_decodes_at_a_reduced_scale_with_nearly_the_same_pixels(orientation, monkeypatch):
    """A photo 7.5x the resize target (64) is decoded at 1/2 scale in the DCT: the model's pixels stay within a
    grey level or so of a full decode, and the row still reports the photo's own (upright) size."""
    import pipeline.decode.image as decode

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo(640, 480, seed=5), "JPEG", quality=92, exif=exif.tobytes())
    drafted = decode_batch([data])
    monkeypatch.setattr(decode, "DRAFT_GAP", 1000)  # never reduced: the full decode
    full = decode_batch([data])
    upright = (640, 480) if orientation == 1 else (480, 640)
    for batch in (drafted, full):
        assert (batch["image_width"][0], batch["image_height"][0]) == upright
    difference = np.abs(drafted["pixels"].astype(int) - full["pixels"].astype(int))
    assert 0 < difference.mean() < 1.5 and difference.max() <= 16
