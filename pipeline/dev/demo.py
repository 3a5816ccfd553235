"""`pipeline demo`: the whole product on one machine, offline, in about a minute. Starts an S3-compatible server on
127.0.0.1 and a local Ray; trains a LeNet-style CNN on scikit-learn's handwritten digits (train split) and uploads
its checkpoint and labels; uploads the held-out digits as PNG files (some with spaces and unicode in their keys),
plus a few broken files, which must come out as error rows; runs a real job from s3:// to Parquet on s3://, reads
the Parquet back, scores it against the digit each file's key names, and writes the run's HTML report
(`pipeline report`) to demo-report.html here. Everything else is torn down at the end."""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, redirect_stdout

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from pipeline.decode.image import Decoder, Preprocess
from pipeline.dev.local_s3 import local_bucket
from pipeline.io.storage import Storage
from pipeline.job.config import JobConfig
from pipeline.run.executor import choose_executor

BUCKET = "demo"
REPORT_FILE = "demo-report.html"
IMAGE_SIZE = 32
PREPROCESS = Preprocess(resize_size=IMAGE_SIZE, crop_size=IMAGE_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
BROKEN_FILES = {
    "digits/broken/truncated.png": lambda png: png[: len(png) // 2],
    "digits/broken/empty.png": lambda png: b"",
    "digits/broken/not-really-a.png": lambda png: b"this is a text file with an image extension\n",
}


def build_lenet(num_classes: int = 10) -> nn.Module:
    """LeNet-5 for 3x32x32 inputs; the demo's custom model (`pipeline.dev.demo:build_lenet`)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def run_demo(keep: str | None = None, own_streams: bool = False) -> int:
    """`own_streams`: this process is the `pipeline` command, whose console stays free of Ray's output."""
    from pipeline.ray import stop_ray

    console = None
    if own_streams and choose_executor(demo_job().compute) == "ray":
        from pipeline.ray.console import Console

        console = Console.of_this_process()

    with local_bucket(BUCKET) as (server, storage):
        print(f"S3-compatible server (moto) on {server.endpoint_url}, bucket s3://{BUCKET}")

        train, test = digit_pngs()
        started = time.monotonic()
        model, direct_accuracy = train_lenet(train, test)
        print(f"Trained LeNet on {len(train):,} digits in {time.monotonic() - started:.1f}s; "
              f"held-out accuracy called directly: {direct_accuracy:.1%}")
        upload_model(storage, model)
        uploaded = upload_images(storage, test)
        print(f"Uploaded {uploaded:,} PNGs ({len(BROKEN_FILES)} deliberately broken) to s3://{BUCKET}/digits/")

        summary = run_demo_job(console)
        with redirect_stdout(console.out) if console is not None else nullcontext():  # Ray's went to its logs
            table = read_predictions(storage, summary.files)
            report_accuracy(table)
            write_report(storage, summary.run_id, REPORT_FILE)
            if keep:
                copy_output(table, keep)
    stop_ray()
    return 0


def run_demo_job(console):
    """On the executor `compute.executor: auto` picks (this machine, unless RAY_ADDRESS names a cluster)."""
    if console is None and choose_executor(demo_job().compute) == "local":
        from pipeline.local.executor import run_locally

        return run_locally(demo_job(), progress_interval=1.0)
    from pipeline.ray.executor import run_on_ray

    with console.ray_failures() if console is not None else nullcontext():
        return run_on_ray(demo_job(), out=console.out if console is not None else None, progress_interval=1.0,
                          console=console)


def write_report(storage: Storage, run_id: str, path: str) -> None:
    """The run's page, as `pipeline report` makes it (its thumbnails come from this demo's S3, which goes away)."""
    from pipeline.report import build_report
    from pipeline.report.outputs import open_output_for_reading

    _, html = build_report(open_output_for_reading(storage, demo_job().output.uri), run_id)
    with open(path, "w", encoding="utf-8") as f:
        f.write(html)
    print(f"The run's report: {os.path.abspath(path)} (open it in a browser; `pipeline report OUTPUT` makes one "
          "for any run)")


def demo_job() -> JobConfig:
    return JobConfig.model_validate({
        "input": {"uri": f"s3://{BUCKET}/digits/"},
        "output": {"uri": f"s3://{BUCKET}/predictions/"},
        "model": {
            "name": "pipeline.dev.demo:build_lenet",
            "weights": f"s3://{BUCKET}/models/lenet.pt",
            "labels": f"s3://{BUCKET}/models/labels.txt",
            "top_k": 3,
            "preprocess": {"resize_size": IMAGE_SIZE, "crop_size": IMAGE_SIZE, "mean": PREPROCESS.mean,
                           "std": PREPROCESS.std},
        },
        "compute": {"batch_size": 64},
    })


def digit_pngs() -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """(digit, PNG bytes) pairs: dark ink on white, upscaled from 8x8; a fixed 70/30 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    pairs = []
    for i in order:
        ink = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(255 - ink, "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pairs.append((int(digits.target[i]), buffer.getvalue()))
    cut = int(len(pairs) * 0.7)
    return pairs[:cut], pairs[cut:]


def train_lenet(train, test, epochs: int = 30) -> tuple[nn.Module, float]:
    """Train on images decoded exactly as the pipeline decodes them, so what it learns transfers."""
    torch.manual_seed(0)
    # A model this small gains nothing from a second thread, and OpenMP threads that wait on a busy core spin:
    # one epoch took 2.8 s with 2 threads beside other work on 2 cores, 0.15 s with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(train, test, epochs)
    finally:
        torch.set_num_threads(threads)


def _train(train, test, epochs: int) -> tuple[nn.Module, float]:
    x_train, y_train = _tensors(train)
    x_test, y_test = _tensors(test)
    model = build_lenet(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x_train)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def _tensors(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    decoded = Decoder(PREPROCESS, max_image_pixels=10**6)({
        "uri": np.array([str(i) for i in range(len(pairs))], dtype=object),
        "bytes": np.array([png for _, png in pairs], dtype=object),
        "error": np.full(len(pairs), None, dtype=object),
        "error_type": np.full(len(pairs), None, dtype=object),
    })
    x = torch.from_numpy(decoded["pixels"]).permute(0, 3, 1, 2).float()
    x = (x / 255.0 - 0.5) / 0.5
    return x, torch.tensor([label for label, _ in pairs])


def upload_model(storage: Storage, model: nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    storage.write_bytes(f"s3://{BUCKET}/models/lenet.pt", buffer.getvalue())
    storage.write_bytes(f"s3://{BUCKET}/models/labels.txt", "\n".join(str(d) for d in range(10)).encode())


def upload_images(storage: Storage, test) -> int:
    objects = {}
    for i, (digit, png) in enumerate(test):
        name = f"digit {i:04d} ünïcødé.png" if i % 50 == 0 else f"{i:04d}.png"
        objects[f"digits/{digit}/{name}"] = png
    for key, corrupt in BROKEN_FILES.items():
        objects[key] = corrupt(test[0][1])
    objects["digits/README.txt"] = b"not an image: skipped by the extension filter\n"
    client = storage.s3_client
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), objects.items()))
    return len(objects) - 1


def read_predictions(storage: Storage, files: list[dict]):
    import pyarrow as pa

    tables = []
    for f in files:
        with storage.s3fs.open(f["uri"].removeprefix("s3://"), "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables)


def report_accuracy(table) -> None:
    rows = table.to_pylist()
    scored = [r for r in rows if r["error"] is None and _true_digit(r["uri"]) is not None]
    correct = sum(r["label"] == _true_digit(r["uri"]) for r in scored)
    failed = [r for r in rows if r["error"] is not None]
    print(f"\nRead back {len(rows):,} rows from Parquet: {len(scored):,} predicted, {len(failed):,} errors")
    for r in failed:
        print(f"  error row: {r['uri'].split('/', 3)[-1]:<32} {r['error']}")
    print("  sample predictions:")
    for r in scored[:: max(1, len(scored) // 5)][:5]:
        print(f"    {r['uri'].split('/', 3)[-1]:<28} label={r['label']} score={r['score']:.3f} "
              f"top3={r['topk_labels']}")
    if scored:
        print(f"\nAccuracy from the Parquet output: {correct / len(scored):.1%} ({correct:,}/{len(scored):,} "
              "held-out digits)")


def _true_digit(uri: str) -> str | None:
    folder = uri.split("/")[-2]
    return folder if folder.isdigit() else None


def copy_output(table, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, os.path.join(folder, "predictions.parquet"), compression="zstd")
    print(f"Copied the predictions to {folder}/predictions.parquet")



