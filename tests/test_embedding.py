"""Embeddings: the model's pooled features before its head, one fixed-size vector per image."""

from __future__ import annotations

import io

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
import torchvision
from torch.nn import functional as F

from conftest import encode, photo
from pipeline.decode.image import Decoder
from pipeline.io.storage import Storage
from pipeline.models.classify import Classifier
from pipeline.models.resolve import resolve_model
from pipeline.ray.executor import run_on_ray
from pipeline.job.config import ModelConfig, load_job
from pipeline.job.errors import UserError
from pipeline.job.rows import output_schema

PREPROCESS = {"resize_size": 72, "crop_size": 64}

# The penultimate features, computed the way each architecture's own forward computes them.
PENULTIMATE = {
    "resnet18": lambda m, x: torch.flatten(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(
        m.maxpool(m.relu(m.bn1(m.conv1(x))))))))), 1),
    "mobilenet_v3_small": lambda m, x: torch.flatten(m.avgpool(m.features(x)), 1),  # input of the classifier MLP
    "densenet121": lambda m, x: torch.flatten(F.adaptive_avg_pool2d(F.relu(m.features(x)), 1), 1),
    "squeezenet1_1": lambda m, x: m.features(x).mean(dim=(2, 3)),  # its head is a conv: pooled here
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("embedding-models")
    (folder / "labels.txt").write_text("a\nb\nc\n")
    files = {}
    for name in PENULTIMATE:
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(name, num_classes=3).state_dict(), folder / f"{name}.pt")
        files[name] = {"name": name, "weights": str(folder / f"{name}.pt"), "labels": str(folder / "labels.txt")}
    return files


def spec_for(files: dict, **model):
    return resolve_model(ModelConfig(**files, preprocess=PREPROCESS, **model), Storage.from_env())


def pixels_of(spec, count: int = 3) -> np.ndarray:
    n = count
    data = np.empty(n, dtype=object)
    data[:] = [encode(photo(120, 90, seed=i), "JPEG") for i in range(n)]
    batch = {"uri": np.array([str(i) for i in range(n)], dtype=object), "bytes": data,
             "error": np.full(n, None, dtype=object), "error_type": np.full(n, None, dtype=object)}
    return Decoder(spec.preprocess, 10**8)(batch)["pixels"]


def reference(files: dict, spec, pixels: np.ndarray) -> np.ndarray:
    model = torchvision.models.get_model(files["name"], num_classes=3)
    model.load_state_dict(torch.load(files["weights"], weights_only=True))
    model.eval()
    p = spec.preprocess
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return PENULTIMATE[files["name"]](model, x).numpy()


@pytest.mark.parametrize("name", PENULTIMATE)
def test_embedding_equals_the_penultimate_features(checkpoints, name):
    spec = spec_for(checkpoints[name], outputs=["predictions", "embedding"], embedding={"normalize": False})
    pixels = pixels_of(spec)
    _, _, embedding = Classifier(spec, Storage.from_env()).infer(pixels)
    expected = reference(checkpoints[name], spec, pixels)
    assert embedding.shape == expected.shape == (3, spec.embedding_dim)
    np.testing.assert_allclose(embedding, expected, atol=1e-4, rtol=1e-4)


def test_normalised_embedding_is_the_unit_vector_of_the_features(checkpoints):
    files = checkpoints["resnet18"]
    raw_spec = spec_for(files, outputs=["embedding"], embedding={"normalize": False})
    unit_spec = spec_for(files, outputs=["embedding"])
    pixels = pixels_of(raw_spec)
    raw = Classifier(raw_spec, Storage.from_env()).infer(pixels)[2]
    unit = Classifier(unit_spec, Storage.from_env()).infer(pixels)[2]
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


def test_embedding_layer_can_be_named(checkpoints):
    files = checkpoints["resnet18"]
    by_head = spec_for(files, outputs=["embedding"], embedding={"normalize": False})
    by_pool = spec_for(files, outputs=["embedding"], embedding={"normalize": False, "layer": "avgpool"})
    pixels = pixels_of(by_head)
    np.testing.assert_allclose(Classifier(by_pool, Storage.from_env()).infer(pixels)[2],
                               Classifier(by_head, Storage.from_env()).infer(pixels)[2], atol=1e-5)
    with pytest.raises(UserError, match="model.embedding.layer: the model has no module 'pool5'; its top-level "
                                        "modules are conv1, bn1"):
        spec_for(files, outputs=["embedding"], embedding={"layer": "pool5"})


def test_embedding_only_job_on_s3_and_a_nearest_neighbour_query(checkpoints, storage, bucket, ray_session):
    images = {f"photos/p{i}.jpg": encode(photo(160, 120, seed=i), "JPEG") for i in range(8)}
    images["photos/broken.png"] = b"\x89PNG not really"
    for key, data in images.items():
        storage.write_bytes(f"s3://{bucket}/{key}", data)
    files = checkpoints["resnet18"]
    cfg = load_job(None, {"input": f"s3://{bucket}/photos/", "output": f"s3://{bucket}/embeddings/",
                          "model": "resnet18", "weights": files["weights"], "labels": files["labels"]})
    cfg.model.outputs = ["embedding"]
    cfg.model.preprocess = PREPROCESS
    summary = run_on_ray(cfg, out=io.StringIO())
    assert (summary.predicted, summary.errors) == (8, 1)

    table = pads.dataset(f"s3://{bucket}/embeddings/", format="parquet").to_table()
    assert table.schema == output_schema("classification", predictions=False, embedding_dim=512)
    assert "label" not in table.column_names
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 512)
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}
    assert rows["broken.png"]["embedding"] is None and rows["broken.png"]["error_type"] == "decode.not_an_image"

    # Equal to the stage run directly on the same images, and unit length.
    names = [f"p{i}.jpg" for i in range(8)]
    spec = spec_for(files, outputs=["embedding"])
    n = len(names)
    data = np.empty(n, dtype=object)
    data[:] = [images[f"photos/{name}"] for name in names]
    direct = Classifier(spec, Storage.from_env()).infer(Decoder(spec.preprocess, 10**8)(
        {"uri": np.array(names, dtype=object), "bytes": data, "error": np.full(n, None, dtype=object),
         "error_type": np.full(n, None, dtype=object)})["pixels"])[2]
    got = np.array([rows[name]["embedding"] for name in names], dtype=np.float32)
    np.testing.assert_allclose(got, direct, atol=1e-5)

    query = f"s3://{bucket}/photos/p3.jpg"
    embeddings_table = table  # noqa: F841 - DuckDB finds the Arrow table by its variable name
    neighbours = duckdb.sql(f"""
        SELECT uri, list_cosine_similarity(embedding,
                   (SELECT embedding FROM embeddings_table WHERE uri = '{query}')) AS similarity
        FROM embeddings_table WHERE error IS NULL AND uri <> '{query}'
        ORDER BY similarity DESC LIMIT 3""").fetchall()
    similarity = got @ got[3]
    expected = [names[i] for i in np.argsort(-similarity) if i != 3][:3]
    assert [uri.rsplit("/", 1)[-1] for uri, _ in neighbours] == expected
    np.testing.assert_allclose([s for _, s in neighbours], np.sort(similarity[np.arange(8) != 3])[::-1][:3],
                               atol=1e-5)
