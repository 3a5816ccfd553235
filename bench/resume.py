"""What crash safety costs and saves: a job of N photo-like JPEGs on the local S3 server, run three ways.

    .venv/bin/python bench/resume.py --images 2000 --repeat 3 [--baseline-commit 135d6f4]

1. baseline: the pipeline as it was before commit/resume existed (a git worktree of --baseline-commit),
   S3 -> S3, uninterrupted;
2. this pipeline, uninterrupted (staged chunks, compaction, commit record, lease);
(1) and (2) alternate --repeat times, to a fresh output each time; the table reports each one's median.
3. this pipeline, its driver SIGKILLed once the model has seen half the inputs, then rerun to completion.
The model (bench/counting_mobilenet.py) logs every image it sees, so (3) reports the fraction of work redone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from images import photo_jpeg  # noqa: E402
from pipeline.dev.local_s3 import local_bucket  # noqa: E402
from pipeline.io.storage import Storage  # noqa: E402


def command(python_path: str, output: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "--input", "s3://bench/images/", "--output", output,
            "--model", "counting_mobilenet:build", "--batch-size", "32"]


def env(python_path: str, calls: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([python_path, os.path.join(ROOT, "bench")]),
            "PIPELINE_BENCH_CALLS": calls, "RAY_AUTH_MODE": "disabled"}


def images_seen(calls: str) -> int:
    if not os.path.exists(calls):
        return 0
    with open(calls) as f:
        return sum(int(line) for line in f if line.strip())


def timed_run(python_path: str, output: str, calls: str) -> float:
    started = time.monotonic()
    subprocess.run(command(python_path, output), env=env(python_path, calls), check=True, cwd=python_path,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def staged_rows(storage: Storage, prefix: str) -> int:
    import pyarrow.parquet as pq

    total = 0
    for page in storage.list_pages(f"s3://bench/{prefix}/_staging/"):
        for obj in page:
            if obj.uri.endswith(".parquet.staged"):
                total += pq.ParquetFile(io.BytesIO(storage.read_bytes(obj.uri))).metadata.num_rows
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--baseline-commit", default="135d6f4")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-resume-")
    baseline = os.path.join(work, "baseline")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", baseline, args.baseline_commit],
                   check=True, capture_output=True)
    try:
        with local_bucket("bench") as (server, storage):
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: storage.s3_client.put_object(
                    Bucket="bench", Key=f"images/{i:06d}.jpg", Body=photo_jpeg(i)), range(args.images)))
            times: dict[str, list[float]] = {"baseline (no commit protocol)": [], "this pipeline, uninterrupted": []}
            for i in range(args.repeat):
                for (name, seconds), code in zip(times.items(), (baseline, ROOT)):
                    calls = os.path.join(work, f"calls-{i}-{len(seconds)}-{code == ROOT}")
                    seconds.append(timed_run(code, f"s3://bench/out-{i}-{code == ROOT}", calls))
                    assert images_seen(calls) == args.images
            results = {name: (statistics.median(seconds), args.images) for name, seconds in times.items()}

            calls = os.path.join(work, "calls-killed")
            started = time.monotonic()
            proc = subprocess.Popen(command(ROOT, "s3://bench/out-killed"), env=env(ROOT, calls), cwd=ROOT,
                                    stdout=subprocess.DEVNULL)
            while images_seen(calls) < args.images // 2 and proc.poll() is None:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            first_attempt = time.monotonic() - started
            seen_before_kill = images_seen(calls)
            durable = staged_rows(storage, "out-killed")
            rerun = timed_run(ROOT, "s3://bench/out-killed", calls)
            summary = json.loads(storage.read_bytes("s3://bench/out-killed/_summary.json"))
            total_seen = images_seen(calls)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", baseline], capture_output=True)

    base_time = results["baseline (no commit protocol)"][0]
    print(f"\n{args.images:,} JPEGs 500x375, mobilenet_v3_small (CPU), S3 (moto on 127.0.0.1) -> S3\n")
    print(f"| run | wall s | images through the model | vs baseline |\n|---|---:|---:|---:|")
    for name, (seconds, seen) in results.items():
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"| {name} | {seconds:.1f} (runs: {runs}) | {seen:,} | {seconds / base_time:.2f}x |")
    print(f"| killed when the model had seen {seen_before_kill:,} ({durable:,} durable) at {first_attempt:.1f} s, "
          f"then rerun | {first_attempt:.1f} + "
          f"{rerun:.1f} | {total_seen:,} | {(first_attempt + rerun) / base_time:.2f}x |")
    redone = total_seen - args.images
    print(f"\nkilled attempt: model saw {seen_before_kill:,}, {durable:,} rows were durable; rerun resumed "
          f"{summary['resumed']:,} and processed {summary['inputs']:,}; committed {summary['committed_rows']:,} rows")
    print(f"work redone on resume: {redone:,} images = {redone / args.images:.1%} of the job")


if __name__ == "__main__":
    main()
