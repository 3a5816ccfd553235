"""Time to the first prediction versus time to list the whole prefix, on a local S3-compatible server.

    .venv/bin/python bench/first_prediction.py --objects 20000

Uploads N small PNGs to moto's S3 on 127.0.0.1, times a full listing with boto3 alone, then runs the pipeline's
dataset (LeNet, CPU) and times the first prediction batch at the driver, noting whether the listing was still
running at that moment. Prints one table.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dev.local_s3 import local_bucket  # noqa: E402
from pipeline.io.storage import Storage  # noqa: E402
from pipeline.models.resolve import resolve_model  # noqa: E402
from pipeline.job.config import load_job  # noqa: E402


def upload(storage: Storage, bucket: str, count: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()
    client = storage.s3_client
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"images/{i:08d}.png", Body=png), range(count)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=20000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from pipeline.ray.adapter import dataset_for
    from pipeline.ray.datasource import ListingTally
    from pipeline.ray.executor import RayExecutor
    from pipeline.run.plan import plan_stages

    with local_bucket("bench") as (server, storage):
        started = time.monotonic()
        upload(storage, "bench", args.objects)
        print(f"uploaded {args.objects:,} objects in {time.monotonic() - started:.1f}s", flush=True)

        started = time.monotonic()
        listed = sum(len(page) for page in storage.list_pages("s3://bench/images/"))
        full_listing = time.monotonic() - started

        cfg = load_job(None, {"input": "s3://bench/images/", "output": "/tmp/unused",
                              "model": "pipeline.dev.demo:build_lenet", "batch_size": 64})
        cfg.model.preprocess.resize_size = cfg.model.preprocess.crop_size = 32
        spec = resolve_model(cfg.model, storage)
        executor = RayExecutor()
        executor.start()
        tally = ListingTally.remote()
        dataset = dataset_for(plan_stages(cfg, spec, storage, executor.pool(cfg.compute)), tally)
        started = time.monotonic()
        first = None
        rows = 0
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            if first is None:
                first = time.monotonic() - started
                at_first = ray.get(tally.listing_get.remote())
            rows += batch.num_rows
        total = time.monotonic() - started
        if os.environ.get("BENCH_STATS"):
            print(dataset.stats())

    print(f"| objects | full listing alone (boto3) | first prediction at driver | listed by then | "
          f"listing finished by then | all {rows:,} predicted |")
    print("|---|---|---|---|---|---|")
    print(f"| {listed:,} | {full_listing:.1f} s | {first:.1f} s | {at_first['listed']:,} | {at_first['done']} | "
          f"{total:.1f} s |")


def exit_quickly(code: int) -> None:
    """As the `pipeline` command exits: Ray stopped, then os._exit. A normal exit would let the session's reaper
    (pipeline/ray/reaper.py) see its pipe close while this process still holds Ray's log files, and SIGTERM it."""
    from pipeline.ray import stop_ray

    stop_ray()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
    exit_quickly(0)
