"""model.source onnx and exported (pipeline/models/sources/onnx.py, exported.py): a small seeded CNN exported to
ONNX, TorchScript and torch.export, run through the CLI on the local S3 server; each row equals the library's own
inference (onnxruntime, the loaded module) on the same files with torchvision's transforms. A model that cannot run
is one line before any work."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image
from torch import nn
from torch.export import Dim
from torchvision import transforms

from conftest import encode, photo
from pipeline.io.storage import Storage
from pipeline.job.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from pipeline.job.errors import UserError
from pipeline.models.resolve import build_model, resolve_model

SIZES = [(96, 72), (72, 96), (64, 64), (120, 50), (50, 130), (200, 150), (33, 47), (80, 80), (150, 99), (61, 200)]
LABELS = ["cat", "dog", "bird", "fish"]
SIDE = 64  # the exported models' fixed height and width (ONNX, torch.export); TorchScript takes any
BATCH = {"x": {0: Dim("batch")}}


class Tiny(nn.Module):
    def __init__(self, channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, len(LABELS))

    def forward(self, x):
        return self.fc(self.features(x))


class GreyNhwc(Tiny):
    """A grey model taking (batch, height, width, 1), as Keras-born models do."""

    def __init__(self):
        super().__init__(channels=1)

    def forward(self, x):
        return super().forward(x.permute(0, 3, 1, 2))


def _seeded_model(kind: type = Tiny) -> Tiny:
    torch.manual_seed(0)
    model = kind()
    with torch.no_grad():  # running statistics that are not the identity, so batch norm matters
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
        model.fc.weight.mul_(8)  # confident scores: the classes' order is far from ties
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    import onnx

    folder = tmp_path_factory.mktemp("models")
    model, x = _seeded_model(), torch.randn(2, 3, SIDE, SIDE)
    torch.onnx.export(model, (x,), folder / "dynamic.onnx", dynamic_shapes=BATCH, external_data=False)
    torch.onnx.export(model, (x[:1],), folder / "batch1.onnx", external_data=False)
    torch.onnx.export(model, (x,), folder / "external.onnx", dynamic_shapes=BATCH)  # weights in external.onnx.data
    with_stats = onnx.load(folder / "dynamic.onnx")
    onnx.helper.set_model_props(with_stats, {"mean": "0.5,0.5,0.5", "std": "[0.25, 0.25, 0.25]"})
    onnx.save(with_stats, folder / "stats.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in 2.14, still loadable
        torch.jit.save(torch.jit.trace(model, x), folder / "model.ts")
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=BATCH), folder / "model.pt2")
    torch.save(model.state_dict(), folder / "state_dict.pt")  # a zip torch.load reads, but not a model
    return folder


@pytest.fixture(scope="module")
def bucket(s3_server, models) -> str:
    """A bucket with ten PNGs of varied sizes under in/, and the models under models/."""
    storage, name = Storage.from_env(), f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client.create_bucket(Bucket=name)
    for i, (width, height) in enumerate(SIZES):
        png = encode(photo(width, height, seed=i), "PNG")
        storage.s3_client.put_object(Bucket=name, Key=f"in/img-{i:02d}.png", Body=png)
    for file in ("stats.onnx", "model.pt2", "external.onnx"):
        storage.s3_client.put_object(Bucket=name, Key=f"models/{file}", Body=(models / file).read_bytes())
    return name


def run_job(tmp_path: Path, bucket: str, model: dict) -> subprocess.CompletedProcess:
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": str(tmp_path / "out")},
                                "model": model}))
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec)], capture_output=True, text=True,
                          timeout=300)


def reference(storage: Storage, bucket: str, resize: int, crop: int, mean, std, call) -> np.ndarray:
    """Class probabilities of the ten inputs, in uri order, by torchvision's transforms and the library's own call."""
    transform = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    images = [Image.open(io.BytesIO(storage.read_bytes(f"s3://{bucket}/in/img-{i:02d}.png"))).convert("RGB")
              for i in range(len(SIZES))]
    logits = call(torch.stack([transform(image) for image in images]))
    return torch.softmax(torch.as_tensor(np.asarray(logits)), dim=1).numpy()


def onnx_call(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.numpy()})[0]


def module_call(module):
    def call(x):
        with torch.inference_mode():
            return module(x)
    return call


def load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


CASES = {
    # (the job's model section, its file, (resize, crop, mean, std), how the library itself runs it)
    "onnx-on-s3-with-metadata-stats": (
        lambda models, bucket: {"source": "onnx", "weights": f"s3://{bucket}/models/stats.onnx", "labels": LABELS},
        "stats.onnx", (73, SIDE, (0.5,) * 3, (0.25,) * 3), lambda path: onnx_call(path)),
    "torchscript-local-imagenet-defaults": (
        lambda models, bucket: {"source": "exported", "weights": str(models / "model.ts"), "labels": LABELS},
        "model.ts", (256, 224, IMAGENET_MEAN, IMAGENET_STD), lambda path: module_call(load_torchscript(path))),
    "torch-export-on-s3-index-labels": (
        lambda models, bucket: {"source": "exported", "weights": f"s3://{bucket}/models/model.pt2",
                                "preprocess": {"resize_size": 80, "mean": [0.4, 0.5, 0.6]}},
        "model.pt2", (80, SIDE, (0.4, 0.5, 0.6), IMAGENET_STD),
        lambda path: module_call(torch.export.load(str(path)).module())),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rows_equal_the_librarys_own_inference(case, models, bucket, s3_server, tmp_path):
    model, file, (resize, crop, mean, std), library = CASES[case]
    run = run_job(tmp_path, bucket, model(models, bucket))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("uri").to_pylist()
    assert [r["uri"] for r in rows] == [f"s3://{bucket}/in/img-{i:02d}.png" for i in range(len(SIZES))]
    assert all(r["error"] is None for r in rows), rows[0]["error"]
    expected = reference(Storage.from_env(), bucket, resize, crop, mean, std, library(models / file))
    names = LABELS if "labels" in model(models, bucket) else ["0", "1", "2", "3"]
    for row, probabilities in zip(rows, expected):
        order = np.argsort(-probabilities, kind="stable")
        assert row["label"] == names[order[0]]
        assert row["topk_labels"] == [names[i] for i in order]
        np.testing.assert_allclose(row["topk_scores"], probabilities[order], atol=1e-4)
    assert {r["model"] for r in rows} == {file}
    assert {r["weights"] for r in rows} == {"sha256:" + hashlib.sha256((models / file).read_bytes()).hexdigest()}


BAD = {
    "onnx-fixed-batch-of-one": ({"source": "onnx", "weights": "batch1.onnx"},
                                "takes a fixed batch of 1", "dynamic_shapes"),
    "crop-size-against-the-models-fixed-size": ({"source": "onnx", "weights": "dynamic.onnx",
                                                 "preprocess": {"crop_size": 160}},
                                                f"model expects {SIDE}x{SIDE}, model.preprocess.crop_size is 160", ""),
    "not-a-model": ({"source": "exported", "weights": "state_dict.pt"},
                    "is not a TorchScript or torch.export archive", "torch.jit.save / torch.export.save"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_model_that_cannot_run_is_one_line_before_any_work(case, models, bucket, tmp_path):
    model, says, fix = BAD[case]
    run = run_job(tmp_path, bucket, {**model, "weights": str(models / model["weights"])})
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.startswith("error: model") and len(run.stderr.splitlines()) == 1, run.stderr
    assert says in run.stderr and fix in run.stderr
    assert not list((tmp_path / "out").glob("**/*.parquet"))


def test_a_local_onnx_model_may_keep_its_weights_beside_it_an_s3_one_may_not(models, bucket):
    """torch.onnx.export's default writes external.onnx.data: read beside a local file, part of its identity."""
    storage = Storage.from_env()
    spec = resolve_model(ModelConfig(source="onnx", weights=str(models / "external.onnx")), storage)
    assert spec.labels == ("0", "1", "2", "3") and spec.preprocess.crop_size == SIDE
    assert spec.weights_id == "sha256:" + hashlib.sha256((models / "external.onnx").read_bytes() +
                                                         (models / "external.onnx.data").read_bytes()).hexdigest()
    model = build_model(spec, storage).to("cpu", memory_format=torch.channels_last)
    x = torch.randn(3, 3, SIDE, SIDE)
    expected = onnx_call(models / "dynamic.onnx")(x)
    np.testing.assert_allclose(model(x.contiguous(memory_format=torch.channels_last)).numpy(), expected, atol=1e-5)
    with pytest.raises(UserError, match="an ONNX model in an object store must be a single file.*external_data=False"):
        resolve_model(ModelConfig(source="onnx", weights=f"s3://{bucket}/models/external.onnx"), storage)


def test_a_torch_export_for_one_image_or_an_embedding_is_refused(models, tmp_path):
    model = _seeded_model()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, SIDE, SIDE),)), tmp_path / "one.pt2")
    storage = Storage.from_env()
    with pytest.raises(UserError, match="exported for a fixed batch of 1; export it with a dynamic batch"):
        resolve_model(ModelConfig(source="exported", weights=str(tmp_path / "one.pt2")), storage)
    with pytest.raises(UserError, match="model.outputs: an exported model has no layer to tap"):
        resolve_model(ModelConfig(source="exported", weights=str(models / "model.ts"), outputs=["embedding"]), storage)


def test_a_grey_nhwc_onnx_model_takes_its_layout_and_channels_from_its_input(tmp_path):
    torch.onnx.export(_seeded_model(GreyNhwc), (torch.randn(2, SIDE, SIDE, 1),), tmp_path / "grey.onnx",
                      dynamic_shapes=BATCH, external_data=False)
    storage = Storage.from_env()
    spec = resolve_model(ModelConfig(source="onnx", weights=str(tmp_path / "grey.onnx")), storage)
    assert spec.input_channels == 1 and spec.options["layout"] == "NHWC"
    assert spec.preprocess.mean == (sum(IMAGENET_MEAN) / 3,) and spec.preprocess.resize_size == 73
    x = torch.randn(3, 1, SIDE, SIDE)
    expected = onnx_call(tmp_path / "grey.onnx")(x.permute(0, 2, 3, 1).contiguous())
    np.testing.assert_allclose(build_model(spec, storage)(x).numpy(), expected, atol=1e-5)
