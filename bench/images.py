"""Deterministic ImageNet-like JPEGs for the benchmarks: 500x375, photographic structure and grain, quality 90."""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image


def photo_jpeg(seed: int, width: int = 500, height: int = 375) -> bytes:
    """Smooth colour structure plus sensor-like grain: ~70 KB at quality 90, decoding like a real photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6.28, 3)
    base = np.stack([127 + 100 * np.sin(x / (40 + 20 * c) + y / 70 + phase[c]) for c in range(3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write(args: tuple[str, int]) -> None:
    folder, seed = args
    path = os.path.join(folder, f"{seed // 1000:04d}", f"{seed:07d}.jpg")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(photo_jpeg(seed))
    os.replace(tmp, path)


def ensure_images(folder: str, count: int) -> list[str]:
    """`count` JPEGs under `folder` (made once, reused by later runs); their paths in a stable order."""
    done = os.path.join(folder, f".complete-{count}")
    if not os.path.exists(done):
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_write, [(folder, seed) for seed in range(count)], chunksize=64))
        open(done, "w").close()
    return [os.path.join(folder, f"{seed // 1000:04d}", f"{seed:07d}.jpg") for seed in range(count)]
