"""What `pipeline report` costs on a large run: wall time and peak resident memory of the command, as a fresh
process, on an output of N rows built without Ray or a model.

    .venv/bin/python bench/report.py --rows 100000 [1000000 ...] [--format parquet|delta|iceberg] [--profile]

For each N: N inputs that are real JPEGs (200 distinct 640x480 photo-like files, each input its own path, a
hardlink to one of them; `--linked K` links only the first K and leaves the other URIs missing, which the
report shows as placeholders), written to a local output through the project's own output code
(pipeline.output.open_output, its sink and on_write_complete, as tests/output_driver.py drives it) in the classification
schema: labels from ImageNet's 1,000 classes with a Zipf-like spread, scores, top-5 lists, ~1% error rows of a
few kinds, size/etag/last_modified. Two runs: the first, then a "model upgrade" (another model_key, so every
input is processed again) whose label differs for ~10% of the inputs, mostly to one of the first run's top-5.

Then each of these runs as its own process under /usr/bin/time -v (the installed console script):
`pipeline report OUT -o FILE` (the latest run), `pipeline report OUT --against FIRST_RUN -o FILE`, and
`pipeline runs OUT --no-listing`. Reports wall seconds, CPU seconds, peak RSS and the page's size.
`--profile`: also cProfile build_report in this process (the --against case) and print the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from images import photo_jpeg  # noqa: E402
from pipeline.io.storage import Storage  # noqa: E402
from pipeline.output import RunIdentity, RunPolicy, open_output  # noqa: E402
from pipeline.job.config import load_job  # noqa: E402
from pipeline.job.rows import output_schema  # noqa: E402

PIPELINE = os.path.join(ROOT, ".venv", "bin", "pipeline")
DISTINCT_IMAGES = 200
STAGE_ROWS = 10_000  # rows per sink.add (a drained batch)
CHECKPOINT_ROWS = 50_000  # rows per staged chunk
CHANGED = 0.10  # share of inputs whose label the second run changes
ERRORS = [  # (error_type, message, weight): ~1% of the rows
    ("decode.truncated", "decode: image file is truncated (17 bytes not processed)", 5),
    ("decode.unidentified", "decode: cannot identify image file", 3),
    ("read.not_found", "read: object not found (NoSuchKey)", 1),
    ("decode.too_many_pixels", "decode: image claims 12000x12000 (144,000,000 pixels), over "
                               "decode.max_image_pixels", 1),
]
MODIFIED = datetime(2026, 11, 1, tzinfo=timezone.utc)
RUNS = [RunIdentity(job_key="bench-report", model_key="resnet18@v1", model="resnet18", weights="IMAGENET1K_V1"),
        RunIdentity(job_key="bench-report", model_key="resnet50@v2", model="resnet50", weights="IMAGENET1K_V2")]


def class_names() -> list[str]:
    try:
        from torchvision.models import ResNet50_Weights

        return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    except Exception:  # noqa: BLE001 - torchvision absent: names of the same shape
        return [f"class {i:03d}" for i in range(1000)]


def make_inputs(folder: Path, n: int, linked: int) -> list[str]:
    """`n` input paths; the first `linked` are hardlinks to DISTINCT_IMAGES photo-like 640x480 JPEGs."""
    source = folder / "distinct"
    source.mkdir(parents=True, exist_ok=True)
    originals = []
    for seed in range(DISTINCT_IMAGES):
        path = source / f"{seed:04d}.jpg"
        if not path.exists():
            path.write_bytes(photo_jpeg(seed, 640, 480))
        originals.append(str(path))
    uris = [str(folder / "in" / f"{i // 1000:05d}" / f"{i:09d}.jpg") for i in range(n)]
    for i, uri in enumerate(uris[:linked]):
        if i % 1000 == 0:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
        if not os.path.exists(uri):
            os.link(originals[i % DISTINCT_IMAGES], uri)
    return uris


def first_run_columns(n: int, names: list[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per input: top-5 class indexes (Zipf-like top-1), top-5 scores, the error kind (-1: none)."""
    weights = 1.0 / np.arange(1, len(names) + 1) ** 1.1
    top1 = rng.choice(len(names), size=n, p=weights / weights.sum())
    others = rng.integers(0, len(names), size=(n, 4))
    others = np.where(others == top1[:, None], (others + 1) % len(names), others)
    topk = np.concatenate([top1[:, None], others], axis=1)
    error_weights = np.array([w for *_, w in ERRORS], dtype=float)
    errors = np.where(rng.random(n) < 0.01, rng.choice(len(ERRORS), size=n, p=error_weights / error_weights.sum()),
                      -1)
    return {"topk": topk, "scores": _scores(rng, n), "errors": errors}


def second_run_columns(first: dict[str, np.ndarray], names: list[str], rng: np.random.Generator) -> dict:
    """The upgrade: ~10% of inputs get another top-1, four times in five one of the first run's top-5."""
    topk = first["topk"].copy()
    n = len(topk)
    changed = np.flatnonzero(rng.random(n) < CHANGED)
    from_old = rng.random(len(changed)) < 0.8
    position = rng.integers(1, 5, size=len(changed))
    new = np.where(from_old, topk[changed, position], rng.integers(0, len(names), size=len(changed)))
    new = np.where(new == topk[changed, 0], (new + 1) % len(names), new)
    topk[changed, position] = topk[changed, 0]
    topk[changed, 0] = new
    return {"topk": topk, "scores": _scores(rng, n), "errors": first["errors"]}


def _scores(rng: np.random.Generator, n: int) -> np.ndarray:
    top1 = rng.beta(5, 2, size=n)
    rest = rng.dirichlet(np.ones(5), size=n)[:, :4] * (1 - top1)[:, None]
    return np.concatenate([top1[:, None], -np.sort(-rest, axis=1)], axis=1).astype(np.float32)


def rows_for(uris: list[str], at: int, columns: dict, names: pa.Array, sizes: np.ndarray) -> pa.Table:
    stop = min(at + STAGE_ROWS, len(uris))
    n = stop - at
    topk, scores, errors = columns["topk"][at:stop], columns["scores"][at:stop], columns["errors"][at:stop]
    failed = errors >= 0
    kinds = pa.array([ERRORS[e][0] if e >= 0 else None for e in errors], pa.string())
    messages = pa.array([ERRORS[e][1] if e >= 0 else None for e in errors], pa.string())
    offsets = pa.array(np.arange(0, 5 * n + 1, 5, dtype=np.int32))
    mask = pa.array(failed)
    topk_labels = pa.ListArray.from_arrays(offsets, names.take(pa.array(topk.ravel())), mask=mask)
    topk_scores = pa.ListArray.from_arrays(offsets, pa.array(scores.ravel()), mask=mask)
    etags = [f"{i * 0x9E3779B97F4A7C15F39CC0605CEDC835 % 2**128:032x}" for i in range(at, stop)]  # md5-like
    return pa.table({
        "uri": uris[at:stop], "error": messages, "error_type": kinds,
        "label": pc.if_else(mask, pa.scalar(None, pa.string()), names.take(pa.array(topk[:, 0]))),
        "score": pa.array(scores[:, 0], mask=failed), "topk_labels": topk_labels, "topk_scores": topk_scores,
        "image_width": pa.array(np.full(n, 640, np.int32), mask=failed),
        "image_height": pa.array(np.full(n, 480, np.int32), mask=failed),
        "size": sizes[np.arange(at, stop) % len(sizes)], "etag": etags,
        "last_modified": [MODIFIED + timedelta(seconds=i) for i in range(at, stop)]})


def one_run(output: str, fmt: str, identity: RunIdentity, uris: list[str], columns: dict, names: pa.Array,
            sizes: np.ndarray, storage: Storage) -> str:
    cfg = load_job(None, {"input": os.path.dirname(os.path.dirname(uris[0])) + "/", "output": output, "format": fmt,
                          "model": identity.model})
    with open_output(cfg.output, RunPolicy.of(cfg), storage, identity, output_schema(), io.StringIO()) as side:
        assert not side.history().committed_runs  # another model_key: every input is processed again
        sink = side.sink({"model": identity.model, "weights": identity.weights, "run_id": side.run_id},
                         checkpoint_rows=CHECKPOINT_ROWS)
        for at in range(0, len(uris), STAGE_ROWS):
            sink.add(rows_for(uris, at, columns, names, sizes))
        sink.flush()
        record = side.on_write_complete(sink)
    assert record["rows"] == len(uris), record
    return record["run_id"]


def build(output: str, fmt: str, uris: list[str], sizes: np.ndarray, seed: int = 0) -> list[str]:
    shutil.rmtree(output, ignore_errors=True)
    labels = class_names()
    names = pa.array(labels, pa.string())
    rng = np.random.default_rng(seed)
    first = first_run_columns(len(uris), labels, rng)
    second = second_run_columns(first, labels, rng)
    storage = Storage.from_env()
    return [one_run(output, fmt, identity, uris, columns, names, sizes, storage)
            for identity, columns in zip(RUNS, (first, second))]


def measure(args: list[str]) -> dict[str, float]:
    """One command as a fresh process: wall and CPU seconds, and its own peak RSS."""
    timer = "/usr/bin/time"
    began = time.perf_counter()
    if os.path.exists(timer):
        done = subprocess.run([timer, "-v", *args], capture_output=True, text=True)
        wall = time.perf_counter() - began
        stats = dict(re.findall(r"^\s*(.+?): (.+)$", done.stderr, re.M))
        rss_kb = int(stats["Maximum resident set size (kbytes)"])
        cpu = float(stats["User time (seconds)"]) + float(stats["System time (seconds)"])
    else:  # no GNU time: this process's children are only ever one at a time, so the max is this child's
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(args, capture_output=True, text=True)
        wall = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss_kb = after.ru_maxrss
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return {"wall_s": wall, "cpu_s": cpu, "rss_mib": rss_kb / 1024}


def profile(output: str, against: str, top: int) -> None:
    from pipeline.report import build_report
    from pipeline.report.outputs import open_output_for_reading

    table = open_output_for_reading(Storage.from_env(), output)
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.runcall(build_report, table, None, against)
    print(f"\ncProfile of build_report(--against {against}) in-process: {time.perf_counter() - began:.1f} s "
          "(with the profiler's overhead)")
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--format", default="parquet", choices=["parquet", "delta", "iceberg"])
    parser.add_argument("--linked", type=int, help="inputs that are real files (default: all of them)")
    parser.add_argument("--work", help="folder for the inputs, outputs and pages (default: a temporary one, removed)")
    parser.add_argument("--profile", action="store_true", help="cProfile build_report --against on the last --rows")
    parser.add_argument("--top", type=int, default=20, help="functions shown per --profile listing")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-report-"))
    try:
        uris = make_inputs(work / "images", max(args.rows), max(args.rows) if args.linked is None else args.linked)
        sizes = np.array([os.path.getsize(work / "images" / "distinct" / f"{s:04d}.jpg")
                          for s in range(DISTINCT_IMAGES)])
        results, first_runs = [], {}
        for n in args.rows:
            output = str(work / f"out-{n}")
            began = time.perf_counter()
            first_run = first_runs[n] = build(output, args.format, uris[:n], sizes)[0]
            built = time.perf_counter() - began
            data = sum(p.stat().st_size for p in Path(output).rglob("*.parquet"))
            cases = [("report (latest run)", [PIPELINE, "report", output, "-o", str(work / f"latest-{n}.html")],
                      work / f"latest-{n}.html"),
                     ("report --against first run", [PIPELINE, "report", output, "--against", first_run, "-o",
                                                     str(work / f"against-{n}.html")], work / f"against-{n}.html"),
                     ("runs --no-listing", [PIPELINE, "runs", output, "--no-listing"], None)]
            for name, command, page in cases:
                figures = measure(command)
                figures["html_mb"] = page.stat().st_size / 1e6 if page else None
                results.append((n, built, data, name, figures))
                print(f"{n:,} rows: {name}: {figures['wall_s']:.1f} s, {figures['rss_mib']:.0f} MiB", file=sys.stderr,
                      flush=True)
        print(f"\n{' '.join(sys.argv)}  ({args.format}; {os.cpu_count()} CPUs)\n")
        print("| rows per run | build 2 runs (s) | data (MiB) | command | wall (s) | CPU (s) | peak RSS (MiB) "
              "| page (MB) |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|")
        for n, built, data, name, f in results:
            page = f"{f['html_mb']:.2f}" if f["html_mb"] is not None else "–"
            print(f"| {n:,} | {built:.1f} | {data / 2**20:.1f} | `{name}` | {f['wall_s']:.1f} | {f['cpu_s']:.1f} | "
                  f"{f['rss_mib']:.0f} | {page} |")
        if args.profile:
            profile(str(work / f"out-{args.rows[-1]}"), first_runs[args.rows[-1]], args.top)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
