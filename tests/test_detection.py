"""Detection: boxes in the original photo's pixels, whatever the model resized, rotated or batched."""

from __future__ import annotations

import io

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

from color_boxes import LABELS, ColorBoxes
from conftest import encode, encoded_batch as as_batch
from pipeline.decode.image import Decoder
from pipeline.io.storage import Storage
from pipeline.models.detect import Detector
from pipeline.models.resolve import ModelSpec, detection_models, resolve_model
from pipeline.job.stage import Resources
from pipeline.models.inference import ModelInference
from pipeline.ray.executor import run_on_ray
from pipeline.job.config import DetectionConfig, ModelConfig, load_job
from pipeline.job.errors import UserError
from pipeline.job.rows import output_schema

FRCNN = "fasterrcnn_mobilenet_v3_large_320_fpn"
PATCH_COLORS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def scene(width: int, height: int, patches: dict[str, tuple[int, int, int, int]], seed: int = 0) -> Image.Image:
    """Grey noise (no channel dominates) with solid colour patches at known (x1, y1, x2, y2)."""
    pixels = np.random.default_rng(seed).integers(90, 160, (height, width, 3), dtype=np.uint8)
    for color, (x1, y1, x2, y2) in patches.items():
        pixels[y1:y2, x1:x2] = PATCH_COLORS[color]
    return Image.fromarray(pixels)



def detect(spec: ModelSpec, encoded: list[bytes], **options) -> dict[str, np.ndarray]:
    stage = model_stage(spec, decoder=Decoder(None, 10**8), **options)
    return stage(as_batch(encoded))


def as_array(detections: list[dict]) -> tuple[list[str], np.ndarray]:
    """Labels, and (score, x1, y1, x2, y2) rows."""
    return ([d["label"] for d in detections],
            np.array([[d["score"], d["x1"], d["y1"], d["x2"], d["y2"]] for d in detections]).reshape(-1, 5))


def assert_same_detections(got: list[dict], expected: list[dict], atol: float = 1e-3) -> None:
    (got_labels, got_values), (expected_labels, expected_values) = as_array(got), as_array(expected)
    assert got_labels == expected_labels
    np.testing.assert_allclose(got_values, expected_values, atol=atol)


def boxes_of(detections: list[dict]) -> dict[str, list[float]]:
    return {d["label"]: [d["x1"], d["y1"], d["x2"], d["y2"]] for d in detections}


@pytest.fixture(scope="session")
def color_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("color-boxes")
    torch.manual_seed(0)
    torch.save(ColorBoxes().state_dict(), folder / "color_boxes.pt")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return {"name": "color_boxes:build", "task": "detection", "weights": str(folder / "color_boxes.pt"),
            "labels": str(folder / "labels.txt")}


@pytest.fixture(scope="session")
def frcnn_files(tmp_path_factory) -> dict[str, str]:
    """A real torchvision detector with seeded random weights: its boxes mean nothing, but they are exact."""
    folder = tmp_path_factory.mktemp("frcnn")
    torch.manual_seed(0)
    model = torchvision.models.get_model(FRCNN, weights=None, weights_backbone=None, num_classes=3)
    torch.save(model.state_dict(), folder / "frcnn.pt")
    (folder / "labels.txt").write_text("__background__\ncat\ndog\n")
    return {"name": FRCNN, "weights": str(folder / "frcnn.pt"), "labels": str(folder / "labels.txt")}


def color_spec(files, **detection) -> ModelSpec:
    return resolve_model(ModelConfig(**files, detection=detection), Storage.from_env())


def test_boxes_of_a_resized_photo_are_in_its_own_pixels(color_files):
    # 1600x1200 is resized to 341x256 inside the model: one resized pixel is ~4.7 original ones.
    image = scene(1600, 1200, {"red": (400, 300, 1000, 800), "blue": (100, 900, 300, 1100)})
    out = detect(color_spec(color_files), [encode(image, "PNG")])
    detections = out["detections"][0]
    assert [d["label"] for d in detections] == ["red", "blue"]  # best score first
    assert [d["score"] for d in detections] == pytest.approx([0.8, 0.6])
    boxes = boxes_of(detections)
    np.testing.assert_allclose(boxes["red"], [400, 300, 1000, 800], atol=6)
    np.testing.assert_allclose(boxes["blue"], [100, 900, 300, 1100], atol=6)
    assert (out["image_width"][0], out["image_height"][0], out["num_detections"][0]) == (1600, 1200, 2)


@pytest.mark.parametrize("orientation, rotate_stored", [(6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180),
                                                        (8, Image.Transpose.ROTATE_270)])
def test_boxes_follow_the_exif_orientation(color_files, orientation, rotate_stored):
    # What a viewer sees: 300x200 with a red patch at (30, 20, 120, 80). The file stores the pixels turned
    # the other way and says, in EXIF, how to turn them back.
    shown = scene(300, 200, {"red": (30, 20, 120, 80)})
    stored = shown.transpose(rotate_stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size != shown.size or orientation == 3
    out = detect(color_spec(color_files), [data])
    assert (out["image_width"][0], out["image_height"][0]) == (300, 200)
    np.testing.assert_allclose(boxes_of(out["detections"][0])["red"], [30, 20, 120, 80], atol=2)


def test_threshold_max_detections_and_allow_list(color_files):
    image = encode(scene(320, 240, {"red": (10, 10, 60, 60), "green": (100, 10, 150, 60), "blue": (200, 10, 250, 60)}),
                   "PNG")
    labels = lambda **cfg: [d["label"] for d in detect(color_spec(color_files, **cfg), [image])["detections"][0]]
    assert labels(score_threshold=0.0) == ["red", "green", "blue"]
    assert labels(score_threshold=0.65) == ["red", "green"]
    assert labels(score_threshold=0.0, max_detections=2) == ["red", "green"]
    assert labels(score_threshold=0.0, classes=["blue", "green"]) == ["green", "blue"]
    assert labels(score_threshold=0.0, classes=["blue"], max_detections=1) == ["blue"]


def photos_of_mixed_sizes() -> list[bytes]:
    sizes = [(400, 300), (300, 400), (640, 480), (500, 375), (400, 300), (1024, 256)]
    return [encode(scene(w, h, {"red": (w // 4, h // 4, w // 2, h // 2)}, seed=i), "JPEG", quality=90)
            for i, (w, h) in enumerate(sizes)]


def test_mixed_sizes_in_one_batch_give_what_each_image_gets_alone(frcnn_files):
    spec = resolve_model(ModelConfig(**frcnn_files, outputs=["predictions", "embedding"],
                                     detection={"score_threshold": 0.0}), Storage.from_env())
    photos = photos_of_mixed_sizes()
    together = detect(spec, photos)
    for i, data in enumerate(photos):
        alone = detect(spec, [data])
        assert together["num_detections"][i] == alone["num_detections"][0] > 0
        assert_same_detections(together["detections"][i], alone["detections"][0])
        np.testing.assert_allclose(together["embedding"][i], alone["embedding"][0], atol=1e-5)
    # and within a cap of decoded pixels per model call: one call per image here
    capped = detect(spec, photos, max_batch_megapixels=0.3)
    assert list(capped["num_detections"]) == list(together["num_detections"])


def test_plan_groups_by_padded_size_within_the_caps(frcnn_files):
    spec = resolve_model(ModelConfig(**frcnn_files), Storage.from_env())
    stage = Detector(spec, Storage.from_env(), max_batch_megapixels=0.6)
    shapes = [(300, 400), (400, 300), (300, 400), (480, 640), (300, 400), (300, 400)]
    plan = lambda max_images: [c.tolist() for c in stage.plan(shapes, max_images)]
    # 300x400 and 480x640 both resize to 320x426 and pad to 320x448; 400x300 pads to 448x320.
    # Within the 0.6 MP cap: 0.12 + 0.12 + 0.31 MP, then the rest.
    assert plan(None) == [[0, 2, 3], [4, 5], [1]]
    assert plan(2) == [[0, 2], [3, 4], [5], [1]]


def test_pipeline_detections_equal_a_direct_model_call(frcnn_files, bucket, storage, ray_session):
    photos = photos_of_mixed_sizes()
    for i, data in enumerate(photos):
        storage.write_bytes(f"s3://{bucket}/photos/p{i}.jpg", data)
    storage.write_bytes(f"s3://{bucket}/photos/corrupt.jpg", photos[0][: len(photos[0]) // 3])
    for name in ("weights", "labels"):
        storage.write_bytes(f"s3://{bucket}/model/{name}", open(frcnn_files[name], "rb").read())
    cfg = load_job(None, {"input": f"s3://{bucket}/photos/", "output": f"s3://{bucket}/detections/",
                          "model": FRCNN, "weights": f"s3://{bucket}/model/weights",
                          "labels": f"s3://{bucket}/model/labels", "batch_size": 4})
    cfg.model.detection = DetectionConfig(score_threshold=0.3, max_detections=20)
    summary = run_on_ray(cfg, out=io.StringIO())
    assert (summary.predicted, summary.errors, summary.errors_by_type) == (6, 1, {"decode.truncated": 1})

    table_of_rows = pads.dataset(f"s3://{bucket}/detections/", format="parquet").to_table()
    assert table_of_rows.schema == output_schema("detection")
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in table_of_rows.to_pylist()}

    model = torchvision.models.get_model(FRCNN, weights=None, weights_backbone=None, num_classes=3)
    model.load_state_dict(torch.load(frcnn_files["weights"], weights_only=True))
    model.eval()
    labels = ["__background__", "cat", "dog"]
    for i, data in enumerate(photos):
        pixels = torchvision.transforms.functional.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
        with torch.inference_mode():
            expected = model([pixels.float() / 255])[0]
        keep = expected["scores"] >= 0.3
        expected_rows = sorted(([labels[int(l)], float(s), *b.tolist()] for l, s, b in
                                zip(expected["labels"][keep], expected["scores"][keep], expected["boxes"][keep])),
                               key=lambda r: -r[1])[:20]
        got = rows[f"p{i}.jpg"]["detections"]
        assert len(got) == len(expected_rows) == rows[f"p{i}.jpg"]["num_detections"] > 0
        for d, e in zip(sorted(got, key=lambda d: (-d["score"], d["x1"], d["y1"])),
                        sorted(expected_rows, key=lambda r: (-r[1], r[2], r[3]))):
            assert d["label"] == e[0] and d["score"] == pytest.approx(e[1], abs=1e-6)
            np.testing.assert_allclose([d["x1"], d["y1"], d["x2"], d["y2"]], e[2:], atol=1e-3)
            assert 0 <= d["x1"] <= d["x2"] <= rows[f"p{i}.jpg"]["image_width"]
            assert 0 <= d["y1"] <= d["y2"] <= rows[f"p{i}.jpg"]["image_height"]
    corrupt = rows["corrupt.jpg"]
    assert corrupt["error_type"] == "decode.truncated" and corrupt["detections"] is None
    assert corrupt["num_detections"] is None

    per_label = duckdb.sql("""
        SELECT det.label, count(*) AS boxes FROM (
            SELECT unnest(detections) AS det FROM table_of_rows)
        GROUP BY det.label ORDER BY det.label""").fetchall()
    from collections import Counter
    counts = Counter(d["label"] for r in rows.values() for d in (r["detections"] or []))
    assert per_label == sorted(counts.items())


@pytest.mark.parametrize("name", detection_models())
def test_every_torchvision_detector_runs_in_the_stage(name):
    torch.manual_seed(0)
    spec = ModelSpec(name=name, weights_name=None, checkpoint=None, weights_id="none", labels=("bg", "thing"),
                     preprocess=None, top_k=1, task="detection", outputs=("predictions",),
                     detection=DetectionConfig(score_threshold=0.0, max_detections=5))
    out = detect(spec, [encode(scene(160, 120, {"red": (40, 30, 80, 60)}), "JPEG"), b"not an image"])
    assert out["error"][0] is None and out["error_type"][1] == "decode.not_an_image"
    assert out["num_detections"][0] == len(out["detections"][0]) <= 5
    for d in out["detections"][0]:
        assert d["label"] in ("bg", "thing") and 0 <= d["x1"] <= d["x2"] <= 160 and 0 <= d["y1"] <= d["y2"] <= 120


@pytest.mark.parametrize("model, message", [
    ({"name": "fasterrcnn_resnet_fpn"}, "is not a torchvision classification or detection model; did you mean"),
    ({"name": "resnet18", "task": "detection"}, "is a torchvision classification model, but model.task is 'detection'"),
    ({"name": FRCNN, "task": "classification"}, "is a torchvision detection model"),
    ({"name": "pipeline.dev.demo:build_lenet", "task": "detection", "weights": None}, "fails on a list with one 3x96x128 image"),
])
def test_detector_config_mistakes_are_one_line(model, message):
    with pytest.raises(UserError, match=message):
        resolve_model(ModelConfig(**{"weights": "DEFAULT", **model}), Storage.from_env())


def test_allow_list_names_must_be_labels(color_files):
    with pytest.raises(UserError, match="'rde' is not one of color_boxes:build's labels; did you mean red"):
        color_spec(color_files, classes=["rde"])
    with pytest.raises(UserError, match="remove model.preprocess from a detection job"):
        resolve_model(ModelConfig(**color_files, preprocess={"crop_size": 224}), Storage.from_env())


def test_device_decoder_keeps_each_image_at_its_size(color_files):
    from pipeline.decode.device import DeviceDecoder

    shown = scene(300, 200, {"red": (30, 20, 120, 80)})
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(shown.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    png = encode(scene(64, 48, {}), "PNG")
    batch = DeviceDecoder(Decoder(None, 10**8), torch.device("cpu"))(as_batch([rotated, png, b"broken"]))
    pixels = batch.pop("pixels")
    assert [tuple(p.shape) for p in pixels] == [(200, 300, 3), (48, 64, 3), (0, 0, 3)]
    pillow = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(rotated))).convert("RGB"), dtype=int)
    assert np.abs(pixels[0].numpy().astype(int) - pillow).mean() < 2  # another JPEG decoder: rounding differs
    assert (pixels[1].numpy() == np.asarray(Image.open(io.BytesIO(png)))).all()
    assert list(batch["error_type"]) == [None, None, "decode.not_an_image"]
    # and the detector takes them as they are
    stage = Detector(color_spec(color_files), Storage.from_env())
    np.testing.assert_allclose(boxes_of(stage.predict(pixels[:1])["detections"][0])["red"], [30, 20, 120, 80], atol=2)


def test_images_decoded_in_cpu_tasks_cross_the_object_store_to_the_detector(color_files, ray_session):
    """The GPU plan with decode.device: cpu hands whole-size images of different shapes between processes."""
    import ray

    photos = [encode(scene(w, h, {"green": (10, 10, 50, 40)}, seed=w), "JPEG", quality=95)
              for w, h in [(320, 240), (200, 300), (640, 160)]] + [b"broken"]
    items = [{"uri": f"p{i}", "bytes": data, "error": None, "error_type": None} for i, data in enumerate(photos)]
    spec = color_spec(color_files)
    rows = (ray.data.from_items(items, override_num_blocks=1)
            .map_batches(Decoder(None, 10**8), batch_size=None)
            .map_batches(Detector, fn_constructor_kwargs={"spec": spec, "storage": Storage.from_env()},
                         batch_size=None, compute=ray.data.ActorPoolStrategy(size=1), memory=2**28)
            .take_all())
    by_uri = {r["uri"]: r for r in rows}
    for uri in ("p0", "p1", "p2"):
        assert [d["label"] for d in by_uri[uri]["detections"]] == ["green"]
        np.testing.assert_allclose(boxes_of(by_uri[uri]["detections"])["green"], [10, 10, 50, 40], atol=2)
    assert by_uri["p3"]["error_type"] == "decode.not_an_image"


def test_torchvision_detector_weights_by_name():
    """`weights: DEFAULT` for a detector: COCO's labels from torchvision's metadata, weights through its cache.

    No model hub is reachable here, so the cached file holds seeded random weights of the right shape.
    """
    import os

    from conftest import TORCH_HOME

    weights = torchvision.models.get_model_weights(FRCNN).DEFAULT
    folder = os.path.join(TORCH_HOME, "hub", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(2)
    model = torchvision.models.get_model(FRCNN, weights=None, weights_backbone=None,
                                         num_classes=len(weights.meta["categories"]))
    torch.save(model.state_dict(), os.path.join(folder, os.path.basename(weights.url)))

    spec = resolve_model(ModelConfig(name=FRCNN, weights="DEFAULT", detection={"score_threshold": 0.0}),
                         Storage.from_env())
    assert spec.task == "detection" and spec.weights_id == str(weights)
    assert spec.labels == tuple(weights.meta["categories"]) and spec.labels[1] == "person"
    out = detect(spec, [encode(scene(320, 240, {}), "JPEG")])
    assert out["num_detections"][0] > 0
    assert {d["label"] for d in out["detections"][0]} <= set(weights.meta["categories"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_detector_on_gpu_decodes_there_and_agrees_with_the_cpu(frcnn_files, color_files):
    """nvJPEG decode, backbone under bf16 autocast, heads in float32: boxes within a pixel of the CPU's."""
    photos = photos_of_mixed_sizes()
    color = color_spec(color_files)
    on_gpu = model_stage(color, precision="bf16", decoder=Decoder(None, 10**8),
                        decode_on_device=True)
    assert on_gpu.model.device.type == "cuda"
    gpu_rows = on_gpu(as_batch(photos))
    cpu_rows = detect(color, photos)
    for got, expected in zip(gpu_rows["detections"], cpu_rows["detections"]):
        assert [d["label"] for d in got] == [d["label"] for d in expected] == ["red"]
        np.testing.assert_allclose(as_array(got)[1], as_array(expected)[1], atol=1.5)
    spec = resolve_model(ModelConfig(**frcnn_files, detection={"score_threshold": 0.0}), Storage.from_env())
    out = model_stage(spec, precision="bf16", decoder=Decoder(None, 10**8),
                     decode_on_device=True)(as_batch(photos))
    assert all(n > 0 for n in out["num_detections"])


def model_stage(spec, decoder, decode_on_device: bool = False, **options) -> ModelInference:
    """The model stage as a model process runs it, set up: on a GPU process when `decode_on_device`."""
    stage = ModelInference(spec, Storage.from_env(), Resources(gpus=1.0 if decode_on_device else 0.0), decoder,
                           **options)
    stage.setup()
    return stage
