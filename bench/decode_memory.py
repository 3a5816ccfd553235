"""Peak memory of decoding each file of a folder, one file per fresh process (so each peak is its own).

    .venv/bin/python bench/decode_memory.py tests/odd_files/images [--top 10]

Prints, per file, the outcome (decoded, or the row's error type), the decode time and the process's peak
resident memory above a baseline process that imported the same modules and decoded nothing. The files that
matter are the bombs: a few hundred kilobytes whose headers claim billions of pixels.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import numpy as np

from pipeline.decode.image import Decoder, Preprocess

PREPROCESS = Preprocess(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_one(path: str | None, results) -> None:
    decoder = Decoder(PREPROCESS, max_image_pixels=89_478_485)
    started = time.perf_counter()
    outcome = "baseline"
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
        batch = decoder({"uri": np.array([path], dtype=object), "bytes": np.array([data], dtype=object),
                         "error": np.array([None], dtype=object), "error_type": np.array([None], dtype=object)})
        outcome = batch["error_type"][0] or "decoded"
    results.put((outcome, time.perf_counter() - started, peak_mib()))


def measure(path: str | None) -> tuple[str, float, float]:
    results = mp.Queue()
    process = mp.Process(target=decode_one, args=(path, results))
    process.start()
    process.join(120)
    if process.is_alive():
        process.kill()
        return "timeout", 120.0, float("nan")
    if process.exitcode != 0:
        return f"died ({process.exitcode})", float("nan"), float("nan")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--top", type=int, default=10, help="show the files with the highest peaks")
    args = parser.parse_args()
    mp.set_start_method("fork")
    _, _, baseline = measure(None)
    rows = []
    for name in sorted(os.listdir(args.folder)):
        path = os.path.join(args.folder, name)
        if os.path.isfile(path):
            outcome, seconds, peak = measure(path)
            rows.append((peak - baseline, name, os.path.getsize(path), outcome, seconds))
    print(f"baseline process: {baseline:.0f} MiB; {len(rows)} files; highest peaks above it:")
    print(f"{'MiB':>8} {'file KiB':>9}  {'seconds':>7}  outcome  file")
    for extra, name, size, outcome, seconds in sorted(rows, reverse=True)[:args.top]:
        print(f"{extra:8.1f} {size / 1024:9.1f}  {seconds:7.2f}  {outcome}  {name}")


if __name__ == "__main__":
    main()
