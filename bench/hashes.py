"""What the two content hashes cost the decode stage: images/s on one core with and without `content_hash` and
`phash`, for ImageNet-like JPEGs (500x375) and 12-megapixel photos (4000x3000), classification (decoded in draft
for a 256-pixel resize) and detection (decoded whole).

    python bench/hashes.py [--images N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from images import photo_jpeg  # noqa: E402

import pipeline.decode.image as image_module  # noqa: E402
from pipeline.decode.image import Decoder, Preprocess  # noqa: E402

CLASSIFY = Preprocess(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def batch_of(payloads: list[bytes]) -> dict:
    data = np.empty(len(payloads), dtype=object)
    data[:] = payloads
    n = len(payloads)
    return {"uri": np.array([f"img{i}" for i in range(n)], dtype=object), "bytes": data,
            "error": np.full(n, None, dtype=object), "error_type": np.full(n, None, dtype=object)}


def one_pass(decoder: Decoder, payloads: list[bytes]) -> float:
    """images per CPU second of one pass over `payloads`, a batch of 16 at a time (CPU time: the figure holds on a
    machine busy with other work, where wall time would not)."""
    start = time.process_time()
    for i in range(0, len(payloads), 16):
        decoder(batch_of(payloads[i:i + 16]))
    return len(payloads) / (time.process_time() - start)


def without_hashes(decoder: Decoder, payloads: list[bytes]) -> float:
    content, perceptual = image_module.content_hash, image_module.perceptual_hash
    image_module.content_hash = image_module.perceptual_hash = lambda _: None
    try:
        return one_pass(decoder, payloads)
    finally:
        image_module.content_hash, image_module.perceptual_hash = content, perceptual


def rates(decoder: Decoder, payloads: list[bytes], repeats: int) -> tuple[float, float]:
    """Best images/s without and with the hashes, the passes interleaved so that load on the machine hits both."""
    before, after = 0.0, 0.0
    for _ in range(repeats):
        before = max(before, without_hashes(decoder, payloads))
        after = max(after, one_pass(decoder, payloads))
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    small = [photo_jpeg(seed) for seed in range(args.images)]
    large = [photo_jpeg(seed, 4000, 3000) for seed in range(max(args.images // 8, 4))]
    cases = [("500x375, classify", small, CLASSIFY), ("4000x3000, classify", large, CLASSIFY),
             ("500x375, detect", small, None), ("4000x3000, detect", large, None)]
    print("| images, job | without hashes (images per CPU second) | with content_hash + phash | cost |")
    print("|---|---|---|---|")
    for name, payloads, preprocess in cases:
        decoder = Decoder(preprocess, 10**9)
        before, after = rates(decoder, payloads, args.repeats)
        print(f"| {name} | {before:,.0f} | {after:,.0f} | {100 * (before / after - 1):+.1f} % time |")


if __name__ == "__main__":
    main()
