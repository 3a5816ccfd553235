"""What a user waits for and what the machine pays: each contender as a fresh process, from exec to exit.

    .venv/bin/python bench/whole_process.py                                  # 3,000 and 30,000 JPEGs
    .venv/bin/python bench/whole_process.py --images 200 --only daft         # a smoke run
    .venv/bin/python bench/whole_process.py --odd-files                      # a truncated JPEG, an empty file

Unlike bench/throughput.py, nothing is left out of the clock: the interpreter starting, imports, Ray
starting (for this pipeline), the model loading, the last file written, the process exiting. Contenders:
  pipeline    `pipeline run --input FOLDER --output OUT --model --weights --labels --batch-size`, the CLI;
  torch_loop  the DataLoader loop of bench/contenders.py;
  daft        Daft 0.7 on its native runner (bench/daft_contender.py), under its own venv (bench/daft-venv.sh).
The memory is the peak, over samples every 0.2 s, of the summed PSS of the process tree (each shared page
counted once, split between its sharers): bench/throughput.py's MemoryWatch.

--odd-files runs each contender on 8 good JPEGs plus one truncated JPEG, then on 8 plus one empty file, and
says what became of the odd one: the job failed, a row with an error, a silent prediction, or no row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from images import ensure_images, photo_jpeg  # noqa: E402
from throughput import MemoryWatch, contender_argv, daft_python, daft_versions, make_model, versions  # noqa: E402

CONTENDERS = {"pipeline": "this pipeline (`pipeline run`)", "torch_loop": "peer 2: DataLoader loop",
              "daft": "peer 3: Daft 0.7 (native)"}


def command(name: str, spec: dict, work: str, python: str) -> list[str]:
    if name == "pipeline":
        cli = os.path.join(os.path.dirname(sys.executable), "pipeline")
        return [cli, "run", "--input", spec["input"], "--output", spec["output"], "--model", spec["model"],
                "--weights", spec["checkpoint"], "--labels", spec["labels"], "--batch-size", str(spec["batch_size"])]
    spec_path = os.path.join(work, f"{name}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    return contender_argv(name, spec_path, os.path.join(work, f"{name}.result.json"), python)


def run(argv: list[str], log_path: str) -> dict:
    """One process tree from exec to exit: its exit code, seconds and peak summed PSS (MiB)."""
    time.sleep(2)  # let the previous contender's processes wind down
    with open(log_path, "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(BENCH),
                                env=os.environ)  # as a user runs it: Ray's defaults
        with MemoryWatch(proc.pid, pss=True) as memory:
            code = proc.wait()
        seconds = time.monotonic() - started
    return {"code": code, "seconds": seconds, "pss_mib": memory.pss_peak_mib, "log": log_path}


def output_rows(folder: str) -> list[dict]:
    """Every row of the Parquet files a contender left in `folder` (not under _staging/, _commits/, ...)."""
    import pyarrow.parquet as pq

    rows = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        for name in sorted(files):
            if name.endswith(".parquet"):
                rows.extend(pq.read_table(os.path.join(parent, name)).to_pylist())
    return rows


def last_error(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if "error" in line.lower() or "exception" in line.lower()]
    return (lines[-1] if lines else "no error line in its output")[:140]


def throughput(specs: dict[int, dict], work: str, pythons: dict[str, str]) -> str:
    lines = ["| contender | images | whole-process s | images/s | peak PSS MiB | first row s |",
             "|---|---:|---:|---:|---:|---:|"]
    for n, spec in specs.items():
        for name in pythons:
            run_spec = {**spec, "output": os.path.join(work, f"out-{name}-{n}")}
            r = run(command(name, run_spec, work, pythons[name]), os.path.join(work, f"{name}-{n}.log"))
            if r["code"] != 0:
                raise SystemExit(f"{name} failed on {n} images (exit {r['code']}): {last_error(r['log'])}")
            rows = len(output_rows(run_spec["output"]))
            if rows != n:
                raise SystemExit(f"{name} wrote {rows} rows for {n} images")
            first = first_row_s(run_spec["output"]) if name == "pipeline" else None
            print(f"{name}: {n:,} images in {r['seconds']:.1f}s, peak PSS {r['pss_mib']:.0f} MiB"
                  + (f", first row at {first:.1f}s" if first is not None else ""), flush=True)
            lines.append(f"| {CONTENDERS[name]} | {n:,} | {r['seconds']:.1f} | {n / r['seconds']:.1f} | "
                         f"{r['pss_mib']:.0f} | {'-' if first is None else f'{first:.1f}'} |")
    return "\n".join(lines)


def first_row_s(output: str) -> float | None:
    """When the pipeline's first row reached its driver, in seconds from its process's start (its summary's
    timeline)."""
    try:
        with open(os.path.join(output, "_summary.json")) as f:
            return json.load(f)["timeline_s"].get("first_row")
    except (OSError, KeyError):
        return None


def odd_files(spec: dict, work: str, pythons: dict[str, str]) -> str:
    good = [photo_jpeg(seed) for seed in range(8)]
    cases = {"truncated JPEG": ("truncated.jpg", good[0][: len(good[0]) // 2]), "empty file": ("empty.jpg", b"")}
    outcomes: dict[str, dict[str, str]] = {name: {} for name in pythons}
    for case, (odd_name, odd_bytes) in cases.items():
        folder = os.path.join(work, "odd-" + odd_name.split(".")[0])
        os.makedirs(folder)
        for i, data in enumerate(good):
            with open(os.path.join(folder, f"good-{i}.jpg"), "wb") as f:
                f.write(data)
        with open(os.path.join(folder, odd_name), "wb") as f:
            f.write(odd_bytes)
        images = sorted(os.path.join(folder, name) for name in os.listdir(folder))
        for name in pythons:
            run_spec = {**spec, "input": folder, "images": images, "images_count": len(images),
                        "output": os.path.join(work, f"out-{name}-{odd_name}")}
            r = run(command(name, run_spec, work, pythons[name]), os.path.join(work, f"{name}-{odd_name}.log"))
            outcomes[name][case] = outcome(r, run_spec["output"], odd_name).replace(folder + os.sep, "")
            print(f"{name}, {case}: {outcomes[name][case]}", flush=True)
    lines = ["| contender | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    lines += [f"| {CONTENDERS[name]} | " + " | ".join(outcomes[name][case] for case in cases) + " |"
              for name in pythons]
    return "\n".join(lines)


def outcome(result: dict, output: str, odd_name: str) -> str:
    if result["code"] != 0:
        return f"job failed (exit {result['code']}): `{last_error(result['log'])}`"
    rows = output_rows(output)
    odd = [row for row in rows if os.path.basename(row.get("uri") or row.get("path") or "") == odd_name]
    others = f"{len(rows) - len(odd)} good rows"
    if not odd:
        return f"no row for it, silently ({others})"
    if odd[0].get("error"):
        return f"row with error `{odd[0]['error']}` ({others})"
    return f"silent: predicted `{odd[0].get('label')}` ({others})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[3000, 30000])
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), help="run only these contenders")
    parser.add_argument("--daft-python", default=os.path.join(".venv-daft", "bin", "python"),
                        help="the python of Daft's own venv (bench/daft-venv.sh); Daft is skipped without it")
    parser.add_argument("--odd-files", action="store_true", help="the bad-input check instead of the timings")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "pipeline-bench"),
                        help="where generated images and checkpoints are kept between runs")
    args = parser.parse_args()

    wanted = args.only or list(CONTENDERS)
    daft_py = daft_python(args.daft_python) if "daft" in wanted else None
    pythons = {name: daft_py if name == "daft" else sys.executable for name in wanted if name != "daft" or daft_py}
    checkpoint, labels = make_model(args.model, args.data)
    spec = {"model": args.model, "checkpoint": checkpoint, "labels": labels, "batch_size": args.batch_size,
            "device": "cpu", "precision": "fp32", "cores": os.cpu_count(), "channels_last": True}
    with tempfile.TemporaryDirectory(prefix="bench-whole-process-") as work:
        if args.odd_files:
            report = odd_files(spec, work, pythons)
        else:
            specs = {}
            for n in args.images:
                folder = os.path.join(args.data, f"images-{n}")
                specs[n] = {**spec, "input": folder, "images": ensure_images(folder, n), "images_count": n}
            report = throughput(specs, work, pythons)
    print(f"\n{os.cpu_count()} cores; {versions()}" + (f"; {daft_versions(daft_py)}" if daft_py else "") + "\n")
    print(report)


if __name__ == "__main__":
    main()
