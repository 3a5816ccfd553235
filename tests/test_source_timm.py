"""model.source: timm. A timm model saved as its own checkpoint (no hub here): through the CLI on the S3 server, the
pipeline's rows equal timm's own eval transform and forward pass; its embedding is timm's pre-logits features; a
wrong name or weights that cannot be fetched is one line before any work."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import yaml
from PIL import Image

from conftest import encode, photo

LABELS = ["cat", "dog", "bird", "fish"]
SIZES = [(96, 72), (72, 96), (120, 90), (64, 64), (150, 80), (80, 150), (101, 77), (260, 200), (48, 60), (300, 301)]


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory) -> dict:
    import timm

    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(LABELS)).eval()
    torch.save({"state_dict": model.state_dict()}, root / "resnet18-pets.pth")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    pngs = {f"p{i}.png": encode(photo(w, h, seed=i), "PNG") for i, (w, h) in enumerate(SIZES)}
    return {"model": model, "checkpoint": root / "resnet18-pets.pth", "labels": root / "labels.txt", "pngs": pngs}


def run_job(tmp_path, model: dict, input_uri: str, output_uri: str) -> subprocess.CompletedProcess:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": {"uri": input_uri}, "output": {"uri": output_uri},
                                    "model": {"source": "timm", **model}, "compute": {"batch_size": 4}}))
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec)], capture_output=True, text=True,
                          timeout=300)


def test_rows_equal_timms_own_transform_and_forward(timm_files, storage, bucket, tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    for name, data in timm_files["pngs"].items():
        storage.write_bytes(f"s3://{bucket}/in/{name}", data)
    storage.write_bytes(f"s3://{bucket}/models/pets.pth", timm_files["checkpoint"].read_bytes())
    run = run_job(tmp_path, {"name": "resnet18", "weights": f"s3://{bucket}/models/pets.pth",
                             "labels": str(timm_files["labels"]), "top_k": 3, "outputs": ["predictions", "embedding"]},
                  f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    assert run.returncode == 0, run.stderr[-3000:]
    table = pads.dataset(f"s3://{bucket}/out/", format="parquet").to_table()
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}
    model = timm_files["model"]
    transform = create_transform(**resolve_data_config({}, model=model))
    assert sorted(rows) == sorted(timm_files["pngs"])
    for name, data in timm_files["pngs"].items():
        x = transform(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
        with torch.inference_mode():
            features = model.forward_features(x)
            probabilities = model.forward_head(features).softmax(dim=1)[0]
            embedding = torch.nn.functional.normalize(model.forward_head(features, pre_logits=True), dim=1)[0]
        top = probabilities.topk(3)
        row = rows[name]
        assert row["error"] is None and row["label"] == LABELS[int(top.indices[0])], (name, row)
        assert row["topk_labels"] == [LABELS[i] for i in top.indices.tolist()]
        np.testing.assert_allclose(row["topk_scores"], top.values.numpy(), atol=1e-4)
        np.testing.assert_allclose(row["embedding"], embedding.numpy(), atol=1e-4)
        assert row["model"] == "resnet18" and row["weights"].startswith("sha256:")
    assert timm.__name__ not in run.stderr


@pytest.mark.parametrize("model, words", [
    ({"name": "convnxt_tiny"}, "error: model.name: 'convnxt_tiny' is not a timm model; did you mean convnext_tiny"),
    ({"name": "resnet18.a1_in1k"}, "error: model: cannot load timm weights for resnet18.a1_in1k"),
])
def test_a_wrong_name_or_weights_out_of_reach_is_one_line(timm_files, tmp_path, model, words):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(timm_files["pngs"]["p0.png"])
    run = run_job(tmp_path, model, str(folder), str(tmp_path / "out"))
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.startswith(words) and len(run.stderr.splitlines()) == 1, run.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("**/*.parquet"))
