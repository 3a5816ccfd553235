"""Throughput against the hardware and the peers: one command, a table at the end.

    .venv/bin/python bench/throughput.py                                   # this machine: CPU, 2,000 JPEGs
    .venv/bin/python bench/throughput.py --device cuda --images 50000 --models resnet50 resnet18 --precision bf16

For each model, on the same generated JPEGs (bench/images.py), checkpoint, batch size and machine:
  bounds      CPU-s/image for decode+preprocess and for the forward pass, one thread each (the CPU bound is
              cores / their sum), and the model alone on pre-decoded tensors already on the device;
  ray_recipe  peer 1, Ray Data's documented recipe: read_images -> map (torchvision transforms) ->
              map_batches (predictor class) -> write_parquet;
  torch_loop  peer 2, DataLoader(num_workers=cores) -> model -> pyarrow ParquetWriter;
  daft        peer 3, Daft 0.7 on its native runner (bench/daft_contender.py), under its own venv
              (bench/daft-venv.sh, --daft-python): from_glob_path -> download -> decode_image -> the same
              torchvision preprocessing -> a model class UDF, one instance and one torch thread per core;
              daft_ray, the same on Daft's Ray runner, runs only when named in --only;
  pipeline    this pipeline, `run_job` from local files to committed Parquet (and, with --s3, from the local
              S3 server to S3).
Each contender runs in its own process, on N and then on 2N images; its clock starts once its runtime is
up (Ray's start is not counted, for the peers or for us). "End to end" is N / time for N; "steady" is
N / (time for 2N - time for N), which cancels the fixed costs (workers starting, models loading) that a
nightly job of millions pays once. A watcher samples the resident memory (anonymous + file pages, not the
shared object store) of every process in the contender's tree, and its CPU time per process title.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

from images import ensure_images  # noqa: E402


class MemoryWatch:
    """Peak RSS (anon + file, MiB) of a process tree, split into the driver, workers and Ray's own daemons;
    with `pss`, also the peak of the tree's summed PSS (shared pages split between their sharers, so the
    sum counts each page once: what the tree costs the machine)."""

    def __init__(self, pid: int, interval: float = 0.2, pss: bool = False):
        self.pid, self.interval, self.pss = pid, interval, pss
        self.peaks: dict[int, tuple[str, float]] = {}
        self.pss_peak_mib = 0.0
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (process title, CPU-seconds so far)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemoryWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        # The watcher must not take the cores it measures: this thread alone runs at the lowest priority (Ray
        # runs its workers at nice 15, so an ordinary-priority watcher would preempt them). A PSS sweep reads
        # every process's smaps (~45 ms for Ray's ~70 processes here), so it runs once a second.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        last_pss = 0.0
        while not self.done.is_set():
            tree = self._tree()
            for pid in tree:
                sample = _rss_mib(pid)
                if sample is not None:
                    role = self._role(pid)
                    self.peaks[pid] = (role, max(sample, self.peaks.get(pid, (role, 0.0))[1]))
                    self.cpu[pid] = _cpu_seconds(pid) or self.cpu.get(pid, ("", 0.0))
            if self.pss and time.monotonic() - last_pss >= 1.0:
                last_pss = time.monotonic()
                self.pss_peak_mib = max(self.pss_peak_mib, sum(_pss_mib(pid) for pid in tree))
            self.done.wait(self.interval)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    def _role(self, pid: int) -> str:
        if pid == self.pid:
            return "driver"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "other"
        if cmdline.startswith("ray::") or "default_worker.py" in cmdline or "multiprocessing" in cmdline:
            return "worker"
        return "ray daemons" if "ray" in cmdline else "worker"

    def cpu_by_title(self) -> dict[str, float]:
        """CPU-seconds spent by each kind of process (Ray's process titles say which stage a worker runs)."""
        totals: dict[str, float] = {}
        for title, seconds in self.cpu.values():
            totals[title] = totals.get(title, 0.0) + seconds
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def peak(self, role: str) -> float:
        return max((mib for r, mib in self.peaks.values() if r == role), default=0.0)


def _cpu_seconds(pid: int) -> tuple[str, float] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    title = title if title.startswith("ray::") else os.path.basename(title) or stat.split("(")[1].split(")")[0]
    return title[:60], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return (int(fields["RssAnon"].split()[0]) + int(fields["RssFile"].split()[0])) / 1024
    except (OSError, KeyError, ValueError):
        return None


def _pss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0  # gone, or a kernel thread


class GpuWatch:
    """Mean GPU utilisation while a contender runs (nvidia-smi sampled every 200 ms); None without a GPU."""

    def __init__(self, enabled: bool):
        self.proc = None
        self.samples: list[float] = []
        if enabled and shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,"
                                          "nounits", "-lms", "200"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        busy = [s for s in self.samples]
        return sum(busy) / len(busy) if busy else None


def make_model(model: str, folder: str) -> tuple[str, str]:
    """A seeded, randomly initialised 1,000-class checkpoint and its labels: no downloads, same cost."""
    import torch
    import torchvision

    os.makedirs(folder, exist_ok=True)
    checkpoint, labels = os.path.join(folder, f"{model}.pt"), os.path.join(folder, "labels.txt")
    if not os.path.exists(checkpoint):
        torch.manual_seed(0)
        torch.save(getattr(torchvision.models, model)(num_classes=1000).state_dict(), checkpoint)
    with open(labels, "w") as f:
        f.write("\n".join(f"class_{i:03d}" for i in range(1000)) + "\n")
    return checkpoint, labels


def contender_argv(name: str, spec_path: str, result_path: str, python: str = sys.executable) -> list[str]:
    """The command that runs one contender: Daft's under its own venv's python (bench/daft_contender.py)."""
    script = "daft_contender.py" if name.startswith("daft") else "contenders.py"
    return [python, os.path.join(BENCH, script), name, spec_path, result_path]


def run_contender(name: str, spec: dict, work: str, env: dict | None = None, python: str = sys.executable) -> dict:
    spec_path, result_path = os.path.join(work, f"{name}.spec.json"), os.path.join(work, f"{name}.result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if os.path.exists(result_path):
        os.remove(result_path)
    gpu = GpuWatch(spec["device"] == "cuda")
    time.sleep(2)  # let the previous contender's Ray processes wind down
    proc = subprocess.Popen(contender_argv(name, spec_path, result_path, python),
                            env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}, cwd=ROOT)
    with MemoryWatch(proc.pid) as memory:
        code = proc.wait()
    utilisation = gpu.stop()
    if code != 0 or not os.path.exists(result_path):
        raise SystemExit(f"{name} failed (exit {code})")
    with open(result_path) as f:
        result = json.load(f)
    result.update(driver_mib=memory.peak("driver"), worker_mib=memory.peak("worker"), gpu_util=utilisation,
                  cpu_seconds=memory.cpu_by_title())
    return result


def best_bounds(first: dict, second: dict) -> dict:
    best = {**first, "decode_cpu_s": min(first["decode_cpu_s"], second["decode_cpu_s"]),
            "model_only_images_s": max(first["model_only_images_s"], second["model_only_images_s"])}
    if "forward_cpu_s" in first:
        best["forward_cpu_s"] = min(first["forward_cpu_s"], second["forward_cpu_s"])
        best["cpu_bound_images_s"] = first["cores"] / (best["decode_cpu_s"] + best["forward_cpu_s"])
    return best


def upload(folder: str, paths: list[str], bucket: str, prefix: str) -> None:
    from pipeline.io.storage import Storage

    client = Storage.from_env().s3_client
    for name in (bucket, f"{bucket}-out"):
        if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket=name)

    def put(path: str) -> None:
        with open(path, "rb") as f:
            client.put_object(Bucket=bucket, Key=prefix + os.path.relpath(path, folder), Body=f.read())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, paths))


def table(model: str, spec: dict, results: dict[str, dict]) -> str:
    b = results["bounds"]
    cpu = spec["device"] == "cpu"
    bound = b["cpu_bound_images_s"] if cpu else b["model_only_images_s"]
    steady = {name: r["steady"] for name, r in results.items() if name != "bounds"}
    n = spec["images_count"]
    lines = [f"### {model}, {n:,} and {2 * n:,} JPEGs 500x375 q90, batch {spec['batch_size']}, "
             f"{spec['device']} {spec['precision']}", "",
             f"- decode+preprocess {b['decode_cpu_s'] * 1e3:.2f} CPU-ms/image"
             + (f"; forward (channels_last, one thread) {b['forward_cpu_s'] * 1e3:.2f} CPU-ms/image; CPU bound = "
                f"{b['cores']} cores / {(b['decode_cpu_s'] + b['forward_cpu_s']) * 1e3:.2f} ms = "
                f"**{bound:.1f} images/s**" if cpu else ""),
             f"- model-only bound (pre-decoded tensors on the device, {'all cores' if cpu else 'the GPU'}): "
             f"{b['model_only_images_s']:.1f} images/s", "",
             "| contender | steady images/s | of the " + ("CPU" if cpu else "model-only") + " bound | vs peer 1 | "
             f"vs peer 2 | end to end images/s ({n:,}) | first row s | driver MiB | worker MiB (max) | spilled MiB"
             + ("" if cpu else " | GPU util %") + " |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("" if cpu else "---:|")]
    names = {"ray_recipe": "peer 1: Ray Data recipe", "torch_loop": "peer 2: DataLoader loop",
             "daft": "peer 3: Daft 0.7 (native)", "daft_ray": "peer 3: Daft 0.7 (Ray runner)",
             "pipeline": "this pipeline (local files)", "pipeline_s3": "this pipeline (S3 server -> S3)"}
    for name, label in names.items():
        if name not in results:
            continue
        r = results[name]
        first = f"{r['first_row_s']:.1f}" if r.get("first_row_s") is not None else "-"
        spilled = f"{r['spilled_mib']:.0f}" if "spilled_mib" in r else "-"
        versus = [f"{steady[name] / steady[peer]:.2f}x" if peer in steady else "-"
                  for peer in ("ray_recipe", "torch_loop")]
        row = (f"| {label} | {steady[name]:.1f} | {steady[name] / bound:.2f} | {versus[0]} | {versus[1]} | "
               f"{r['end_to_end']:.1f} | {first} | {r['driver_mib']:.0f} | {r['worker_mib']:.0f} | {spilled} |")
        if not cpu:
            row += f" {r['gpu_util']:.0f} |" if r.get("gpu_util") is not None else " - |"
        lines.append(row)
    return "\n".join(lines)


def versions() -> str:
    import PIL
    import pyarrow
    import ray
    import torch
    import torchvision

    return (f"Python {platform.python_version()}, Ray {ray.__version__}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, pyarrow {pyarrow.__version__}, Pillow {PIL.__version__}")


def daft_python(path: str) -> str | None:
    """The Daft venv's python (relative paths from the repo root), or None with a note when it is missing."""
    path = os.path.join(ROOT, path)
    if os.access(path, os.X_OK):
        return path
    print(f"note: no Daft venv at {path} (make it with bench/daft-venv.sh); skipping peer 3, Daft", flush=True)
    return None


def daft_versions(python: str) -> str:
    probe = ("import daft, pyarrow, ray, torch, torchvision, PIL; print(f'Daft {daft.__version__}, Ray "
             "{ray.__version__}, pyarrow {pyarrow.__version__}, torch {torch.__version__}, torchvision "
             "{torchvision.__version__}, Pillow {PIL.__version__}')")
    return "Daft's venv: " + subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_small", "resnet18"])
    parser.add_argument("--images", type=int, default=2000, help="N: each contender runs on N, then 2N images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--s3", action=argparse.BooleanOptionalAction, default=None,
                        help="also run this pipeline from the local S3 server to S3 (default: on CPU machines)")
    parser.add_argument("--only", nargs="+", help="run only these contenders (bounds always runs): ray_recipe, "
                        "torch_loop, daft, pipeline, pipeline_s3, and daft_ray (Daft's Ray runner: only when named)")
    parser.add_argument("--daft-python", default=os.path.join(".venv-daft", "bin", "python"),
                        help="the python of Daft's own venv (bench/daft-venv.sh); Daft is skipped without it")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "pipeline-bench"),
                        help="where generated images and checkpoints are kept between runs")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="the pipeline's executor (`pipeline run`'s default on one machine: local)")
    args = parser.parse_args()
    if args.s3 is None:
        args.s3 = args.device == "cpu"
    daft_py = daft_python(args.daft_python) if not args.only or {"daft", "daft_ray"} & set(args.only) else None

    sizes = (args.images, 2 * args.images)
    folders = {n: os.path.join(args.data, f"images-{n}") for n in sizes}
    paths = {n: ensure_images(folders[n], n) for n in sizes}
    work = tempfile.mkdtemp(prefix="bench-throughput-")
    tables = []
    server = None
    if args.s3:
        from pipeline.dev.local_s3 import LocalS3Server, use_server

        server = LocalS3Server().__enter__()
        use_server(server)
        for n in sizes:
            upload(folders[n], paths[n], "bench", f"images-{n}/")
    try:
        for model in args.models:
            checkpoint, labels = make_model(model, args.data)
            spec = {"model": model, "checkpoint": checkpoint, "labels": labels, "batch_size": args.batch_size,
                    "device": args.device, "precision": args.precision, "cores": os.cpu_count(),
                    "channels_last": True, "executor": args.executor}
            sized = {n: {**spec, "images": paths[n], "images_count": n, "input": folders[n]} for n in sizes}
            wanted = (["ray_recipe", "torch_loop"] + (["daft", "daft_ray"] if daft_py else []) + ["pipeline"]
                      + (["pipeline_s3"] if args.s3 else []))
            results = {"bounds": run_contender("bounds", sized[sizes[0]], work)}
            for name in wanted:
                if name in (args.only or set(wanted) - {"daft_ray"}):
                    python = daft_py if name.startswith("daft") else sys.executable
                    results[name] = measure(name, model, sized, work, python=python)
            # The machine is shared and noisy: the bounds are measured again at the end and the best kept.
            results["bounds"] = best_bounds(results["bounds"], run_contender("bounds", sized[sizes[0]], work))
            tables.append(table(model, sized[sizes[0]], results))
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{date.today().isoformat()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"{versions()}" + (f"; {daft_versions(daft_py)}" if daft_py else "") + "\n")
    print("\n\n".join(tables))


def measure(name: str, model: str, sized: dict[int, dict], work: str, python: str = sys.executable) -> dict:
    """Runs on N and on 2N images: end to end on N, and steady state from the difference, which cancels
    every fixed cost (workers starting, models loading) the same way for every contender."""
    runs = {}
    for n, spec in sized.items():
        run_spec = {**spec, "output": os.path.join(work, f"out-{model}-{name}-{n}")}
        if name == "pipeline_s3":
            run_spec.update(input=f"s3://bench/images-{n}/", output=f"s3://bench-out/{model}-{n}/")
        runs[n] = run_contender("pipeline" if name == "pipeline_s3" else name, run_spec, work, python=python)
        if runs[n]["images"] != n:
            raise SystemExit(f"{name} wrote {runs[n]['images']} rows for {n} images")
        print(f"{model} {name}: {n} images in {runs[n]['seconds']:.1f}s; CPU-seconds by process: "
              + ", ".join(f"{title} {cpu:.1f}" for title, cpu in list(runs[n]["cpu_seconds"].items())[:8]),
              flush=True)
    small, large = sizes = sorted(runs)
    result = dict(runs[large])
    result.update(end_to_end=small / runs[small]["seconds"], first_row_s=runs[small]["first_row_s"],
                  steady=(large - small) / max(1e-9, runs[large]["seconds"] - runs[small]["seconds"]))
    return result


if __name__ == "__main__":
    main()
