"""What each output format costs against the plain Parquet folder, through the same front door the job uses
(pipeline/output): staging rows, the commit, the skip set an incremental run reads, and how the table's
metadata grows over many runs.

    .venv/bin/python bench/formats.py --rows 100000 --runs 100 --rows-per-run 1000 [--output DIR]

For each format, on local disk: one run that commits `--rows` rows (staged 2,000 at a time, like 8 batches of
250), then `--runs` incremental runs of `--rows-per-run` new inputs each. Reports seconds for the big commit,
the commit time of the first and the last small run, the time to build the last run's skip set, files and
bytes of data and of metadata at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.io.storage import ObjectInfo, Storage  # noqa: E402
from pipeline.output import RunIdentity, RunPolicy, make_format, open_output  # noqa: E402
from pipeline.job.config import load_job  # noqa: E402
from pipeline.job.rows import OUTPUT_SCHEMA  # noqa: E402

IDENTITY = RunIdentity(job_key="bench", model_key="bench-model", model="resnet18", weights="IMAGENET1K_V1")
MODIFIED = datetime(2026, 11, 1, tzinfo=timezone.utc)
STAGE_ROWS = 2_000
METADATA = ("_commits", "_delta_log", "metadata", "_catalog", "_pipeline")


def listed(start: int, n: int) -> list[ObjectInfo]:
    return [ObjectInfo(f"s3://archive/2026/{i:09d}.jpg", 100_000 + i % 997, f"{i:032x}", MODIFIED)
            for i in range(start, start + n)]


def rows_for(objects: list[ObjectInfo]) -> pa.Table:
    n = len(objects)
    return pa.table({"uri": [o.uri for o in objects], "etag": [o.etag for o in objects],
                     "last_modified": [o.last_modified for o in objects], "size": [o.size for o in objects],
                     "label": [("cat", "dog", "bird")[i % 3] for i in range(n)], "score": [0.9] * n,
                     "topk_labels": [["cat", "dog"]] * n, "topk_scores": [[0.9, 0.05]] * n,
                     "image_width": [640] * n, "image_height": [480] * n, "error": pa.nulls(n, pa.string())})


def one_run(output: str, fmt: str, start: int, n: int, storage: Storage) -> dict[str, float]:
    cfg = load_job(None, {"input": "s3://archive/2026/", "output": output, "format": fmt, "model": "resnet18"})
    times = {}
    with open_output(cfg.output, RunPolicy.of(cfg), storage, IDENTITY, OUTPUT_SCHEMA, io.StringIO()) as side:
        began = time.perf_counter()
        done = side.history().load(storage)
        todo = done.todo(listed(0, start + n))
        times["skip_set_s"] = time.perf_counter() - began
        assert len(todo) == n, (len(todo), n)
        sink = side.sink({"model": "resnet18", "weights": "IMAGENET1K_V1", "run_id": side.run_id},
                         checkpoint_rows=STAGE_ROWS)
        began = time.perf_counter()
        for at in range(0, n, 250):
            sink.add(rows_for(todo[at:at + 250]))
        sink.flush()
        times["stage_s"] = time.perf_counter() - began
        began = time.perf_counter()
        side.on_write_complete(sink)
        times["commit_s"] = time.perf_counter() - began
    return times


def footprint(output: str) -> dict[str, int]:
    sizes = {"data_files": 0, "data_bytes": 0, "metadata_files": 0, "metadata_bytes": 0}
    for path in Path(output).rglob("*"):
        if not path.is_file() or path.name.startswith("_lock") or path.name == "_summary.json":
            continue
        kind = "metadata" if any(part in METADATA for part in path.relative_to(output).parts) else "data"
        sizes[f"{kind}_files"] += 1
        sizes[f"{kind}_bytes"] += path.stat().st_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rows-per-run", type=int, default=1_000)
    parser.add_argument("--formats", nargs="+", default=["parquet", "delta", "iceberg"])
    parser.add_argument("--output", help="parent folder for the outputs (default: a temporary one)")
    args = parser.parse_args()
    storage = Storage()
    parent = Path(args.output or tempfile.mkdtemp(prefix="bench-formats-"))
    print("| format | commit 100k rows (s) | stage 100k (s) | run 1 commit (s) | run N commit (s) | "
          "run N skip set (s) | data files / MiB | metadata files / KiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for fmt in args.formats:
        output = str(parent / fmt)
        shutil.rmtree(output, ignore_errors=True)
        big = one_run(output, fmt, 0, args.rows, storage)
        small = [one_run(output, fmt, args.rows + i * args.rows_per_run, args.rows_per_run, storage)
                 for i in range(args.runs)]
        size = footprint(output)
        cfg = load_job(None, {"input": "s3://archive/", "output": output, "format": fmt, "model": "resnet18"})
        table = make_format(cfg.output, storage, OUTPUT_SCHEMA)
        assert len(table.committed()) == args.runs + 1
        print(f"| {fmt} | {big['commit_s']:.2f} | {big['stage_s']:.2f} | {small[0]['commit_s']:.3f} | "
              f"{small[-1]['commit_s']:.3f} | {small[-1]['skip_set_s']:.2f} | {size['data_files']} / "
              f"{size['data_bytes'] / 2**20:.1f} | {size['metadata_files']} / {size['metadata_bytes'] / 1024:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
