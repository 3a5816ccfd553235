"""Growth to 100M inputs, measured (issue 30): how each driver-side cost grows with the input count, fitted and
extrapolated, since nothing here holds 100M objects.

    .venv/bin/python bench/scale.py sizes --sizes 100000 300000 1000000      # real runs per size, then probes
    .venv/bin/python bench/scale.py nights --base 100000 --nights 100         # Delta and Iceberg, 1% a night
    .venv/bin/python bench/scale.py fit                                       # fits, extrapolation, tables

Inputs are tiny real JPEGs (2,000 distinct 8x8 files, ~0.7 KB), each input its own path: a hard link under
`<data>/in-<N>/<000..>/`, 1,000 a folder, plus a Parquet manifest of the same paths. The model is a 1x1
convolution and a linear head (`build` below, `--model scale:build` with this folder on PYTHONPATH) over 8x8
crops, so a run is the driver's and the listing's costs, not the model's.

`sizes`, per N: `pipeline run` (the CLI's default executor: local) from the folder into a Parquet folder, a
Delta table and an Iceberg table, and from the manifest into a Parquet folder; with `--ray-sizes`, also
`--executor ray` (the ledger actor's memory). Each run is watched from outside (peak RSS of every process of
its tree, a fifth of a second apart) and its `_summary.json` gives the time to the first row and the commit.
Then, each in a fresh process: the listing alone (folder and manifest: first page, rate, peak RSS), the listing
filtered by the skip set of a table holding N rows (every input done), `History.load` on each table (time,
the set's bytes, peak RSS above the process's own), `pipeline runs --no-listing` and `pipeline report` under
/usr/bin/time, and the commit record's and the table log's size on disk.

`nights`: on a folder of `--base` inputs committed once to a Delta and an Iceberg table, `--nights` real
`pipeline run`s that each find 1% new inputs (hard links added before the run): each night's commit time
(`committed - last_row` of its summary), its skip set's build time (a `History.load` probe every 10 nights),
and the table's log/metadata files, bytes and checkpoints after it.

Everything lands in `bench/results/scale-<date>.json` (`--results`), merged with what is there; `fit` reads
it. The watcher runs at nice 19; the machine had 2 cores and other sessions' work while this was measured.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timezone
from pathlib import Path

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
# The package is imported from a snapshot of the checkout's HEAD (`git archive`, made by `snapshot`), so that
# other work going on in the same checkout can neither break nor change what is measured.
CODE = os.environ.get("SCALE_CODE", ROOT)
sys.path.insert(0, CODE)
sys.path.insert(0, BENCH)
# Bound to CODE now: bench modules imported later (throughput.py by TreeWatch, formats.py by light_night) put the
# checkout itself first on sys.path, and a package imported after that would be the working tree's.
import pipeline  # noqa: E402,F401

PYTHON = sys.executable
PIPELINE = [PYTHON, "-m", "pipeline"]
DISTINCT = 2_000
PER_FOLDER = 1_000
FORMATS = ("parquet", "delta", "iceberg")
METADATA_DIRS = ("_commits", "_delta_log", "metadata", "_catalog", "_pipeline")


def build(num_classes: int | None = None):
    """The trivial model: 1x1 convolution, global average, linear head (seeded)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, num_classes or 3))


# ---- inputs ----------------------------------------------------------------------------------------------------

def distinct_images(data: Path) -> Path:
    src = data / "src"
    if not (src / ".complete").exists():
        import numpy as np
        from PIL import Image

        src.mkdir(parents=True, exist_ok=True)
        for i in range(DISTINCT):
            pixels = np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / f"{i:04d}.jpg", quality=90)
        (src / ".complete").touch()
        (data / "labels.txt").write_text("a\nb\nc\n")
    return src


def link_inputs(folder: Path, src: Path, start: int, stop: int) -> None:
    """Inputs start..stop-1 of `folder`: hard links to the distinct images, 1,000 a sub-folder."""
    for i in range(start, stop):
        sub = folder / f"{i // PER_FOLDER:06d}"
        if i % PER_FOLDER == 0 or i == start:
            sub.mkdir(parents=True, exist_ok=True)
        target = sub / f"{i:09d}.jpg"
        if not target.exists():
            os.link(src / f"{i % DISTINCT:04d}.jpg", target)


def ensure_inputs(data: Path, n: int) -> tuple[Path, Path]:
    """(folder, manifest) of n inputs, made once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, manifest = data / f"in-{n}", data / f"manifest-{n}.parquet"
    if not (data / f".inputs-{n}").exists():
        link_inputs(folder, distinct_images(data), 0, n)
        uris = [str(folder / f"{i // PER_FOLDER:06d}" / f"{i:09d}.jpg") for i in range(n)]
        pq.write_table(pa.table({"uri": uris}), manifest)
        (data / f".inputs-{n}").touch()
    return folder, manifest


INVENTORY_CONFIG = "inventories/archive/daily"
INVENTORY_FILE_ROWS = 1_000_000


def ensure_inventory(data: Path, n: int) -> Path:
    """An S3 Inventory delivery of `n` objects of s3://archive/photos/ on local disk, laid out as AWS delivers it
    (Parquet data files of up to 1M rows under <config>/data/, <config>/<date>/manifest.json); its manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = data / f"inventory-{n}"
    manifest = root / INVENTORY_CONFIG / "2026-12-01T00-00Z" / "manifest.json"
    if manifest.exists():
        return manifest
    (root / INVENTORY_CONFIG / "data").mkdir(parents=True, exist_ok=True)
    files = []
    for start in range(0, n, INVENTORY_FILE_ROWS):
        ids = range(start, min(n, start + INVENTORY_FILE_ROWS))
        key = f"{INVENTORY_CONFIG}/data/{start // INVENTORY_FILE_ROWS:05d}.parquet"
        pq.write_table(pa.table({
            "bucket": ["archive"] * len(ids), "key": [f"photos/{i // PER_FOLDER:06d}/{i:09d}.jpg" for i in ids],
            "is_latest": [True] * len(ids), "is_delete_marker": [False] * len(ids),
            "size": pa.array([700 + i % 100 for i in ids], pa.int64()),
            "last_modified_date": pa.array([1_764_547_200_000 + i for i in ids], pa.timestamp("ms")),
            "e_tag": [f"{i:032x}" for i in ids]}), root / key)
        files.append({"key": key, "size": (root / key).stat().st_size,
                      "MD5checksum": hashlib.md5((root / key).read_bytes()).hexdigest()})
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"sourceBucket": "archive", "destinationBucket": "arn:aws:s3:::inventory",
                                    "version": "2016-11-30", "fileFormat": "Parquet", "files": files}))
    return manifest


# ---- watching a run ----------------------------------------------------------------------------------------------

class TreeWatch:
    """Peak RSS (MiB) of each process of a tree, by role: the driver (the root), the local executor's model
    process, Ray's ledger actor, other Ray workers, Ray's daemons."""

    def __init__(self, pid: int, interval: float = 0.2):
        from throughput import MemoryWatch

        self.tree = MemoryWatch(pid)  # for its process-tree walk only
        self.pid, self.interval = pid, interval
        self.peaks: dict[str, float] = {}
        self.driver: list[tuple[float, float]] = []  # (seconds since the watch began, driver RSS MiB), 1 s apart
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        from throughput import _rss_mib

        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        began = time.monotonic()
        while not self.done.is_set():
            if not self.driver or time.monotonic() - began - self.driver[-1][0] >= 1.0:
                mib = _rss_mib(self.pid)
                if mib is not None:
                    self.driver.append((round(time.monotonic() - began, 1), round(mib)))
            for pid in self.tree._tree():
                mib = _rss_mib(pid)
                if mib is not None:
                    role = self.role(pid)
                    self.peaks[role] = max(mib, self.peaks.get(role, 0.0))
            self.done.wait(self.interval)

    def role(self, pid: int) -> str:
        if pid == self.pid:
            return "driver"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "gone"
        if "BatchLedger" in cmdline:
            return "ledger actor"
        if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
            return "ray worker (max)"
        if "ray" in cmdline:
            return "ray daemons (max)"
        return "model process"


def pipeline_run(data: Path, source: str, output: Path, fmt: str, executor: str = "auto",
                 env: dict | None = None) -> dict:
    """One `pipeline run` from exec to exit under the watcher; its summary's timeline and counts."""
    args = [*PIPELINE, "run", "--input", source, "--output", str(output), "--format", fmt,
            "--model", "scale:build", "--labels", str(data / "labels.txt"), "--batch-size", "256",
            "--executor", executor, str(data / "job.json")]
    (data / "job.json").write_text(json.dumps({"model": {"preprocess": {"resize_size": 8, "crop_size": 8}},
                                               "errors": {"max_error_rate": 0.5}}))
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{CODE}:{BENCH}"}
    log = output.with_name(output.name + ".log")
    began = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=CODE)
        with TreeWatch(proc.pid) as watch:
            code = proc.wait()
    wall = time.monotonic() - began
    if code != 0:
        raise SystemExit(f"{' '.join(args)} failed ({code}); its output: {log}\n{log.read_text()[-3000:]}")
    summary = json.loads((output / "_summary.json").read_text())
    marks = summary["timeline_s"]
    return {"wall_s": round(wall, 2), "rss_mib": {k: round(v) for k, v in watch.peaks.items()},
            "inputs": summary["inputs"], "rows": summary["rows"], "already_done": summary["already_done"],
            "images_per_s": summary["images_per_s"], "first_row_s": marks.get("first_row"),
            "commit_s": round(marks["committed"] - marks["last_row"], 3) if "last_row" in marks else None,
            "timeline_s": marks, "driver_rss_mib_by_s": watch.driver[::max(1, len(watch.driver) // 60)]}


# ---- probes, each in a fresh process ---------------------------------------------------------------------------

def table_of(output: str, fmt: str):
    from pipeline.io.storage import Storage
    from pipeline.job.config import load_job
    from pipeline.job.rows import OUTPUT_SCHEMA
    from pipeline.output import make_format

    cfg = load_job(None, {"input": "/tmp/none/", "output": output, "format": fmt, "model": "resnet18"})
    return make_format(cfg.output, Storage(), OUTPUT_SCHEMA)


def history_of(output: str, fmt: str, keys: str = "kept"):
    """The skip set's description as a run builds it; `keys="hashed"`: ignore the runs' kept keys."""
    from pipeline.output.history import History

    table = table_of(output, fmt)
    runs = sorted(r["run_id"] for r in table.live())
    return History(committed=table.rows(runs), committed_runs=runs, keys_at=output if keys == "kept" else None)


def rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_rss_mib() -> float:
    """This process's own peak (VmHWM). Not `ru_maxrss`: a child started by vfork + exec (Python's subprocess)
    inherits its parent's peak in it, so every probe would read at least this script's own peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def probe_history(output: str, fmt: str, keys: str = "kept") -> dict:
    """`History.load` over a table's live rows, as the listing task runs it before its first page."""
    from pipeline.io.storage import Storage

    history = history_of(output, fmt, keys)
    before = rss_now_mib()
    began = time.perf_counter()
    done = history.load(Storage())
    seconds = time.perf_counter() - began
    return {"load_s": round(seconds, 2), "keys": len(done.done_versions), "set_bytes": done.done_versions.keys.nbytes,
            "rss_before_mib": round(before), "peak_above_mib": round(peak_rss_mib() - before),
            "held_above_mib": round(rss_now_mib() - before)}


def probe_profile(output: str, fmt: str) -> dict:
    """Where `History.load`'s time and memory go: cProfile's top functions; Python's own peak (tracemalloc) and
    Arrow's (its pool's max_memory) against the set it leaves."""
    import cProfile
    import pstats
    import tracemalloc

    import pyarrow as pa

    from pipeline.io.storage import Storage

    history = history_of(output, fmt)
    profiler = cProfile.Profile()
    profiler.enable()
    done = history.load(Storage())
    profiler.disable()
    stats = pstats.Stats(profiler)
    top = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:12]  # by own time
    tracemalloc.start()
    before = rss_now_mib()
    done = history.load(Storage())
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"own_time_top": [{"function": f"{f[0].rsplit('/', 2)[-1]}:{f[1]}:{f[2]}", "calls": v[1],
                              "own_s": round(v[2], 2), "cumulative_s": round(v[3], 2)} for f, v in top],
            "python_peak_mib": round(python_peak / 2**20, 1), "arrow_pool_max_mib": round(
                pa.default_memory_pool().max_memory() / 2**20, 1), "arrow_pool": pa.default_memory_pool().backend_name,
            "set_mib": round(done.done_versions.keys.nbytes / 2**20, 1), "rss_after_second_load_mib": round(
                rss_now_mib()), "rss_before_second_load_mib": round(before)}


def probe_keyset(n: str) -> dict:
    """The skip set's own memory, without reading a table: `n` random 16-byte keys in parts of 32,768 (as
    `History.load` collects them), then `KeySet` (concatenate, unique); peak and held RSS per key."""
    import numpy as np

    from pipeline.output.history import KeySet

    n_keys, rng = int(n), np.random.default_rng(0)
    before = rss_now_mib()
    parts = [rng.integers(0, 255, (min(32_768, n_keys - s), 16), dtype=np.uint8).view("S16").ravel()
             for s in range(0, n_keys, 32_768)]
    began = time.perf_counter()
    keys = KeySet(np.concatenate(parts))
    seconds = time.perf_counter() - began
    del parts
    return {"keys": len(keys), "build_s": round(seconds, 2), **per_key(before, n_keys)}


def probe_seen(n: str) -> dict:
    """A manifest's repeat filter (`io/distinct.SeenKeys`) over `n` distinct URIs, 1,000 at a time (as
    `read_manifest` calls it): seconds, peak and held RSS per key."""
    from pipeline.io.distinct import SeenKeys

    n_keys, seen = int(n), SeenKeys()
    before = rss_now_mib()
    began = time.perf_counter()
    for start in range(0, n_keys, 1000):
        stop = min(start + 1000, n_keys)
        seen.first_seen([f"s3://archive/photos/{i // 1000:06d}/{i:09d}.jpg" for i in range(start, stop)])
    seconds = time.perf_counter() - began
    return {"keys": len(seen), "s": round(seconds, 1), **per_key(before, n_keys)}


def per_key(before_mib: float, n: int) -> dict:
    return {"peak_bytes_per_key": round((peak_rss_mib() - before_mib) * 2**20 / n, 1),
            "held_bytes_per_key": round((rss_now_mib() - before_mib) * 2**20 / n, 1)}


def probe_keep(output: str, fmt: str) -> dict:
    """Keeps each live run's skip-set keys as its commit would have (for tables committed before commits kept
    them). Timed: the commit's share alone (hash, sort, write), over rows read back beforehand."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.io.storage import Storage
    from pipeline.output.history import KEY_COLUMNS, split_done
    from pipeline.output.run_keys import KeysRecorder

    table, storage = table_of(output, fmt), Storage()
    runs = sorted(r["run_id"] for r in table.live())
    rows = [pa.Table.from_batches([b]) for b in table.rows(runs).batches(storage, KEY_COLUMNS + ["run_id"])]
    began = time.perf_counter()
    for run in runs:
        recorder = KeysRecorder(storage, output, run, fence=lambda: None, split=split_done)
        for _ in recorder.watch(t.filter(pc.equal(t["run_id"], run)) for t in rows):
            pass
    return {"runs": len(runs), "rows": sum(t.num_rows for t in rows),
            "keep_s": round(time.perf_counter() - began, 2)}


def probe_listing(uri: str, output: str | None, fmt: str | None, keys: str = "kept") -> dict:
    """The job's source alone (`InputListing.blocks`, as the listing task runs it): time to its first page or
    block, inputs/s, peak RSS; with a table, filtered by that table's skip set (its build included)."""
    from pipeline.io.listing import InputListing
    from pipeline.io.storage import Storage

    history = history_of(output, fmt, keys) if output else None
    listing = InputListing(uri, Storage(), ["jpg"], history)
    before = rss_now_mib()
    counts = {"listed": 0, "todo": 0}

    def counted(todo: int, skipped_ext: int, done: int, repeats: int) -> None:
        counts["listed"] += todo + skipped_ext + done
        counts["todo"] += todo

    began, first = time.perf_counter(), None
    for _ in listing.blocks(counted):
        first = first if first is not None else time.perf_counter() - began
    seconds = time.perf_counter() - began
    return {"listed": counts["listed"], "todo": counts["todo"], "total_s": round(seconds, 2),
            "first_block_s": None if first is None else round(first, 3),
            "inputs_per_s": round(counts["listed"] / seconds), "rss_before_mib": round(before),
            "peak_above_mib": round(peak_rss_mib() - before)}


def probe(kind: str, *args: str) -> dict:
    """Run a probe in a fresh process (this script, `probe <kind> ...`); its JSON."""
    done = subprocess.run([PYTHON, __file__, "probe", kind, *args], capture_output=True, text=True, cwd=CODE,
                          env={**os.environ, "PYTHONPATH": CODE})
    if done.returncode != 0:
        raise SystemExit(f"probe {kind} {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def footprint(output: Path, fmt: str) -> dict:
    """The output's metadata on disk: files and bytes, the newest commit record / log entry / metadata.json,
    checkpoints, manifest lists, snapshots kept."""
    meta = [p for p in output.rglob("*")
            if p.is_file() and any(d in METADATA_DIRS for d in p.relative_to(output).parts)]
    sizes = {"metadata_files": len(meta), "metadata_bytes": sum(p.stat().st_size for p in meta)}
    if fmt == "parquet":
        records = sorted(output.glob("_commits/*.json"))
        sizes["last_record_bytes"] = records[-1].stat().st_size
    elif fmt == "delta":
        entries = sorted(output.glob("_delta_log/*.json"))
        sizes["last_record_bytes"] = entries[-1].stat().st_size
        sizes["log_entries"] = len(entries)
        sizes["checkpoints"] = len(list(output.glob("_delta_log/*.checkpoint*.parquet")))
    else:
        metadata = sorted(output.glob("metadata/*.metadata.json"), key=lambda p: p.stat().st_mtime)
        sizes["last_record_bytes"] = metadata[-1].stat().st_size
        sizes["metadata_json_files"] = len(metadata)
        sizes["manifest_lists"] = len(list(output.glob("metadata/snap-*.avro")))
        sizes["snapshots_in_metadata"] = len(json.loads(metadata[-1].read_text()).get("snapshots", []))
        sizes["run_copies"] = len(list(output.glob("_pipeline/runs/*.json")))
    data = [p for p in output.rglob("*.parquet") if not any(d in METADATA_DIRS or d.startswith("_")
                                                            for d in p.relative_to(output).parts)]
    sizes["data_files"], sizes["data_bytes"] = len(data), sum(p.stat().st_size for p in data)
    return sizes


def measure(args: list[str]) -> dict[str, float]:
    """One command as a fresh process under GNU time: wall and CPU seconds, its peak RSS (as bench/report.py)."""
    began = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True, cwd=CODE,
                          env={**os.environ, "PYTHONPATH": CODE})
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr[-3000:]}")
    stats = dict(re.findall(r"^\s*(.+?): (.+)$", done.stderr, re.M))
    return {"wall_s": wall, "cpu_s": float(stats["User time (seconds)"]) + float(stats["System time (seconds)"]),
            "rss_mib": int(stats["Maximum resident set size (kbytes)"]) / 1024}


def commands_on(output: Path, fmt: str, work: Path) -> dict:
    """`pipeline runs --no-listing` and `pipeline report` on the output, each a fresh process under time -v."""
    runs = measure([*PIPELINE, "runs", str(output), "--no-listing"])
    report = measure([*PIPELINE, "report", str(output), "-o", str(work / f"report-{output.name}.html")])
    return {"runs": {k: round(v, 2) for k, v in runs.items()}, "report": {k: round(v, 2) for k, v in report.items()}}


# ---- sizes -----------------------------------------------------------------------------------------------------

def probes_of(n: int, data: Path, work: Path) -> dict:
    """The probes of `one_size` alone, on the inputs and tables it left."""
    folder, manifest = ensure_inputs(data, n)
    result: dict = {"listing": {"folder": probe("listing", str(folder)), "manifest": probe("listing", str(manifest))},
                    "tables": {}}
    for fmt in FORMATS:
        output = str(work / f"out-{n}-{fmt}")
        result["tables"][fmt] = {"history": probe("history", output, fmt),
                                 "listing_skipped": probe("listing", str(folder), output, fmt)}
        print(f"{n:,} {fmt}: {result['tables'][fmt]}", flush=True)
    return result


def keys_of(n: int, data: Path, work: Path) -> dict:
    """On each table of `n` rows: the skip set hashed from its rows, its runs' keys kept (as their commits would
    have), the skip set read from them; then a nightly listing's first block from an inventory, both ways."""
    inventory = str(ensure_inventory(data, 100_000))
    result = {}
    for fmt in FORMATS:
        output = str(work / f"out-{n}-{fmt}")
        result[fmt] = {"hashed": probe("history", output, fmt, "hashed"), "keep": probe("keep", output, fmt),
                       "kept": probe("history", output, fmt, "kept"),
                       "inventory_first_block": {keys: probe("listing", inventory, output, fmt, keys)["first_block_s"]
                                                 for keys in ("hashed", "kept")}}
        print(f"{n:,} {fmt}: {result[fmt]}", flush=True)
    return result


def one_size(n: int, data: Path, work: Path, ray: bool) -> dict:
    folder, manifest = ensure_inputs(data, n)
    result: dict = {"inputs": n, "runs": {}, "tables": {}}
    for old in work.glob(f"out-{n}-*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    for fmt in FORMATS:
        output = work / f"out-{n}-{fmt}"
        result["runs"][f"folder->{fmt}"] = pipeline_run(data, str(folder), output, fmt)
        print(f"{n:,} folder->{fmt}: {result['runs'][f'folder->{fmt}']}", flush=True)
    result["runs"]["manifest->parquet"] = pipeline_run(data, str(manifest), work / f"out-{n}-manifest", "parquet")
    print(f"{n:,} manifest->parquet: {result['runs']['manifest->parquet']}", flush=True)
    if ray:
        result["runs"]["ray folder->parquet"] = pipeline_run(data, str(folder), work / f"out-{n}-ray", "parquet",
                                                             executor="ray")
        print(f"{n:,} ray: {result['runs']['ray folder->parquet']}", flush=True)
    result["listing"] = {"folder": probe("listing", str(folder)), "manifest": probe("listing", str(manifest))}
    for fmt in FORMATS:
        output = work / f"out-{n}-{fmt}"
        result["tables"][fmt] = {"history": probe("history", str(output), fmt),
                                 "listing_skipped": probe("listing", str(folder), str(output), fmt),
                                 "footprint": footprint(output, fmt), **commands_on(output, fmt, work)}
        print(f"{n:,} {fmt} table: {result['tables'][fmt]}", flush=True)
    return result


def snapshot(data: Path) -> tuple[str, str]:
    """HEAD's pipeline/ under <data>/code-<commit>/ (made once): what every run and probe imports."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                            check=True).stdout.strip()
    code = data / f"code-{commit[:12]}"
    if not (code / "pipeline").exists():
        code.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit, "pipeline"], capture_output=True, cwd=ROOT, check=True)
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    return str(code), commit


def inventories(sizes: list[int], data: Path, results_path: Path) -> None:
    """The job's source over an S3 Inventory of each size: first block, rate, peak RSS (no object is read)."""
    for n in sizes:
        listing = probe("listing", str(ensure_inventory(data, n)))
        print(f"inventory {n:,}: {listing}", flush=True)
        save(results_path, "inventory", {str(n): listing})


def inventory_run(n: int, data: Path, work: Path, executor: str) -> dict:
    """A real job from an S3 Inventory: `n` objects put to moto's S3 server on loopback (pipeline/dev/local_s3.py),
    their inventory on local disk (listing each object's own ETag and size), `pipeline run` from its manifest.json."""
    import boto3

    from pipeline.dev.local_s3 import LocalS3Server

    src = distinct_images(data)
    with LocalS3Server() as server:
        s3 = boto3.client("s3", **{"endpoint_url": server.endpoint_url, "region_name": "us-east-1"},
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="archive")
        for i in range(n):
            s3.put_object(Bucket="archive", Key=f"photos/{i // PER_FOLDER:06d}/{i:09d}.jpg",
                          Body=(src / f"{i % DISTINCT:04d}.jpg").read_bytes())
        manifest = ensure_inventory(data, n)
        output = work / f"inventory-run-{n}-{executor}"
        shutil.rmtree(output, ignore_errors=True)
        return pipeline_run(data, str(manifest), output, "parquet", executor, env=server.environ())


def save(results_path: Path, key: str, value) -> None:
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("machine", machine())
    results.setdefault(key, {})
    results[f"{key}_commit"] = os.environ.get("SCALE_COMMIT")
    results[key].update(value)
    results_path.write_text(json.dumps(results, indent=1) + "\n")


def machine() -> dict:
    import platform

    import deltalake
    import pyarrow
    import pyiceberg

    return {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "pyarrow": pyarrow.__version__, "deltalake": deltalake.__version__,
            "pyiceberg": pyiceberg.__version__,
            "commit": os.environ.get("SCALE_COMMIT"),
            "note": "2-core shared machine; other sessions' work (tests, builds) ran at the same time"}


# ---- nights ----------------------------------------------------------------------------------------------------

def nights(base: int, count: int, data: Path, work: Path, results_path: Path, formats: list[str],
           light: bool = False, keep_snapshots: int | None = None) -> None:
    """`count` nightly runs of 1% of `base` new inputs each on one table per format, after a first full run;
    `light`: the nights not done yet through `light_night` instead of `pipeline run`; `keep_snapshots`: the
    Iceberg table keeps that many (`keep_last`), as 5 days' default age keeps about 5 nightly runs."""
    src, folder, per_night = distinct_images(data), data / f"nights-{base}", base // 100
    done = json.loads(results_path.read_text()).get("nights", {}) if results_path.exists() else {}
    for fmt in formats:
        if "0" not in done.get(fmt, {}):
            shutil.rmtree(work / f"nights-{base}-{fmt}", ignore_errors=True)
    for night in range(0, count + 1):
        if all(str(night) in done.get(fmt, {}) for fmt in formats):
            continue
        link_inputs(folder, src, 0, base + night * per_night)
        for fmt in formats:
            if str(night) in done.get(fmt, {}):
                continue
            output = work / f"nights-{base}-{fmt}"
            if light and night > 0:
                record = light_night(output, fmt, folder, base + (night - 1) * per_night, per_night)
            else:
                run = pipeline_run(data, str(folder), output, fmt)
                record = {k: run[k] for k in ("wall_s", "rss_mib", "inputs", "rows", "already_done", "first_row_s",
                                              "commit_s")}
            if night == 0 and fmt == "iceberg" and keep_snapshots:
                keep_last(output, keep_snapshots)
            record["footprint"] = footprint(output, fmt)
            if night % 10 == 0:
                record["history"] = probe("history", str(output), fmt)
            done.setdefault(fmt, {})[str(night)] = record
            save(results_path, "nights", {fmt: done[fmt]})
            print(f"night {night} {fmt}: rows {record['rows']}, commit {record['commit_s']} s, "
                  f"metadata {record['footprint']['metadata_bytes']:,} B", flush=True)


def keep_last(output: Path, snapshots: int) -> None:
    """Table properties that make the pipeline's expiry after each commit keep the last `snapshots` snapshots:
    nights here are seconds apart, not days, so no age would stand for a night."""
    table = table_of(str(output), "iceberg").load()
    table.transaction().set_properties({"history.expire.max-snapshot-age-ms": "1",
                                        "history.expire.min-snapshots-to-keep": str(snapshots)}).commit_transaction()


def light_night(output: Path, fmt: str, folder: Path, start: int, n: int) -> dict:
    """One night without the CLI, the model or the listing: through pipeline/output's front door as
    bench/formats.py drives it, as the table's last run (same job and model keys): the skip set loaded from the
    table, `n` new rows staged, then `on_write_complete` (the same commit a real run makes), each timed."""
    import io as text_io

    from pipeline.io.storage import ObjectInfo, Storage
    from pipeline.job.config import load_job
    from pipeline.job.rows import OUTPUT_SCHEMA
    from pipeline.output import RunIdentity, RunPolicy, open_output

    from formats import rows_for  # after the package: it would put the checkout's own ahead on sys.path

    last = table_of(str(output), fmt).committed()[-1]
    identity = RunIdentity(last["job_key"], last["model_key"], last["model"], last["weights"])
    cfg = load_job(None, {"input": str(folder), "output": str(output), "format": fmt, "model": "resnet18"})
    paths = [folder / f"{i // PER_FOLDER:06d}" / f"{i:09d}.jpg" for i in range(start, start + n)]
    # As the folder's listing reports them (size and mtime), so that a real night after these sees their rows done.
    objects = [ObjectInfo(str(p), st.st_size, None, datetime.fromtimestamp(st.st_mtime, tz=timezone.utc))
               for p, st in ((p, p.stat()) for p in paths)]
    storage = Storage()
    with open_output(cfg.output, RunPolicy.of(cfg), storage, identity, OUTPUT_SCHEMA, text_io.StringIO()) as side:
        began = time.perf_counter()
        done = side.history().load(storage)
        skip_set_s = time.perf_counter() - began
        sink = side.sink({"model": last["model"], "weights": last["weights"], "run_id": side.run_id},
                         checkpoint_rows=2_000)
        sink.add(rows_for(done.todo(objects)))
        sink.flush()
        began = time.perf_counter()
        side.on_write_complete(sink)
        commit_s = time.perf_counter() - began
    return {"light": True, "rows": n, "commit_s": round(commit_s, 3), "skip_set_s": round(skip_set_s, 3)}


def big_table(output: Path, fmt: str, n: int) -> dict:
    """A table of `n` rows committed as one run through pipeline/output's front door (no CLI, no model, synthetic
    inputs of s3://archive/photos/ as the inventories name them, staged a million at a time): the commit's time,
    which includes keeping the run's keys."""
    import io as text_io

    from pipeline.io.storage import ObjectInfo, Storage
    from pipeline.job.config import load_job
    from pipeline.job.rows import OUTPUT_SCHEMA
    from pipeline.output import RunIdentity, RunPolicy, open_output

    from formats import rows_for

    cfg = load_job(None, {"input": "s3://archive/photos/", "output": str(output), "format": fmt, "model": "resnet18"})
    cfg.output.rows_per_file = 1_000_000
    when = datetime(2026, 12, 1, tzinfo=timezone.utc)
    storage = Storage()
    identity = RunIdentity("big-job", "big-model", "resnet18", "IMAGENET1K_V1")
    with open_output(cfg.output, RunPolicy.of(cfg), storage, identity, OUTPUT_SCHEMA, text_io.StringIO()) as side:
        sink = side.sink({"model": "resnet18", "weights": "IMAGENET1K_V1", "run_id": side.run_id},
                         checkpoint_rows=1_000_000)
        for start in range(0, n, 1_000_000):
            sink.add(rows_for([ObjectInfo(f"s3://archive/photos/{i // PER_FOLDER:06d}/{i:09d}.jpg", 700 + i % 100,
                                          f"{i:032x}", when) for i in range(start, min(n, start + 1_000_000))]))
        sink.flush()
        began = time.perf_counter()
        side.on_write_complete(sink)
        return {"rows": n, "commit_s": round(time.perf_counter() - began, 2)}


# ---- fits ------------------------------------------------------------------------------------------------------

TARGET_N = 100_000_000


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a + b·N and y = a + b·ln N; each one's R² and its value at 100M."""
    import numpy as np

    x, y = np.array(xs, float), np.array(ys, float)
    out = {}
    for name, feature, at in (("linear", x, TARGET_N), ("log", np.log(x), np.log(TARGET_N))):
        b, a = np.polyfit(feature, y, 1)
        residual = ((y - (a + b * feature)) ** 2).sum()
        total = ((y - y.mean()) ** 2).sum()
        out[name] = {"a": float(a), "b": float(b), "r2": float(1 - residual / total) if total else 1.0,
                     "at_100m": float(a + b * at)}
    return out


def size_metrics(results: dict) -> dict[str, dict[int, float]]:
    """metric name -> {N: value}: the runs, tables and commands of `sizes`; the listing and skip-set probes of
    each `probes-<commit>` (the code they measured: before and after the KeySet change); the inventories."""
    metrics: dict[str, dict[int, float]] = {}

    def put(name: str, n: int, value) -> None:
        if value is not None:
            metrics.setdefault(name, {})[n] = float(value)

    for key, r in results.get("sizes", {}).items():
        n = int(key)
        for run, m in r["runs"].items():
            for role in ("driver", "model process", "ledger actor"):
                put(f"{run}: {role} peak RSS MiB", n, m["rss_mib"].get(role))
            put(f"{run}: first row s", n, m["first_row_s"])
            put(f"{run}: commit s", n, m["commit_s"])
        for fmt, t in r["tables"].items():
            put(f"{fmt}: last commit record bytes", n, t["footprint"]["last_record_bytes"])
            put(f"{fmt}: metadata bytes", n, t["footprint"]["metadata_bytes"])
            put(f"{fmt}: `pipeline runs --no-listing` s", n, t["runs"]["wall_s"])
            put(f"{fmt}: `pipeline report` s", n, t["report"]["wall_s"])
            put(f"{fmt}: `pipeline report` peak RSS MiB", n, t["report"]["rss_mib"])
    for section in sorted(k for k in results if k.startswith("probes-") and not k.endswith("_commit")):
        code = section.removeprefix("probes-")
        for key, r in results[section].items():
            n = int(key)
            for source, m in r["listing"].items():
                put(f"listing {source}: s", n, m["total_s"])
                put(f"listing {source}: first block s", n, m["first_block_s"])
                put(f"listing {source}: peak RSS above start MiB", n, m["peak_above_mib"])
            for fmt, t in r["tables"].items():
                put(f"{fmt} @{code}: History.load s", n, t["history"]["load_s"])
                put(f"{fmt} @{code}: History.load peak RSS above start MiB", n, t["history"]["peak_above_mib"])
                put(f"{fmt} @{code}: History.load held RSS above start MiB", n, t["history"]["held_above_mib"])
                put(f"{fmt} @{code}: listing + skip set, all done, s", n, t["listing_skipped"]["total_s"])
                put(f"{fmt} @{code}: listing + skip set peak RSS above start MiB", n,
                    t["listing_skipped"]["peak_above_mib"])
    for key, m in results.get("inventory", {}).items():
        put("inventory: listing s", int(key), m["total_s"])
        put("inventory: first block s", int(key), m["first_block_s"])
        put("inventory: peak RSS above start MiB", int(key), m["peak_above_mib"])
    return metrics


def fits(results_path: Path) -> None:
    results = json.loads(results_path.read_text())
    metrics = size_metrics(results)
    ns = sorted({n for values in metrics.values() for n in values})
    out, lines = {}, ["| metric | " + " | ".join(f"{n:,}" for n in ns) +
                      " | linear: per 1M inputs (R²) | at 100M, linear | at 100M, log |",
                      "|---|" + "---:|" * (len(ns) + 3)]
    for name, values in metrics.items():
        cells = " | ".join(f"{values[n]:,.4g}" if n in values else "–" for n in ns)
        if len(values) >= 2:
            f = fit(list(values), list(values.values()))
            out[name] = f
            lines.append(f"| {name} | {cells} | {f['linear']['b'] * 1e6:,.4g} ({f['linear']['r2']:.3f}) | "
                         f"{f['linear']['at_100m']:,.4g} | {f['log']['at_100m']:,.4g} |")
        else:
            lines.append(f"| {name} | {cells} | | | |")
    results["fits"] = out
    results["fits_by_night"] = night_fits(results.get("nights", {}))
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    print(json.dumps(results["fits_by_night"], indent=1))


def night_fits(by_format: dict) -> dict:
    """Per format: commit seconds and metadata bytes against the night number (linear), first and last nights."""
    import numpy as np

    out = {}
    for fmt, nights_done in by_format.items():
        nights_ = sorted(int(k) for k in nights_done if int(k) > 0)
        if len(nights_) < 2:
            continue
        commit = [nights_done[str(k)]["commit_s"] for k in nights_]
        meta = [nights_done[str(k)]["footprint"]["metadata_bytes"] for k in nights_]
        loads = {k: nights_done[str(k)]["history"]["load_s"] for k in nights_ if "history" in nights_done[str(k)]}
        out[fmt] = {"nights": len(nights_), "commit_s_per_night": float(np.polyfit(nights_, commit, 1)[0]),
                    "commit_s_first10_median": float(np.median(commit[:10])),
                    "commit_s_last10_median": float(np.median(commit[-10:])),
                    "metadata_bytes_per_night": float(np.polyfit(nights_, meta, 1)[0]),
                    "metadata_bytes_last": meta[-1], "history_load_s": loads,
                    "last_footprint": nights_done[str(nights_[-1])]["footprint"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["sizes", "probes", "keys", "big", "nights", "inventory", "inventory-run", "fit", "probe"])
    parser.add_argument("probe_args", nargs="*")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--ray-sizes", type=int, nargs="*", default=[100_000])
    parser.add_argument("--base", type=int, default=100_000)
    parser.add_argument("--nights", type=int, default=100)
    parser.add_argument("--night-formats", nargs="+", default=["delta", "iceberg"])
    parser.add_argument("--light", action="store_true", help="nights: without the CLI and the model (light_night)")
    parser.add_argument("--keep-snapshots", type=int, help="nights: the Iceberg table keeps the last K snapshots")
    parser.add_argument("--data", default="/tmp/pipeline-scale")
    parser.add_argument("--results", default=os.path.join(BENCH, "results", f"scale-{date.today()}.json"))
    args = parser.parse_args()
    data, results = Path(args.data), Path(args.results)
    work = data / "work"
    if args.command == "probe":
        kind, *rest = args.probe_args
        probes = {"history": probe_history, "profile": probe_profile, "keyset": probe_keyset, "seen": probe_seen,
                  "keep": probe_keep}
        print(json.dumps(probes[kind](*rest) if kind in probes else probe_listing(*rest, *[None] * (3 - len(rest)))))
        return
    data.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if "SCALE_CODE" not in os.environ:  # again, in a process that imports the package from HEAD's snapshot
        code, commit = snapshot(data)
        os.execve(PYTHON, [PYTHON, __file__, *sys.argv[1:]], {**os.environ, "SCALE_CODE": code, "SCALE_COMMIT": commit})
    if args.command == "sizes":
        for n in args.sizes:
            save(results, "sizes", {str(n): one_size(n, data, work, ray=n in args.ray_sizes)})
    elif args.command == "probes":  # into probes-<commit>: the code measured may differ from the runs'
        for n in args.sizes:
            save(results, f"probes-{os.environ['SCALE_COMMIT'][:7]}", {str(n): probes_of(n, data, work)})
    elif args.command == "inventory":
        inventories(args.sizes, data, results)
    elif args.command == "inventory-run":
        for executor in ("local", "ray"):
            run = inventory_run(args.sizes[0], data, work, executor)
            print(f"inventory run {executor}: {run}", flush=True)
            save(results, "inventory_run", {f"{args.sizes[0]} {executor}": run})
    elif args.command == "keys":  # the skip set from kept keys against hashing, on the size runs' tables
        for n in args.sizes:
            save(results, f"keys-{os.environ['SCALE_COMMIT'][:7]}", {str(n): keys_of(n, data, work)})
    elif args.command == "big":  # one table of N rows a format, then the keys probes on it
        for n in args.sizes:
            inventory = str(ensure_inventory(data, 100_000))
            for fmt in FORMATS:
                output = work / f"big-{n}-{fmt}"
                shutil.rmtree(output, ignore_errors=True)
                made = big_table(output, fmt, n)
                result = {"commit": made, **{keys: probe("history", str(output), fmt, keys)
                                             for keys in ("kept", "hashed")},
                          "inventory_first_block_kept": probe("listing", inventory, str(output), fmt,
                                                              "kept")["first_block_s"]}
                print(f"{n:,} {fmt}: {result}", flush=True)
                save(results, f"big-{os.environ['SCALE_COMMIT'][:7]}", {f"{n} {fmt}": result})
    elif args.command == "nights":
        nights(args.base, args.nights, data, work, results, args.night_formats, args.light, args.keep_snapshots)
    else:
        fits(results)


if __name__ == "__main__":
    main()
