"""Images/s of a detection job and of an embedding job, beside a classification job of the same backbone size.

    .venv/bin/python bench/tasks.py                 # this machine's CPU: the defaults below
    .venv/bin/python bench/tasks.py --detectors fasterrcnn_resnet50_fpn_v2 --detector-images 40

Each job is `run_job` from local JPEGs (bench/images.py: 500x375, ~70 KB) to Parquet in a fresh process,
on N and on 2N images; steady images/s = N / (t(2N) - t(N)) cancels Ray's start and model loading, as in
bench/throughput.py. Detectors get a seeded random 91-class checkpoint (COCO's size; no downloads) and a
score threshold of 0 with at most 100 detections, so the postprocessing does its full work. The detector's
own bound is one thread decoding (full size) plus its forward pass per image, times the machine's cores.
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


def make_detector(model: str, folder: str) -> tuple[str, str]:
    import torch
    import torchvision

    os.makedirs(folder, exist_ok=True)
    checkpoint, labels = os.path.join(folder, f"{model}.pt"), os.path.join(folder, "coco-sized-labels.txt")
    if not os.path.exists(checkpoint):
        torch.manual_seed(0)
        built = torchvision.models.get_model(model, weights=None, weights_backbone=None, num_classes=91)
        torch.save(built.state_dict(), checkpoint)
    with open(labels, "w") as f:
        f.write("__background__\n" + "\n".join(f"class_{i:02d}" for i in range(1, 91)) + "\n")
    return checkpoint, labels


def steady(name: str, base: dict, sizes: tuple[int, int], data: str, work: str) -> dict:
    runs = {}
    for n in sizes:
        folder = os.path.join(data, f"images-{n}")
        spec = {**base, "images": ensure_images(folder, n), "images_count": n, "input": folder,
                "output": os.path.join(work, f"out-{name}-{n}")}
        runs[n] = run_contender("pipeline", spec, work)
        if runs[n]["images"] != n:
            raise SystemExit(f"{name} wrote {runs[n]['images']} rows for {n} images")
        print(f"{name}: {n} images in {runs[n]['seconds']:.1f}s", flush=True)
    small, large = sizes
    return {"end_to_end": small / runs[small]["seconds"],
            "steady": (large - small) / max(1e-9, runs[large]["seconds"] - runs[small]["seconds"]),
            "worker_mib": runs[large]["worker_mib"], "driver_mib": runs[large]["driver_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=["fasterrcnn_mobilenet_v3_large_320_fpn",
                                                           "ssdlite320_mobilenet_v3_large"])
    parser.add_argument("--detector-images", type=int, default=200, help="N for the detection jobs")
    parser.add_argument("--embedder", default="resnet18")
    parser.add_argument("--embedding-images", type=int, default=1000, help="N for the embedding jobs (0: none)")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "pipeline-bench"))
    args = parser.parse_args()

    common = {"batch_size": 8, "device": "cpu", "precision": "fp32", "cores": os.cpu_count(), "channels_last": True}
    work = tempfile.mkdtemp(prefix="bench-tasks-")
    rows = []
    try:
        sizes = (args.detector_images, 2 * args.detector_images)
        for model in args.detectors:
            checkpoint, labels = make_detector(model, args.data)
            base = {**common, "model": model, "checkpoint": checkpoint, "labels": labels,
                    "model_settings": {"task": "detection", "outputs": ["predictions", "embedding"],
                                       "detection": {"score_threshold": 0.0, "max_detections": 100}}}
            folder = os.path.join(args.data, f"images-{sizes[0]}")
            bound = run_contender("detector_bound", {**base, "images": ensure_images(folder, sizes[0])}, work)
            result = steady(f"{model} detections+embedding", base, sizes, args.data, work)
            rows.append((f"{model}: detections + embedding", result, bound))

        sizes = (args.embedding_images, 2 * args.embedding_images)
        checkpoint, labels = make_model(args.embedder, args.data)
        for outputs in (["predictions"], ["embedding"], ["predictions", "embedding"]) if args.embedding_images else ():
            base = {**common, "batch_size": 32, "model": args.embedder, "checkpoint": checkpoint, "labels": labels,
                    "model_settings": {"outputs": outputs}}
            rows.append((f"{args.embedder}: {' + '.join(outputs)}",
                         steady(f"{args.embedder} {'+'.join(outputs)}", base, sizes, args.data, work), None))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{os.cpu_count()} cores; {versions()}\n")
    print("| job | steady images/s | end to end images/s | CPU bound images/s (decode + forward CPU-ms) "
          "| worker peak MiB |\n|---|---:|---:|---:|---:|")
    for name, r, bound in rows:
        bound_text = (f"{bound['cpu_bound_images_s']:.1f} ({bound['decode_cpu_s'] * 1e3:.0f} + "
                      f"{bound['forward_cpu_s'] * 1e3:.0f}); {r['steady'] / bound['cpu_bound_images_s']:.2f} of it"
                      if bound else "")
        print(f"| {name} | {r['steady']:.1f} | {r['end_to_end']:.1f} | {bound_text} | {r['worker_mib']:.0f} |")


if __name__ == "__main__":
    main()
