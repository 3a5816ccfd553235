"""What identifies an input's content: `content_hash` (BLAKE2b-128 of its bytes, exact duplicates) and `phash`
(imagehash's 64-bit perceptual hash of the upright image, near duplicates), as the output's columns hold them.

A phash is imagehash's 8x8 DCT hash, its 64 bits read row by row, most significant first (the number its hex
string spells), stored as a signed int64 (two's complement). A large image is box-reduced first: imagehash
shrinks it to 32 x 32 anyway, and a 12-megapixel photo would cost more to hash than to decode in draft.
"""

from __future__ import annotations

import hashlib

import imagehash
import numpy as np
from PIL import Image

DIGEST_BYTES = 16
_HASH_SIDE = 8  # imagehash.phash's hash_size: 64 bits
# Box-reduce while the shorter side stays at least this, twice imagehash's own 32 x 32: its Lanczos resize from a
# 500 x 375 photo costs 1.7 ms, from the reduced one 0.25 (docs/performance.md, "Content hashes").
_REDUCED_SIDE = 64


def content_hash(data: bytes | memoryview) -> str:
    """Lowercase hex of the 16-byte BLAKE2b digest of `data`."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


def perceptual_hash(image: "Image.Image | np.ndarray") -> int:
    """imagehash.phash of a Pillow image or an (H, W[, C]) uint8/uint16 array, as a signed 64-bit int."""
    if isinstance(image, np.ndarray):
        image = _to_pillow(image)
    factor = min(image.size) // _REDUCED_SIDE
    if factor >= 2:
        image = image.reduce(factor)
    bits = imagehash.phash(image, hash_size=_HASH_SIDE).hash
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big", signed=True)


def hash_columns(hashes: list[tuple[str | None, int | None]]) -> dict[str, np.ndarray]:
    """A batch's `content_hash` and `phash` columns from (content_hash, phash) per row.

    The phash crosses stages as decimal text, which the sink casts to int64 (output/sink.to_output_table): an
    int64 column with nulls comes back from Arrow to numpy as float64, which cannot hold 64 bits.
    """
    phashes = np.array([None if p is None else str(p) for _, p in hashes], dtype=object)
    return {"content_hash": np.array([h for h, _ in hashes], dtype=object), "phash": phashes}


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between int64 phashes (broadcasting), as uint8 counts."""
    differ = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    return np.bitwise_count(differ.view(np.uint64))


def _to_pillow(array: np.ndarray) -> Image.Image:
    """uint16 kept to its top 8 bits; one channel as grey, three or more as RGB (alpha dropped)."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"perceptual_hash takes uint8 or uint16 pixels, not {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    elif array.ndim == 3:
        array = array[..., :3]
    return Image.fromarray(np.ascontiguousarray(array))
