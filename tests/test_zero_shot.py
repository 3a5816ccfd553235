"""Open-vocabulary tagging (model.source: open_clip) and `pipeline search`, on a tiny CLIP-style model trained here on
pictures of coloured shapes: held-out pictures are tagged with what they show, the rows equal open_clip's own
encode + softmax, a changed vocabulary is said to redo every input, a text finds its pictures first, and a vocabulary
or weights that cannot work are one line before any work."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import yaml
from PIL import Image

import duckdb
import tiny_clip
from conftest import download_prefix, encode, ensure_bucket

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "photo-archive"  # the job spec's own bucket and output, so the spec runs as shipped

TEMPLATES = ["a photo of a {}.", "a picture of a {}."]  # as jobs/open_vocabulary_tags.yaml has them
PER_CLASS = 4


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-clip")
    config, checkpoint = tiny_clip.train(root)
    return {"config": config, "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def shapes() -> dict[str, bytes]:
    """Held out: pictures the model never saw (other seeds), drawn larger than it looks (resized by the job)."""
    return {f"{name.replace(' ', '-')}-{k}.png": encode(tiny_clip.picture(*name.split(), seed=900_000 + 10 * i + k,
                                                                          size=48), "PNG")
            for i, name in enumerate(tiny_clip.CLASSES) for k in range(PER_CLASS)}


def job(tmp_path, model: dict, input_uri: str, output_uri: str, source: str = "open_clip") -> list[str]:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": {"uri": input_uri}, "output": {"uri": output_uri},
                                    "model": {"source": source, **model}, "compute": {"batch_size": 16}}))
    return [sys.executable, "-m", "pipeline", "run", str(spec)]


def reference(clip_model, images: list[Image.Image], vocabulary: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's own inference: (softmax probabilities, unit image embeddings)."""
    import open_clip

    open_clip.add_model_config(str(clip_model["config"]))
    model, _, preprocess = open_clip.create_model_and_transforms(clip_model["config"].stem,
                                                                 pretrained=str(clip_model["checkpoint"]))
    tokenizer = open_clip.get_tokenizer(clip_model["config"].stem)
    with torch.inference_mode():
        model.eval()
        text = model.encode_text(tokenizer([t.format(v) for v in vocabulary for t in TEMPLATES]), normalize=True)
        text = torch.nn.functional.normalize(text.view(len(vocabulary), len(TEMPLATES), -1).mean(dim=1), dim=-1)
        image = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        probabilities = (model.logit_scale.exp() * image @ text.T).softmax(dim=-1)
    return probabilities.numpy(), image.numpy()


def test_tags_equal_open_clips_own_and_search_finds_the_pictures(clip_model, shapes, storage, bucket, tmp_path):
    for name, data in shapes.items():
        storage.write_bytes(f"s3://{bucket}/shapes/{name}", data)
    storage.write_bytes(f"s3://{bucket}/models/clip.pt", clip_model["checkpoint"].read_bytes())
    output = f"s3://{bucket}/tags/"
    model = {"name": str(clip_model["config"]), "pretrained": f"s3://{bucket}/models/clip.pt",
             "labels": tiny_clip.CLASSES, "zero_shot": {"templates": TEMPLATES}, "top_k": 3,
             "outputs": ["predictions", "embedding"]}
    run = subprocess.run(job(tmp_path, model, f"s3://{bucket}/shapes/", output), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in pads.dataset(output, format="parquet").to_table().to_pylist()}
    assert sorted(rows) == sorted(shapes)
    names = sorted(shapes)
    probabilities, embeddings = reference(clip_model, [Image.open(io.BytesIO(shapes[n])).convert("RGB")
                                                        for n in names], tiny_clip.CLASSES)
    right = 0
    for name, p, e in zip(names, probabilities, embeddings):
        row = rows[name]
        order = np.argsort(-p, kind="stable")
        assert row["error"] is None and row["label"] == tiny_clip.CLASSES[order[0]], (name, row)
        np.testing.assert_allclose(row["topk_scores"], p[order[:3]], atol=1e-4)
        np.testing.assert_allclose(row["embedding"], e, atol=1e-4)
        assert row["tags"] == [tiny_clip.CLASSES[i] for i in order if p[i] >= 0.1]
        right += row["label"] == name.rsplit("-", 1)[0].replace("-", " ")
    assert right >= 0.8 * len(names), f"{right} of {len(names)} held-out pictures tagged with what they show"

    model["labels"] = [*tiny_clip.CLASSES, "purple star"]  # a new vocabulary: a new model identity
    again = subprocess.run(job(tmp_path, model, f"s3://{bucket}/shapes/", output), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every input is processed again" in again.stdout
    assert pads.dataset(output, format="parquet").to_table().num_rows == 2 * len(shapes)


def readme_queries() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Open-vocabulary tagging and search", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def test_the_job_spec_the_readme_queries_and_search(clip_model, shapes, storage, tmp_path, monkeypatch):
    ensure_bucket(storage, BUCKET)
    for name, data in shapes.items():  # beside test_tag_archive's photos in the same bucket: a prefix of their own
        storage.write_bytes(f"s3://{BUCKET}/shapes/{name}", data)
    storage.write_bytes(f"s3://{BUCKET}/shapes/broken.png", next(iter(shapes.values()))[:60])
    storage.write_bytes(f"s3://{BUCKET}/models/shapes-clip.pt", clip_model["checkpoint"].read_bytes())
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("\n".join(tiny_clip.CLASSES) + "\n")
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(ROOT / "jobs" / "open_vocabulary_tags.yaml"),
                          "--input", f"s3://{BUCKET}/shapes/", "--model", str(clip_model["config"]),
                          "--pretrained", f"s3://{BUCKET}/models/shapes-clip.pt",
                          "--labels", str(vocabulary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    output = f"s3://{BUCKET}/open-tags/"
    rows = pads.dataset(output, format="parquet").to_table().to_pylist()
    assert len(rows) == len(shapes) + 1 and sum((r["error_type"] or "").startswith("decode.") for r in rows) == 1

    local = tmp_path / "analyst"  # the analyst's copy, then the README's queries character for character
    download_prefix(storage, BUCKET, "open-tags/", local)
    monkeypatch.chdir(local)
    per_tag, least_sure = readme_queries()
    counted: dict[str, int] = {}
    for row in rows:
        for tag in row["tags"] or []:
            counted[tag] = counted.get(tag, 0) + 1
    assert dict(duckdb.sql(per_tag).fetchall()) == counted
    unsure = duckdb.sql(least_sure).fetchall()
    scored = sorted((r["score"], r["uri"]) for r in rows if r["error"] is None)
    assert [uri for uri, _, _ in unsure] == [uri for _, uri in scored[:20]]

    page = tmp_path / "red.html"
    search = subprocess.run([sys.executable, "-m", "pipeline", "search", output, "a red square", "--limit",
                             str(PER_CLASS), "-o", str(page)], capture_output=True, text=True, timeout=300)
    assert search.returncode == 0, search.stderr[-3000:]
    found = [line.split()[1].rsplit("/", 1)[-1] for line in search.stdout.splitlines()[1:PER_CLASS + 1]]
    assert found[0].startswith("red-square") and sum(f.startswith("red-square") for f in found) >= PER_CLASS - 1, \
        search.stdout
    assert page.read_text().count('src="data:image/jpeg;base64,') == PER_CLASS


def test_a_hugging_face_clip_tags_as_transformers_own_pipeline(shapes, storage, bucket, tmp_path):
    from transformers import pipeline

    saved = tiny_clip.save_hf_clip(tmp_path)
    names = sorted(shapes)[::5]
    for name in names:
        storage.write_bytes(f"s3://{bucket}/few/{name}", shapes[name])
    vocabulary = ["red square", "blue circle", "green triangle"]
    model = {"name": str(saved), "labels": vocabulary, "zero_shot": {"templates": ["a photo of a {}."]},
             "outputs": ["predictions", "embedding"]}
    run = subprocess.run(job(tmp_path, model, f"s3://{bucket}/few/", f"s3://{bucket}/hf-tags/", "huggingface"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["uri"].rsplit("/", 1)[-1]: r
            for r in pads.dataset(f"s3://{bucket}/hf-tags/", format="parquet").to_table().to_pylist()}
    tag = pipeline("zero-shot-image-classification", model=str(saved))
    for name in names:
        expected = tag(Image.open(io.BytesIO(shapes[name])).convert("RGB"), candidate_labels=vocabulary,
                       hypothesis_template="a photo of a {}.")
        assert rows[name]["topk_labels"] == [e["label"] for e in expected], (rows[name], expected)
        np.testing.assert_allclose(rows[name]["topk_scores"], [e["score"] for e in expected], atol=1e-4)
    search = subprocess.run([sys.executable, "-m", "pipeline", "search", f"s3://{bucket}/hf-tags/", "a red square",
                             "--limit", "2"], capture_output=True, text=True, timeout=300)
    assert search.returncode == 0 and len(search.stdout.splitlines()) == 3, search.stdout + search.stderr


@pytest.mark.parametrize("model, words", [
    ({"name": "ViT-B-32", "pretrained": "nope", "labels": ["dog"]},
     "error: model.pretrained: 'nope' is not a pretrained tag of ViT-B-32"),
    ({"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "labels": ["dog"]},
     "error: model: cannot load open_clip ViT-B-32 (laion2b_s34b_b79k)"),
    ({"name": "ViT-B-32", "pretrained": "openai", "labels": []}, "model.labels is an empty vocabulary"),
    ({"name": "ViT-B-32", "pretrained": "openai", "labels": ["dog"], "zero_shot": {"templates": ["a photo"]}},
     "must hold exactly one '{}'"),
])
def test_a_vocabulary_or_weights_that_cannot_work_is_one_line(tmp_path, shapes, model, words):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(next(iter(shapes.values())))
    run = subprocess.run(job(tmp_path, model, str(folder), str(tmp_path / "out")), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert words in run.stderr and run.stderr.startswith("error:") and len(run.stderr.splitlines()) == 1, run.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("**/*.parquet"))


def test_a_sigmoid_model_scores_each_label_on_its_own(shapes, tmp_path):
    """A SigLIP-style model (trained with a logit bias) is scored by sigmoid, as open_clip's own SigLIP recipe
    does, and tags at 0.5 by default."""
    import json

    import open_clip

    config = tmp_path / "tiny-sigmoid-clip.json"
    config.write_text(json.dumps({**tiny_clip.CONFIG, "init_logit_bias": -2.0}))
    open_clip.add_model_config(str(config))
    torch.manual_seed(1)
    model = open_clip.create_model(config.stem).eval()
    torch.save(model.state_dict(), tmp_path / "sigmoid.pt")
    folder = tmp_path / "in"
    folder.mkdir()
    names = sorted(shapes)[:6]
    for name in names:
        (folder / name).write_bytes(shapes[name])
    vocabulary = ["red square", "blue circle"]
    spec = {"name": str(config), "pretrained": str(tmp_path / "sigmoid.pt"), "labels": vocabulary,
            "zero_shot": {"templates": ["a photo of a {}."]}, "outputs": ["predictions", "embedding"]}
    out = tmp_path / "out"  # a Delta table: search reads it through its format, as it does a Parquet folder
    run = subprocess.run([*job(tmp_path, spec, str(folder), str(out)), "--format", "delta"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from deltalake import DeltaTable

    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in DeltaTable(str(out)).to_pyarrow_table().to_pylist()}
    search = subprocess.run([sys.executable, "-m", "pipeline", "search", str(out), "a red square", "--limit", "2"],
                            capture_output=True, text=True, timeout=300)
    assert search.returncode == 0 and len(search.stdout.splitlines()) == 3, search.stdout + search.stderr
    _, preprocess = open_clip.create_model_and_transforms(config.stem)[1:]
    tokenizer = open_clip.get_tokenizer(config.stem)
    with torch.inference_mode():
        text = model.encode_text(tokenizer([f"a photo of a {v}." for v in vocabulary]), normalize=True)
        for name in names:
            image = model.encode_image(preprocess(Image.open(io.BytesIO(shapes[name])).convert("RGB"))[None],
                                       normalize=True)
            expected = torch.sigmoid(model.logit_scale.exp() * image @ text.T + model.logit_bias)[0].numpy()
            order = np.argsort(-expected, kind="stable")
            np.testing.assert_allclose(rows[name]["topk_scores"], expected[order], atol=1e-4)
            assert rows[name]["tags"] == [vocabulary[i] for i in order if expected[i] >= 0.5]
