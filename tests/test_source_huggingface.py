"""model.source: huggingface. Tiny transformers models saved with save_pretrained (no hub here): the pipeline's rows
equal the library's own inference on the same files, bad models are one line before any work, and the processor's
steps map onto our preprocessing pixel for pixel."""

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

from conftest import encode, encoded_batch, photo
from pipeline.decode.image import Decoder
from pipeline.models.sources.huggingface import processor_preprocess

LABELS = {0: "cat", 1: "dog", 2: "bird"}
SIZES = [(96, 72), (72, 96), (120, 90), (64, 64), (150, 80), (80, 150), (101, 77), (200, 120), (48, 60), (90, 91)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A tiny ViT classifier and a tiny DETR, each with its image processor, plus a model that needs remote code."""
    from transformers import (DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig, ViTConfig,
                              ViTForImageClassification, ViTImageProcessor)

    root = tmp_path_factory.mktemp("hf-models")
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    detr = DetrForObjectDetection(DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, num_labels=3,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=8))
    with torch.no_grad():  # larger random queries and heads: boxes, labels and scores that differ between queries
        detr.model.query_position_embeddings.weight.normal_(0, 3)
        for module, std in ((detr.model.decoder, 1.0), (detr.class_labels_classifier, 0.5), (detr.bbox_predictor, 0.2)):
            for weight in module.parameters():
                weight.normal_(0, std)
    detr.save_pretrained(root / "detr")
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(root / "detr")
    (root / "remote").mkdir()
    (root / "remote" / "config.json").write_text('{"model_type": "tiny-custom", "auto_map": {"AutoConfig": '
                                                 '"custom.TinyConfig"}}')
    (root / "remote" / "custom.py").write_text("raise SystemExit('remote code ran')\n")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("hello\n")
    return {name: str(root / name) for name in ("vit", "detr", "remote", "not-a-model")}


@pytest.fixture(scope="module")
def pngs() -> dict[str, bytes]:
    return {f"p{i}.png": encode(photo(w, h, seed=i), "PNG") for i, (w, h) in enumerate(SIZES)}


def run_job(tmp_path, model: dict, input_uri: str, output_uri: str, executor: str = "local"):
    spec = tmp_path / f"job-{executor}.yaml"
    spec.write_text(yaml.safe_dump({"input": {"uri": input_uri}, "output": {"uri": output_uri},
                                    "model": {"source": "huggingface", **model}, "compute": {"batch_size": 4}}))
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec), "--executor", executor],
                          capture_output=True, text=True, timeout=300)


def put(storage, bucket: str, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        storage.write_bytes(f"s3://{bucket}/in/{name}", data)
    return f"s3://{bucket}/in/"


def rows_of(uri: str) -> dict[str, dict]:
    return {r["uri"].rsplit("/", 1)[-1]: r for r in pads.dataset(uri, format="parquet").to_table().to_pylist()}


def images_of(files: dict[str, bytes]) -> dict[str, Image.Image]:
    return {name: Image.open(io.BytesIO(data)).convert("RGB") for name, data in files.items()}


def test_classifier_rows_equal_the_transformers_pipeline(models, pngs, storage, bucket, tmp_path, executor="local"):
    from transformers import AutoImageProcessor, pipeline

    run = run_job(tmp_path, {"name": models["vit"], "top_k": 3}, put(storage, bucket, pngs), f"s3://{bucket}/out/",
                  executor)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = rows_of(f"s3://{bucket}/out/")
    classify = pipeline("image-classification", model=models["vit"], top_k=3,
                        image_processor=AutoImageProcessor.from_pretrained(models["vit"], backend="pil"))
    images = images_of(pngs)
    assert sorted(rows) == sorted(images)
    for name, expected in zip(images, classify(list(images.values()))):
        row = rows[name]
        assert row["error"] is None and row["label"] == expected[0]["label"], (name, row, expected)
        assert row["topk_labels"] == [e["label"] for e in expected]
        np.testing.assert_allclose(row["topk_scores"], [e["score"] for e in expected], atol=1e-4)
        assert row["weights"].startswith("sha256:")


def test_detector_rows_equal_the_model_and_its_processor(models, pngs, storage, bucket, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    run = run_job(tmp_path, {"name": models["detr"], "detection": {"score_threshold": 0.2, "max_detections": 5}},
                  put(storage, bucket, pngs), f"s3://{bucket}/out/")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = rows_of(f"s3://{bucket}/out/")
    processor = AutoImageProcessor.from_pretrained(models["detr"], backend="pil")
    model = AutoModelForObjectDetection.from_pretrained(models["detr"]).eval()
    found = 0
    for name, image in images_of(pngs).items():
        with torch.inference_mode():
            out = model(**processor(images=[image], return_tensors="pt"))
        expected = processor.post_process_object_detection(out, threshold=0.2, target_sizes=[image.size[::-1]])[0]
        order = torch.argsort(-expected["scores"], stable=True)[:5]
        got = rows[name]["detections"]
        assert rows[name]["num_detections"] == len(got) == len(order), name
        assert [d["label"] for d in got] == [LABELS[int(expected["labels"][k])] for k in order]
        np.testing.assert_allclose([d["score"] for d in got], expected["scores"][order].numpy(), atol=1e-4)
        boxes = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in got]).reshape(-1, 4)
        reference = expected["boxes"][order].numpy().reshape(-1, 4)
        reference[:, 0::2] = reference[:, 0::2].clip(0, image.width)
        reference[:, 1::2] = reference[:, 1::2].clip(0, image.height)
        np.testing.assert_allclose(boxes, reference, rtol=1e-3, atol=1e-2)
        found += len(got)
    assert found > 0  # the threshold leaves boxes to compare


def test_a_model_that_cannot_load_is_one_line_before_any_work(models, pngs, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(pngs["p0.png"])
    cases = {"offline": ("google/vit-base-patch16-224", "error: model: cannot load the Hugging Face"),
             "folder": (models["not-a-model"], "error: model.name: "),
             "remote": (models["remote"], "error: model.trust_remote_code: ")}
    runs = {}
    for case, (name, _) in cases.items():  # at once: each pays a Python start
        spec = tmp_path / f"{case}.yaml"
        spec.write_text(yaml.safe_dump({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / case)},
                                        "model": {"source": "huggingface", "name": name}}))
        runs[case] = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(spec), "--executor", "local"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = {case: proc.communicate(timeout=300)[1] for case, proc in runs.items()}
    for case, proc in runs.items():
        assert proc.returncode == 2, (case, stderr[case][-2000:])
        assert stderr[case].startswith(cases[case][1]) and len(stderr[case].splitlines()) == 1, (case, stderr[case])
        assert not list((tmp_path / case).glob("**/*.parquet")), case
    assert "hf download google/vit-base-patch16-224" in stderr["offline"]  # the fix: fetch it into HF_HOME


PROCESSORS = {
    "vit-exact": lambda t: t.ViTImageProcessor(size={"height": 32, "width": 32}, resample=3),
    "bit-shortest-edge-crop": lambda t: t.BitImageProcessor(size={"shortest_edge": 40}, do_center_crop=True,
                                                            crop_size={"height": 32, "width": 32}),
    "convnext-crop-pct": lambda t: t.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875),
}


def ours_and_theirs(style: str, folder, sizes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """NCHW float pixels: our decoder with the mapped preprocessing (normalised as `Classifier` does), and the
    processor's own on the same images."""
    import transformers

    PROCESSORS[style](transformers).save_pretrained(folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    p = processor_preprocess(processor)
    files = [encode(photo(w, h, seed=i), "PNG") for i, (w, h) in enumerate(sizes)]
    pixels = Decoder(p, 10**8)(encoded_batch(files))["pixels"]
    ours = (pixels.astype(np.float64) / 255 - np.array(p.mean)) / np.array(p.std)
    theirs = processor(images=[photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)], return_tensors="np")
    return ours.transpose(0, 3, 1, 2), theirs["pixel_values"]


@pytest.mark.parametrize("style", PROCESSORS)
def test_the_mapped_preprocessing_gives_the_processor_s_pixels(style, tmp_path):
    ours, theirs = ours_and_theirs(style, tmp_path, [(96, 72), (72, 96), (64, 64), (120, 90), (61, 120)])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_centre_crop_with_an_odd_margin_lands_where_the_processor_s_does(tmp_path):
    """transformers' PIL center_crop starts at floor(margin / 2), torchvision's at round(margin / 2), half to even:
    150x80 -> 75x40 leaves a 43-pixel margin for the 32-pixel crop, 21 pixels there and 22 by torchvision's rule.
    A Hugging Face model's preprocessing crops as its processor does."""
    ours, theirs = ours_and_theirs("bit-shortest-edge-crop", tmp_path, [(150, 80), (151, 80), (120, 91)])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_processor_we_cannot_repeat_is_one_line_unless_the_job_sets_the_preprocessing(models, tmp_path):
    import transformers

    from pipeline.io.storage import Storage
    from pipeline.job.config import ModelConfig
    from pipeline.job.errors import UserError
    from pipeline.models.resolve import resolve_model

    folder = tmp_path / "wide"
    transformers.AutoModelForImageClassification.from_pretrained(models["vit"]).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 48}).save_pretrained(folder)
    with pytest.raises(UserError, match=r"model.preprocess: .*resizes to \{'height': 32, 'width': 48\}.*set "
                                        r"model.preprocess"):
        resolve_model(ModelConfig(source="huggingface", name=str(folder)), Storage.from_env())
    own = {"resize_size": 36, "crop_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    spec = resolve_model(ModelConfig(source="huggingface", name=str(folder), preprocess=own), Storage.from_env())
    assert (spec.preprocess.resize_size, spec.preprocess.crop_size, spec.preprocess.resize_mode) == (36, 32, "shorter")


def test_the_weights_id_follows_the_weights_and_the_embedding_is_the_head_s_input(models, tmp_path):
    import transformers

    from pipeline.io.storage import Storage
    from pipeline.job.config import ModelConfig
    from pipeline.models.classify import Classifier
    from pipeline.models.resolve import resolve_model

    spec_of = lambda name, **more: resolve_model(ModelConfig(source="huggingface", name=name, **more),
                                                  Storage.from_env())
    model = transformers.AutoModelForImageClassification.from_pretrained(models["vit"]).eval()
    with torch.no_grad():
        model.classifier.bias[0] += 0.5
    model.save_pretrained(tmp_path / "changed")
    transformers.AutoImageProcessor.from_pretrained(models["vit"]).save_pretrained(tmp_path / "changed")
    assert spec_of(models["vit"]).weights_id == spec_of(models["vit"]).weights_id != \
        spec_of(str(tmp_path / "changed")).weights_id

    spec = spec_of(models["vit"], outputs=["predictions", "embedding"], embedding={"normalize": False})
    pixels = Decoder(spec.preprocess, 10**8)(encoded_batch([encode(photo(seed=i), "PNG") for i in range(3)]))["pixels"]
    _, _, embedding = Classifier(spec, Storage.from_env()).infer(pixels)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        expected = model.vit(pixel_values=x).last_hidden_state[:, 0]  # the [CLS] features the classifier reads
    assert spec.embedding_dim == 32
    np.testing.assert_allclose(embedding, expected.numpy(), atol=1e-5)
