"""Real-world odd files (tests/odd_files: Pillow's own test images, fuzzer finds and bombs included) and a few made
here: every file is one row, decoded when a decoder can read it, its error otherwise; nothing takes the job down."""

from __future__ import annotations

import csv
import io
import os
import shutil
import struct
import time
import zlib

import duckdb
import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import encode, photo
from pipeline.decode.image import Decoder
from test_pipeline import job
from pipeline.ray.executor import run_on_ray

CORPUS = os.path.join(os.path.dirname(__file__), "odd_files")


def expected_outcomes() -> dict[str, str | None]:
    with open(os.path.join(CORPUS, "expected.csv"), newline="") as f:
        return {row["file"]: row["error_type"] or None for row in csv.DictReader(f)}


def decode_whole(data: bytes) -> dict:
    """One file through the decoder as a detector gets it: the whole image, upright, no resize."""
    return Decoder(None, 89_478_485)({"uri": np.array(["f"], dtype=object), "bytes": np.array([data], dtype=object),
                                      "error": np.array([None], dtype=object),
                                      "error_type": np.array([None], dtype=object)})


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def ico_with_png_bomb() -> bytes:
    """An ICO whose directory says 256x256 while the PNG inside claims 510,000 x 510,000 (260 gigapixels)."""
    png = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 510_000, 510_000, 8, 6, 0, 0, 0))
           + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + png_chunk(b"IEND", b""))
    directory = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + directory + png


def deep_colour_png_rotated(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG with EXIF orientation 6 (shown rotated 90 degrees clockwise)."""
    height, width, _ = array.shape
    scanlines = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))
    exif = Image.Exif()
    exif[0x0112] = 6
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + png_chunk(b"eXIf", exif.tobytes().removeprefix(b"Exif\0\0"))
            + png_chunk(b"IDAT", zlib.compress(scanlines)) + png_chunk(b"IEND", b""))


def deep_colour_tiff_rotated(array: np.ndarray) -> bytes:
    """A 16-bit RGB TIFF, LZW-compressed (needs imagecodecs), with TIFF orientation 6."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, photometric="rgb", compression="lzw", extratags=[(274, "H", 1, 6, True)])
    return buffer.getvalue()


DEEP = (np.arange(4 * 6 * 3, dtype=np.uint16).reshape(4, 6, 3) * 900)  # 4 high, 6 wide, values above 255
UPRIGHT = np.ascontiguousarray(np.rot90(DEEP, k=-1))  # orientation 6: rotate 90 degrees clockwise to view


def made_files() -> dict[str, tuple[bytes, str | None]]:
    return {
        "made/ico_png_bomb.ico": (ico_with_png_bomb(), "decode.too_many_pixels"),
        "made/deep_rotated.png": (deep_colour_png_rotated(DEEP), None),
        "made/deep_rotated_lzw.tif": (deep_colour_tiff_rotated(DEEP), None),
        "made/empty.jpg": (b"", "decode.empty"),
        "made/text_named.jpg": (b"date,label\n2024-05-01,cat\n", "decode.not_an_image"),
        "made/png_named.jpg": (encode(photo(), "PNG"), None),
    }


@pytest.mark.parametrize("name", sorted(expected_outcomes()))
def test_each_corpus_file_decodes_or_says_why(name):
    with open(os.path.join(CORPUS, "images", name), "rb") as f:
        batch = decode_whole(f.read())
    assert batch["error_type"][0] == expected_outcomes()[name], batch["error"][0]


def test_layered_photoshop_file_gives_its_flattened_image():
    path = os.path.join(CORPUS, "images", "hopper.psd")
    with open(path, "rb") as f:
        batch = decode_whole(f.read())
    assert batch["error"][0] is None
    assert np.array_equal(batch["pixels"][0], np.asarray(Image.open(path).convert("RGB")))


def test_planar_16bit_tiff_equals_its_interleaved_twin():
    def pixels(name):
        with open(os.path.join(CORPUS, "images", name), "rb") as f:
            return decode_whole(f.read())["pixels"][0]

    interleaved = pixels("tiff_16bit_RGB.tiff")
    assert interleaved.dtype == np.uint16 and interleaved.shape == (40, 100, 3)
    assert np.array_equal(pixels("tiff_strip_planar_16bit_RGB.tiff"), interleaved)


@pytest.mark.parametrize("name", ["made/deep_rotated.png", "made/deep_rotated_lzw.tif"])
def test_16bit_colour_images_are_turned_upright(name):
    batch = decode_whole(made_files()[name][0])
    assert batch["error"][0] is None
    assert batch["pixels"][0].dtype == np.uint16 and np.array_equal(batch["pixels"][0], UPRIGHT)


def test_a_bomb_inside_a_container_is_refused_before_it_is_decoded():
    started = time.perf_counter()
    batch = decode_whole(made_files()["made/ico_png_bomb.ico"][0])
    assert batch["error_type"][0] == "decode.too_many_pixels"
    assert "claims 260,100,000,000 pixels" in batch["error"][0] and "decode.max_image_pixels" in batch["error"][0]
    assert time.perf_counter() - started < 5  # refused at the header, not after allocating 1 TB


@pytest.mark.usefixtures("ray_session")
def test_a_job_over_the_whole_corpus_gives_each_file_one_row(tmp_path, classifier_files):
    folder = tmp_path / "in"
    shutil.copytree(os.path.join(CORPUS, "images"), folder)
    expected = {str(folder / name): outcome for name, outcome in expected_outcomes().items()}
    for name, (data, outcome) in made_files().items():
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        expected[str(path)] = outcome
    cfg = job(classifier_files, str(folder), str(tmp_path / "out"), input={"extensions": None},
              errors={"max_error_rate": 1.0})
    summary = run_on_ray(cfg, out=io.StringIO())

    rows = duckdb.sql(f"SELECT uri, error_type, label FROM read_parquet('{tmp_path}/out/**/*.parquet')").fetchall()
    assert len(rows) == len(expected) == summary.inputs  # every file once
    assert {uri: error_type for uri, error_type, _ in rows} == expected
    assert all((label is None) == (error_type is not None) for _, error_type, label in rows)
