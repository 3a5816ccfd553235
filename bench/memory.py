"""Memory stays flat as the input grows: this pipeline on N and on 10N images, peak memory of each process.

    .venv/bin/python bench/memory.py                       # 1,000 and 10,000 JPEGs, mobilenet_v3_small, CPU

Runs `run_job` (local JPEGs -> Parquet, default settings) in a fresh process per size, with the memory
watcher of bench/throughput.py over its whole process tree, and reads the raylet's log for object-store
spilling. The target: driver and per-worker peaks within 1.2x between N and 10N, and nothing spilled.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from images import ensure_images  # noqa: E402
from throughput import make_model, run_contender, versions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="N; the second run has 10N")
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "pipeline-bench"))
    args = parser.parse_args()

    checkpoint, labels = make_model(args.model, args.data)
    work = tempfile.mkdtemp(prefix="bench-memory-")
    rows = []
    try:
        for n in (args.images, 10 * args.images):
            folder = os.path.join(args.data, f"images-{n}")
            paths = ensure_images(folder, n)
            spec = {"model": args.model, "checkpoint": checkpoint, "labels": labels, "batch_size": 32,
                    "device": "cpu", "precision": "fp32", "cores": os.cpu_count(), "channels_last": True,
                    "images": paths, "images_count": n, "input": folder, "output": os.path.join(work, f"out-{n}")}
            result = run_contender("pipeline", spec, work)
            rows.append((n, result))
            print(f"{n:,} images: {result['seconds']:.1f}s, driver {result['driver_mib']:.0f} MiB, "
                  f"worker max {result['worker_mib']:.0f} MiB, spilled {result['spilled_mib']:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (n1, small), (n2, large) = rows
    print(f"\n{versions()}\n")
    print("| images | wall s | driver peak MiB | worker peak MiB (max) | spilled MiB |\n|---:|---:|---:|---:|---:|")
    for n, r in rows:
        print(f"| {n:,} | {r['seconds']:.1f} | {r['driver_mib']:.0f} | {r['worker_mib']:.0f} | {r['spilled_mib']:.0f} |")
    print(f"| ratio {n2 // n1}x input | | {large['driver_mib'] / small['driver_mib']:.2f}x | "
          f"{large['worker_mib'] / small['worker_mib']:.2f}x | |")


if __name__ == "__main__":
    main()
