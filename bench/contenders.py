"""The contenders of the throughput benchmark, each run in its own process by bench/throughput.py.

    python bench/contenders.py NAME SPEC_JSON RESULT_JSON

NAME is one of: bounds, ray_recipe, torch_loop, pipeline. Every contender gets the same images, model
checkpoint, batch size and device from SPEC_JSON, starts its clock once its runtime (Ray) is up, and writes
{images, seconds, first_row_s, ...} to RESULT_JSON. The orchestrator watches its process tree's memory.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.decode.image import Decoder, Preprocess  # noqa: E402
from pipeline.io.storage import Storage  # noqa: E402

from first_file import FirstFile  # noqa: E402

IMAGENET = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def load_model(spec: dict, device: torch.device) -> torch.nn.Module:
    model = getattr(torchvision.models, spec["model"])(num_classes=len(read_labels(spec)))
    model.load_state_dict(torch.load(spec["checkpoint"], weights_only=True))
    return model.eval().to(device)


def read_labels(spec: dict) -> list[str]:
    with open(spec["labels"]) as f:
        return f.read().split()


def autocast(spec: dict, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"])
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype is not None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- bounds ------------------------------------------------------------------------------------------------

def bounds(spec: dict) -> dict:
    """CPU-seconds per image for decode+preprocess and for the forward pass (one thread each), and the
    model alone on pre-decoded tensors already on the device, using every core (or the GPU)."""
    paths = spec["images"][: min(len(spec["images"]), 512)]
    data = [open(p, "rb").read() for p in paths]
    decoder = Decoder(IMAGENET, 10**9)
    batch = {"uri": np.array(paths, dtype=object), "bytes": np.array(data, dtype=object),
             "error": np.full(len(paths), None, dtype=object), "error_type": np.full(len(paths), None, dtype=object)}
    started = time.process_time()
    pixels = decoder(batch)["pixels"]
    decode_s = (time.process_time() - started) / len(paths)

    device = torch.device(spec["device"])
    model = load_model(spec, device)
    memory_format = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    b = spec["batch_size"]
    x = torch.from_numpy(np.resize(pixels, (b, *pixels.shape[1:]))).permute(0, 3, 1, 2).to(device).float().div(255)
    x = x.contiguous(memory_format=memory_format)

    def forward_seconds(clock, at_least_s: float = 3.0) -> float:
        """Per image, over whole batches for at least `at_least_s` of wall time after a warm-up batch."""
        with torch.inference_mode(), autocast(spec, device):
            model(x)
            sync(device)
            wall, started, rounds = time.perf_counter(), clock(), 0
            while rounds < 3 or time.perf_counter() - wall < at_least_s:
                model(x)
                rounds += 1
            sync(device)
            return (clock() - started) / (rounds * b)

    result = {"decode_cpu_s": decode_s, "cores": spec["cores"]}
    if device.type == "cpu":
        torch.set_num_threads(1)
        result["forward_cpu_s"] = forward_seconds(time.process_time)
        result["cpu_bound_images_s"] = spec["cores"] / (decode_s + result["forward_cpu_s"])
    torch.set_num_threads(spec["cores"])
    result["model_only_images_s"] = 1 / forward_seconds(time.perf_counter)
    return result


# --- peer 1: Ray Data's documented recipe ------------------------------------------------------------------

class RecipeClassifier:
    """The predictor class of Ray's 'Image Classification Batch Inference with PyTorch' example."""

    def __init__(self, spec: dict):
        self.device = torch.device(spec["device"])
        self.model = load_model(spec, self.device)
        self.labels = read_labels(spec)
        self.spec = spec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.as_tensor(batch["transformed_image"], device=self.device)
        with torch.inference_mode(), autocast(self.spec, self.device):
            prediction = self.model(images)
            predicted = prediction.argmax(dim=1).cpu().numpy()
        return {"path": batch["path"], "predicted_label": [self.labels[i] for i in predicted]}


def ray_recipe(spec: dict) -> dict:
    import ray
    from torchvision import transforms

    ray.init(num_cpus=spec["cores"], include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    transform = transforms.Compose([transforms.ToTensor(), transforms.Resize(256), transforms.CenterCrop(224),
                                    transforms.Normalize(IMAGENET.mean, IMAGENET.std)])

    def preprocess_image(row: dict) -> dict:
        return {"path": row["path"], "transformed_image": transform(row["image"]).numpy()}

    output = spec["output"]
    first = FirstFile(lambda: any(name.endswith(".parquet") for name in os.listdir(output))
                      if os.path.isdir(output) else False)
    started = time.monotonic()
    first.start(started)
    ds = ray.data.read_images(spec["input"], mode="RGB", include_paths=True)
    ds = ds.map(preprocess_image)
    ds = ds.map_batches(RecipeClassifier, fn_constructor_kwargs={"spec": spec}, compute=ray.data.ActorPoolStrategy(size=1),
                        batch_size=spec["batch_size"], num_gpus=1 if spec["device"] == "cuda" else 0)
    ds.write_parquet(output)
    seconds = time.monotonic() - started
    return {"images": pq.read_table(output).num_rows, "seconds": seconds, "first_row_s": first.stop(),
            "spilled_mib": spilled_mib()}


# --- peer 2: a hand-written PyTorch loop --------------------------------------------------------------------

class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[str]):
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                             transforms.ToTensor(),
                                             transforms.Normalize(IMAGENET.mean, IMAGENET.std)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), self.paths[i]


def torch_loop(spec: dict) -> dict:
    device = torch.device(spec["device"])
    started = time.monotonic()
    loader = torch.utils.data.DataLoader(ImageFiles(spec["images"]), batch_size=spec["batch_size"],
                                         num_workers=spec["cores"], pin_memory=device.type == "cuda")
    model = load_model(spec, device)
    labels = np.asarray(read_labels(spec), dtype=object)
    schema = pa.schema([("uri", pa.string()), ("label", pa.string()), ("score", pa.float32())])
    path = os.path.join(spec["output"], "part-0.parquet")
    os.makedirs(spec["output"], exist_ok=True)
    first_row_s = None
    with pq.ParquetWriter(path, schema) as writer, torch.inference_mode():
        for images, paths in loader:
            with autocast(spec, device):
                logits = model(images.to(device, non_blocking=True))
            top = torch.softmax(logits.float(), dim=1).max(dim=1)
            writer.write_table(pa.table({"uri": list(paths), "label": labels[top.indices.cpu().numpy()],
                                         "score": top.values.cpu().numpy()}, schema=schema))
            first_row_s = first_row_s or time.monotonic() - started
    return {"images": pq.read_table(path).num_rows, "seconds": time.monotonic() - started,
            "first_row_s": first_row_s}


# --- this pipeline ------------------------------------------------------------------------------------------

def pipeline(spec: dict) -> dict:
    import io

    from pipeline.job.config import load_job
    from pipeline.local.executor import run_locally
    from pipeline.ray.executor import run_on_ray
    from pipeline.ray.session import start_ray

    cfg = load_job(None, {"input": spec["input"], "output": spec["output"], "model": spec["model"],
                          "weights": spec["checkpoint"], "labels": spec["labels"],
                          "batch_size": spec["batch_size"]})
    cfg.compute.precision = spec["precision"]
    for field, value in spec.get("model_settings", {}).items():  # task, outputs, detection (bench/tasks.py)
        setattr(cfg.model, field, value)
    cfg = cfg.model_validate(cfg.model_dump())
    local = spec.get("executor", "local") == "local"
    if not local:
        start_ray(None)
    storage = Storage.from_env()
    staging = spec["output"].rstrip("/") + "/_staging/"
    first = FirstFile(lambda: any(o.uri.endswith(".staged") for page in storage.list_pages(staging) for o in page))
    started = time.monotonic()
    first.start(started)
    summary = (run_locally if local else run_on_ray)(cfg, out=io.StringIO())
    seconds = time.monotonic() - started
    return {"images": summary.committed_rows, "seconds": seconds, "first_row_s": first.stop(),
            "spilled_mib": 0.0 if local else spilled_mib()}


# --- a detector's own bound (bench/tasks.py) ------------------------------------------------------------

def detector_bound(spec: dict) -> dict:
    """CPU-seconds per image, one thread: decode at full size (Pillow) and the detector's forward pass on it."""
    torch.set_num_threads(1)
    model = torchvision.models.get_model(spec["model"], weights=None, weights_backbone=None,
                                         num_classes=len(read_labels(spec)))
    model.load_state_dict(torch.load(spec["checkpoint"], weights_only=True))
    model.eval()
    if spec.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    decoder = Decoder(None, 10**9)
    paths = spec["images"][:24]
    decode_s = forward_s = 0.0
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            data = f.read()
        started = time.process_time()
        (_, pixels, _), = decoder.decode(data)[0]  # one row: (frame, the whole image's pixels, size)
        decoded = time.process_time()
        with torch.inference_mode():
            model([torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)])
        if i >= 4:  # the first calls warm up oneDNN's kernels
            decode_s += decoded - started
            forward_s += time.process_time() - decoded
    measured = len(paths) - 4
    return {"decode_cpu_s": decode_s / measured, "forward_cpu_s": forward_s / measured, "cores": spec["cores"],
            "cpu_bound_images_s": spec["cores"] / ((decode_s + forward_s) / measured)}


# --- helpers ------------------------------------------------------------------------------------------------

def spilled_mib() -> float:
    """Object-store spilling over the whole Ray session, from the raylet's own log (0 when nothing spilled)."""
    import glob

    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    spilled = 0.0
    for log in glob.glob(os.path.join(session, "logs", "raylet*.out")):
        with open(log, errors="replace") as f:
            for match in re.finditer(r"Spilled (\d+) MiB", f.read()):
                spilled = max(spilled, float(match.group(1)))
    return spilled


CONTENDERS = {"bounds": bounds, "ray_recipe": ray_recipe, "torch_loop": torch_loop, "pipeline": pipeline,
              "detector_bound": detector_bound}

if __name__ == "__main__":
    name, spec_path, result_path = sys.argv[1:4]
    with open(spec_path) as f:
        spec = json.load(f)
    result = CONTENDERS[name](spec)
    with open(result_path, "w") as f:
        json.dump(result, f)
    # As the `pipeline` command exits: Ray stopped, then os._exit. A normal exit would let the session's reaper
    # (pipeline/ray/reaper.py, started by start_ray) see its pipe close while this process still holds Ray's log
    # files, and SIGTERM it: the contender would fail with exit -15 after its result was written.
    from pipeline.ray import stop_ray

    stop_ray()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
