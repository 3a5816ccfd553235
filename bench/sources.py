"""Every model source (`model.source`, issue 29) against a plain loop that calls the same library directly.

    .venv/bin/python bench/sources.py --images 3000                          # every source, ~15 min on 2 quiet cores
    .venv/bin/python bench/sources.py --images 1000 --only huggingface open_clip

Models are built here, offline, with seeded random weights, and kept under --models (reruns reuse them):
  timm         mobilenetv3_small_100, a state_dict and 1,000 labels;
  huggingface  a DeiT-tiny-like ViT (224 px, patch 16, hidden 192, 6 layers), save_pretrained + its processor;
  onnx         torchvision's mobilenet_v3_small, torch.onnx.export (dynamic batch, one file);
  torchscript  the same model, torch.jit.script   (model.source exported);
  pt2          the same model, torch.export .pt2  (model.source exported);
  open_clip    a ViT-B-32-like config at CPU size (224 px, patch 32, width 384, 6 layers; text 4 layers), a
               checkpoint, a vocabulary of 20 labels (zero-shot tagging).
For each, on the JPEGs of bench/images.py, batch 32, each a fresh process timed from exec to exit
(bench/whole_process.py's `run`: peak summed PSS of the tree):
  pipeline     `pipeline run JOB.yaml --input --output --batch-size` (the local executor, as a user runs it);
  loop         this file's `--role loop`: PIL open -> the library's own transform (timm create_transform, the
               Hugging Face image processor, torchvision transforms for onnx/exported, open_clip's preprocess)
               -> a batch -> the library's forward -> softmax and top-5 -> pyarrow ParquetWriter; one process,
               no DataLoader, the library's default threads;
  steady       the pipeline's N / (t(2N) - t(N)), as bench/throughput.py (start-up cancels out);
  bound        `--role bound`: CPU-s per image, one thread each, of the pipeline's decode+preprocess for this model
               and of the library's forward pass on a pre-decoded batch (the faster of contiguous and
               channels_last for torch); CPU bound = cores / their sum; and the model alone on all cores.
Each run waits for the machine to be quiet first and records the CPU that other processes took meanwhile
("other load", cores): a figure taken beside someone else's work says so. The table is printed and saved as
JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from typing import Callable

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

SOURCES = ("timm", "huggingface", "onnx", "torchscript", "pt2", "open_clip")
VOCABULARY = ["dog", "cat", "bird", "horse", "car", "bicycle", "boat", "airplane", "tree", "flower", "mountain",
              "beach", "building", "street", "person", "food", "book", "computer", "sky", "water"]
CLIP_CONFIG = {"embed_dim": 256,
               "vision_cfg": {"image_size": 224, "layers": 6, "width": 384, "patch_size": 32, "head_width": 64},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4}}
TOP_K = 5


# --- the models, built once -------------------------------------------------------------------------------

def build_models(folder: str, wanted: list[str]) -> dict[str, dict]:
    """{source: {"model": the job's model section, "files": what the loop loads}}, building what is missing."""
    os.makedirs(folder, exist_ok=True)
    labels = os.path.join(folder, "labels.txt")
    if not os.path.exists(labels):
        with open(labels, "w") as f:
            f.write("\n".join(f"class_{i:03d}" for i in range(1000)) + "\n")
    made = {}
    for source in wanted:
        made[source] = BUILDERS[source](folder, labels)
    return made


def _fresh(path: str) -> bool:
    return not os.path.exists(path)


def _timm(folder: str, labels: str) -> dict:
    name, checkpoint = "mobilenetv3_small_100", os.path.join(folder, "timm-mobilenetv3_small_100.pt")
    if _fresh(checkpoint):
        import timm
        import torch

        torch.manual_seed(0)
        torch.save(timm.create_model(name, pretrained=False, num_classes=1000).state_dict(), checkpoint)
    return {"model": {"source": "timm", "name": name, "weights": checkpoint, "labels": labels},
            "files": {"name": name, "checkpoint": checkpoint, "labels": labels}}


def _huggingface(folder: str, labels: str) -> dict:
    path = os.path.join(folder, "hf-vit-tiny6")
    if _fresh(os.path.join(path, "config.json")):
        import torch
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        torch.manual_seed(0)
        names = {i: f"class_{i:03d}" for i in range(1000)}
        config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=6,
                           num_attention_heads=3, intermediate_size=768, num_labels=1000, id2label=names,
                           label2id={v: k for k, v in names.items()})
        ViTForImageClassification(config).eval().save_pretrained(path)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path)
    return {"model": {"source": "huggingface", "name": path}, "files": {"folder": path}}


def _mobilenet():
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=1000).eval()


def _onnx(folder: str, labels: str) -> dict:
    path = os.path.join(folder, "mobilenet_v3_small.onnx")
    if _fresh(path):
        import torch
        from torch.export import Dim

        torch.onnx.export(_mobilenet(), (torch.randn(2, 3, 224, 224),), path, dynamic_shapes={"x": {0: Dim("batch")}},
                          external_data=False)
    return {"model": {"source": "onnx", "weights": path, "labels": labels}, "files": {"path": path, "labels": labels}}


def _torchscript(folder: str, labels: str) -> dict:
    path = os.path.join(folder, "mobilenet_v3_small.torchscript.pt")
    if _fresh(path):
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(_mobilenet()), path)
    return {"model": {"source": "exported", "weights": path, "labels": labels},
            "files": {"path": path, "labels": labels}}


def _pt2(folder: str, labels: str) -> dict:
    path = os.path.join(folder, "mobilenet_v3_small.pt2")
    if _fresh(path):
        import torch
        from torch.export import Dim

        program = torch.export.export(_mobilenet(), (torch.randn(2, 3, 224, 224),),
                                      dynamic_shapes={"x": {0: Dim("batch")}})
        torch.export.save(program, path)
    return {"model": {"source": "exported", "weights": path, "labels": labels},
            "files": {"path": path, "labels": labels}}


def _open_clip(folder: str, labels: str) -> dict:
    config, checkpoint = os.path.join(folder, "clip-vit-small.json"), os.path.join(folder, "clip-vit-small.pt")
    if _fresh(checkpoint):
        import open_clip
        import torch

        with open(config, "w") as f:
            json.dump(CLIP_CONFIG, f)
        open_clip.add_model_config(config)
        torch.manual_seed(0)
        torch.save(open_clip.create_model("clip-vit-small", pretrained=None).state_dict(), checkpoint)
    return {"model": {"source": "open_clip", "name": config, "pretrained": checkpoint, "labels": VOCABULARY},
            "files": {"config": config, "checkpoint": checkpoint, "vocabulary": VOCABULARY}}


BUILDERS = {"timm": _timm, "huggingface": _huggingface, "onnx": _onnx, "torchscript": _torchscript, "pt2": _pt2,
            "open_clip": _open_clip}


# --- the plain loop: each library as its own documentation uses it ------------------------------------------

class Library:
    """One source's model as a user loads it: `prepare(pil_images)` -> the batch its forward takes (its own
    transform), `forward(batch)` -> scores (N, classes) as a float tensor, `labels`, `activation`."""

    activation = "softmax"

    def prepare(self, images: list):
        import torch

        return torch.stack([self.transform(image) for image in images])


class TimmLibrary(Library):
    def __init__(self, files: dict, threads: int | None = None):
        import timm
        from timm.data import create_transform, resolve_data_config

        self.model = timm.create_model(files["name"], num_classes=1000, checkpoint_path=files["checkpoint"]).eval()
        self.transform = create_transform(**resolve_data_config({}, model=self.model))
        self.labels = read_lines(files["labels"])

    def forward(self, x):
        return self.model(x)


class HuggingFaceLibrary(Library):
    def __init__(self, files: dict, threads: int | None = None):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.processor = AutoImageProcessor.from_pretrained(files["folder"])
        self.model = AutoModelForImageClassification.from_pretrained(files["folder"]).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def prepare(self, images: list):
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def forward(self, x):
        return self.model(pixel_values=x).logits


def imagenet_transform():
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


class OnnxLibrary(Library):
    def __init__(self, files: dict, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(files["path"], sess_options=options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.transform = imagenet_transform()
        self.labels = read_lines(files["labels"])

    def forward(self, x):
        import torch

        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


class TorchScriptLibrary(Library):
    def __init__(self, files: dict, threads: int | None = None):
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(files["path"]).eval()
        self.transform = imagenet_transform()
        self.labels = read_lines(files["labels"])

    def forward(self, x):
        return self.model(x)


class Pt2Library(TorchScriptLibrary):
    def __init__(self, files: dict, threads: int | None = None):
        import torch

        self.model = torch.export.load(files["path"]).module()
        self.transform = imagenet_transform()
        self.labels = read_lines(files["labels"])


class OpenClipLibrary(Library):
    def __init__(self, files: dict, threads: int | None = None):
        import open_clip
        import torch

        open_clip.add_model_config(files["config"])
        name = os.path.splitext(os.path.basename(files["config"]))[0]
        self.model, _, self.transform = open_clip.create_model_and_transforms(name, pretrained=files["checkpoint"])
        self.model.eval()
        tokenizer = open_clip.get_tokenizer(name)
        self.labels = files["vocabulary"]
        with torch.inference_mode():
            self.text = self.model.encode_text(tokenizer([f"a photo of a {label}." for label in self.labels]),
                                               normalize=True)
        self.scale = self.model.logit_scale.exp()

    def forward(self, x):
        return self.scale * self.model.encode_image(x, normalize=True) @ self.text.T


LIBRARIES = {"timm": TimmLibrary, "huggingface": HuggingFaceLibrary, "onnx": OnnxLibrary,
             "torchscript": TorchScriptLibrary, "pt2": Pt2Library, "open_clip": OpenClipLibrary}


def read_lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().split()


def loop(spec: dict) -> None:
    """The plain loop, timed by the orchestrator from exec to exit: every image to one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    library = LIBRARIES[spec["source"]](spec["files"])
    labels = __import__("numpy").asarray(library.labels, dtype=object)
    k = min(TOP_K, len(labels))
    schema = pa.schema([("uri", pa.string()), ("label", pa.string()), ("score", pa.float32()),
                        ("topk_labels", pa.list_(pa.string())), ("topk_scores", pa.list_(pa.float32()))])
    os.makedirs(spec["output"], exist_ok=True)
    paths, b = spec["images"], spec["batch_size"]
    with pq.ParquetWriter(os.path.join(spec["output"], "part-0.parquet"), schema) as writer, torch.inference_mode():
        for start in range(0, len(paths), b):
            uris = paths[start:start + b]
            images = []
            for path in uris:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            scores = torch.softmax(library.forward(library.prepare(images)).float(), dim=1)
            top = scores.topk(k, dim=1)
            values, indexes = top.values.numpy(), top.indices.numpy()
            writer.write_table(pa.table({"uri": uris, "label": labels[indexes[:, 0]], "score": values[:, 0],
                                         "topk_labels": [list(labels[i]) for i in indexes],
                                         "topk_scores": [list(v) for v in values]}, schema=schema))


# --- the bound ------------------------------------------------------------------------------------------------

def bound(spec: dict) -> dict:
    """CPU-s per image (one thread) of the pipeline's decode+preprocess for this model and of the library's forward
    pass; the CPU bound; the model alone on every core; and the loop's own transform, for comparison."""
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.decode.image import Decoder
    from pipeline.io.storage import Storage
    from pipeline.job.config import ModelConfig
    from pipeline.models.resolve import resolve_model

    cores = spec["cores"]
    torch.set_num_threads(1)
    preprocess = resolve_model(ModelConfig(**spec["model"]), Storage.from_env()).preprocess
    paths = spec["images"][:256]
    data = [open(p, "rb").read() for p in paths]
    batch = {"uri": np.array(paths, dtype=object), "bytes": np.array(data, dtype=object),
             "error": np.full(len(paths), None, dtype=object), "error_type": np.full(len(paths), None, dtype=object)}
    started = time.process_time()
    Decoder(preprocess, 10**9)(batch)
    decode_s = (time.process_time() - started) / len(paths)

    library = LIBRARIES[spec["source"]](spec["files"], threads=1)
    images = []
    for path in paths[:64]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    started = time.process_time()
    for i in range(0, 64, 32):
        x = library.prepare(images[i:i + 32])
    transform_s = (time.process_time() - started) / 64
    b = spec["batch_size"]
    x = x.repeat((b + len(x) - 1) // len(x), 1, 1, 1)[:b].contiguous()

    def per_image(clock, batch_x, at_least_s: float = 3.0) -> float:
        with torch.inference_mode():
            library.forward(batch_x)
            wall, started, rounds = time.perf_counter(), clock(), 0
            while rounds < 3 or time.perf_counter() - wall < at_least_s:
                library.forward(batch_x)
                rounds += 1
            return (clock() - started) / (rounds * b)

    formats = {"contiguous": x}
    if spec["source"] != "onnx":  # onnxruntime takes contiguous NCHW
        formats["channels_last"] = x.contiguous(memory_format=torch.channels_last)
        if hasattr(library, "model") and isinstance(library.model, torch.nn.Module):
            library.model.to(memory_format=torch.channels_last)
    forward = {name: per_image(time.process_time, tensor) for name, tensor in formats.items()}
    best = min(forward, key=forward.get)
    torch.set_num_threads(cores)
    if spec["source"] == "onnx":
        library = LIBRARIES["onnx"](spec["files"], threads=cores)
    model_only = 1 / per_image(time.perf_counter, formats[best])
    return {"decode_cpu_s": decode_s, "loop_transform_cpu_s": transform_s, "forward_cpu_s": forward[best],
            "forward_by_format": forward, "format": best, "cores": cores,
            "cpu_bound_images_s": cores / (decode_s + forward[best]), "model_only_images_s": model_only}


# --- the orchestrator ------------------------------------------------------------------------------------------

def cpu_busy() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat, all cores)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_quiet(limit_s: float, threshold: float = 0.3) -> float:
    """Wait (at most limit_s) until other processes take under `threshold` cores over 2 s; their load then."""
    deadline = time.monotonic() + limit_s
    while True:
        busy, started = cpu_busy(), time.monotonic()
        time.sleep(2)
        load = (cpu_busy() - busy) / (time.monotonic() - started)
        if load < threshold or time.monotonic() > deadline:
            return load
        print(f"  waiting: other processes take {load:.1f} cores", flush=True)


OVERLAP = 0.25  # cores taken by other processes during a run above which it is run again
RETRIES = 4


def measured(argv: list[str], log: str, quiet_s: float, clean: Callable[[], object] = lambda: None) -> dict:
    """whole_process.run (exec to exit, peak PSS) plus the cores other processes took meanwhile; a run that
    overlapped other work is run again (up to RETRIES times; the quietest is kept and its load reported)."""
    from whole_process import last_error, run

    tries = []
    while len(tries) < RETRIES and (not tries or tries[-1]["other_load"] > OVERLAP):
        clean()
        wait_quiet(quiet_s)
        busy, ours, started = cpu_busy(), children_cpu(), time.monotonic()
        result = run(argv, log)
        elapsed = time.monotonic() - started
        result.update(other_load=max(0.0, (cpu_busy() - busy) - (children_cpu() - ours)) / elapsed,
                      loadavg=os.getloadavg()[0], tries=len(tries) + 1)
        if result["code"] != 0:
            raise SystemExit(f"{argv[:3]} failed (exit {result['code']}): {last_error(log)}; log {log}")
        if result["other_load"] > OVERLAP:
            print(f"  overlapped {result['other_load']:.2f} cores of other work ({result['seconds']:.1f}s); again",
                  flush=True)
        tries.append(result)
    return min(tries, key=lambda r: r["other_load"])


def role_argv(role: str, spec: dict, work: str, name: str) -> tuple[list[str], str]:
    path = os.path.join(work, f"{name}.spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    result = os.path.join(work, f"{name}.result.json")
    return [sys.executable, os.path.abspath(__file__), "--role", role, "--spec", path, "--result", result], result


def pipeline_argv(job: str, spec: dict) -> list[str]:
    cli = os.path.join(os.path.dirname(sys.executable), "pipeline")
    return [cli, "run", job, "--input", spec["input"], "--output", spec["output"], "--batch-size",
            str(spec["batch_size"])]


def agreement(pipeline_out: str, loop_out: str) -> float:
    """Share of images whose top-1 label is the same in both outputs (random weights: near-ties are common)."""
    from whole_process import output_rows

    ours = {row["uri"].removeprefix("file://"): row["label"] for row in output_rows(pipeline_out)}
    theirs = {row["uri"]: row["label"] for row in output_rows(loop_out)}
    same = sum(1 for uri, label in theirs.items() if ours.get(uri) == label)
    return same / max(1, len(theirs))


def bench_source(source: str, built: dict, args, work: str, paths: dict[int, list[str]]) -> dict:
    from whole_process import first_row_s, output_rows

    n, quiet = args.images, args.quiet_wait
    job = os.path.join(work, f"{source}.job.yaml")
    with open(job, "w") as f:
        json.dump({"model": built["model"]}, f)  # YAML reads JSON
    base = {"source": source, "model": built["model"], "files": built["files"], "batch_size": args.batch_size,
            "cores": os.cpu_count()}
    result: dict = {"source": source, "model": built["model"]}
    runs = {}
    for size in (n, 2 * n) if args.steady else (n,):
        spec = {**base, "input": os.path.join(args.data, f"images-{size}"), "images": paths[size],
                "output": os.path.join(work, f"{source}-pipeline-{size}")}
        runs[size] = measured(pipeline_argv(job, spec), os.path.join(work, f"{source}-pipeline-{size}.log"), quiet,
                              clean=lambda: shutil.rmtree(spec["output"], ignore_errors=True))
        rows = len(output_rows(spec["output"]))
        if rows != size:
            raise SystemExit(f"pipeline wrote {rows} rows for {size} images ({source})")
        runs[size]["first_row_s"] = first_row_s(spec["output"])
        print(f"{source} pipeline {size}: {runs[size]['seconds']:.1f}s, {runs[size]['pss_mib']:.0f} MiB, "
              f"other load {runs[size]['other_load']:.2f} cores", flush=True)
        if size == n:
            loop_spec = {**spec, "output": os.path.join(work, f"{source}-loop-{size}")}
            argv, _ = role_argv("loop", loop_spec, work, f"{source}-loop")
            result["loop"] = measured(argv, os.path.join(work, f"{source}-loop.log"), quiet,
                                      clean=lambda: shutil.rmtree(loop_spec["output"], ignore_errors=True))
            rows = len(output_rows(loop_spec["output"]))
            if rows != size:
                raise SystemExit(f"the loop wrote {rows} rows for {size} images ({source})")
            result["top1_agreement"] = agreement(spec["output"], loop_spec["output"])
            print(f"{source} loop {size}: {result['loop']['seconds']:.1f}s, {result['loop']['pss_mib']:.0f} MiB, "
                  f"other load {result['loop']['other_load']:.2f} cores", flush=True)
    result["pipeline"] = runs[n]
    if args.steady:
        result["pipeline_2n"] = runs[2 * n]
        result["steady_images_s"] = n / max(1e-9, runs[2 * n]["seconds"] - runs[n]["seconds"])
    argv, result_path = role_argv("bound", {**base, "images": paths[n]}, work, f"{source}-bound")
    for attempt in range(RETRIES):
        wait_quiet(quiet)
        busy, ours, started = cpu_busy(), children_cpu(), time.monotonic()
        code = subprocess.run(argv, cwd=ROOT, env=os.environ).returncode
        if code != 0:
            raise SystemExit(f"{source} bound failed (exit {code})")
        with open(result_path) as f:
            bound_result = json.load(f)
        bound_result["other_load"] = (max(0.0, (cpu_busy() - busy) - (children_cpu() - ours))
                                      / (time.monotonic() - started))
        if "bound" not in result or bound_result["other_load"] < result["bound"]["other_load"]:
            result["bound"] = bound_result
        if bound_result["other_load"] <= OVERLAP:
            break
        print(f"  bound overlapped {bound_result['other_load']:.2f} cores of other work; again", flush=True)
    print(f"{source} bound: {json.dumps(result['bound'])}", flush=True)
    return result


def table(results: list[dict], n: int) -> str:
    lines = [f"| source (model) | pipeline s ({n:,}) | loop s ({n:,}) | pipeline ÷ loop speed | pipeline PSS MiB | "
             "loop PSS MiB | steady images/s | CPU bound | of bound | model alone, all cores | "
             "decode + forward CPU-ms | other load (cores) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p, loop_run, b = r["pipeline"], r["loop"], r["bound"]
        steady = r.get("steady_images_s")
        others = [p["other_load"], loop_run["other_load"], b["other_load"]] + (
            [r["pipeline_2n"]["other_load"]] if "pipeline_2n" in r else [])
        lines.append(
            f"| {r['source']} ({MODEL_NAMES[r['source']]}) | {p['seconds']:.1f} | {loop_run['seconds']:.1f} | "
            f"**{loop_run['seconds'] / p['seconds']:.2f}x** | {p['pss_mib']:.0f} | {loop_run['pss_mib']:.0f} | "
            + (f"{steady:.1f} | {b['cpu_bound_images_s']:.1f} | **{steady / b['cpu_bound_images_s']:.2f}** | "
               if steady else f"- | {b['cpu_bound_images_s']:.1f} | - | ")
            + f"{b['model_only_images_s']:.1f} | {b['decode_cpu_s'] * 1e3:.2f} + {b['forward_cpu_s'] * 1e3:.2f} | "
            f"{max(others):.2f} |")
    return "\n".join(lines)


MODEL_NAMES = {"timm": "mobilenetv3_small_100", "huggingface": "ViT 192x6, 224/16", "onnx": "mobilenet_v3_small",
               "torchscript": "mobilenet_v3_small", "pt2": "mobilenet_v3_small", "open_clip": "ViT 384x6, 224/32"}


def versions() -> str:
    import onnxruntime
    import open_clip
    import timm
    import transformers
    from throughput import versions as base

    return (f"{base()}, timm {timm.__version__}, transformers {transformers.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, open_clip {open_clip.__version__}")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="N: whole process on N; steady from N and 2N")
    parser.add_argument("--only", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steady", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the pipeline on 2N images for its steady rate")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "pipeline-bench"),
                        help="where generated images are kept between runs")
    parser.add_argument("--models", default=None, help="where built models are kept (default DATA/sources)")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="seconds to wait, before each run, for other processes to leave the cores")
    parser.add_argument("--results", default=os.path.join(BENCH, "results"))
    parser.add_argument("--role", choices=["loop", "bound"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"  # no hub look-ups: every model here is local (docs: FACTS)

    if args.role:
        with open(args.spec) as f:
            spec = json.load(f)
        outcome = loop(spec) if args.role == "loop" else bound(spec)
        if args.result:
            with open(args.result, "w") as f:
                json.dump(outcome, f)
        return

    from images import ensure_images

    built = build_models(args.models or os.path.join(args.data, "sources"), args.only)
    sizes = (args.images, 2 * args.images) if args.steady else (args.images,)
    paths = {n: ensure_images(os.path.join(args.data, f"images-{n}"), n) for n in sizes}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as work:
        for source in args.only:
            results.append(bench_source(source, built[source], args, work, paths))
    machine = f"{os.cpu_count()} cores ({cpu_model()}), {platform.python_version()}; {versions()}"
    report = table(results, args.images)
    print(f"\n{date.today().isoformat()}, {machine}\n\n{report}")
    os.makedirs(args.results, exist_ok=True)
    subset = "" if args.only == list(SOURCES) else "-" + "-".join(args.only)
    out = os.path.join(args.results, f"sources-{date.today().isoformat()}-{args.images}{subset}.json")
    with open(out, "w") as f:
        json.dump({"date": date.today().isoformat(), "command": " ".join([".venv/bin/python", "bench/sources.py"]
                                                                         + sys.argv[1:]),
                   "machine": machine, "images": args.images, "batch_size": args.batch_size, "results": results,
                   "table": report}, f, indent=1, default=str)
    print(f"\nsaved {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
