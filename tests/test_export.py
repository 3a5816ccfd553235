"""`pipeline export`: outputs written by `pipeline run` (local executor) on the S3 server, exported through the CLI
for review and read back by the tools' own readers: pycocotools (COCO, and loadRes for a detector's scored boxes),
ElementTree (CVAT 1.1 XML), and a real Label Studio server (tests/label_studio_server.py) whose API returns the
imported tasks with their predictions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from xml.etree import ElementTree as ET

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import yaml
from PIL import Image, ImageDraw

from conftest import encode, photo_jpeg
from pipeline.io.storage import Storage

TESTS = os.path.dirname(os.path.abspath(__file__))
COLORS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}  # tests/color_boxes.py scores them
SCENES = {"s0-red": ["red"], "s1-blue": ["blue"], "s2-green-blue": ["green", "blue"], "s3-red-green": ["red", "green"],
          "s4-none": []}  # 0.8, 0.7, 0.6 each


def pipeline(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
                               **(env or {})})


def scene(colors: list[str]) -> bytes:
    image = Image.new("RGB", (200, 150), (110, 110, 110))
    draw = ImageDraw.Draw(image)
    for i, color in enumerate(colors):
        draw.rectangle([10 + 90 * i, 20 + 10 * i, 80 + 90 * i, 110 + 10 * i], fill=COLORS[color])
    return encode(image, "JPEG", quality=95)


def run_job(tmp, spec: dict, name: str) -> None:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = pipeline("run", str(path), "--executor", "local")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, s3_server):
    """A classifier's and a detector's output on S3, each from one real `pipeline run`."""
    tmp = tmp_path_factory.mktemp("export")
    storage, bucket = Storage.from_env(), f"export-{uuid.uuid4().hex[:8]}"
    storage.s3_client.create_bucket(Bucket=bucket)
    for seed in range(16):
        storage.write_bytes(f"s3://{bucket}/photos/p{seed:02d}.jpg", photo_jpeg(seed))
    storage.write_bytes(f"s3://{bucket}/photos/broken.jpg", photo_jpeg(99)[:500])
    for name, colors in SCENES.items():
        storage.write_bytes(f"s3://{bucket}/scenes/{name}.jpg", scene(colors))
    (tmp / "labels.txt").write_text("cat\ndog\nbird\nfish\n")
    (tmp / "colors.txt").write_text("__background__\nred\ngreen\nblue\n")
    run_job(tmp, {"input": {"uri": f"s3://{bucket}/photos/"}, "output": {"uri": f"s3://{bucket}/classified"},
                  "model": {"name": "counting_model:build", "labels": str(tmp / "labels.txt")}}, "classify")
    run_job(tmp, {"input": {"uri": f"s3://{bucket}/scenes/"}, "output": {"uri": f"s3://{bucket}/detected"},
                  "model": {"name": "color_boxes:build", "task": "detection", "labels": str(tmp / "colors.txt")}},
            "detect")
    return {"bucket": bucket, "storage": storage, "classified": f"s3://{bucket}/classified",
            "detected": f"s3://{bucket}/detected", "tmp": tmp}


def rows(storage: Storage, uri: str) -> list[dict]:
    fs, path = storage.fs(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


def least_margin(table: list[dict], n: int) -> list[str]:
    """The n rows whose top two scores are closest, worked out here from the Parquet rows."""
    good = [r for r in table if r["error"] is None]
    return [r["uri"] for r in sorted(good, key=lambda r: (r["topk_scores"][0] - r["topk_scores"][1], r["uri"]))[:n]]


@pytest.mark.parametrize("to", ["label-studio", "coco", "cvat"])
def test_the_least_margin_rows_in_each_format(outputs, to):
    storage, bucket = outputs["storage"], outputs["bucket"]
    table = rows(storage, outputs["classified"])
    run_id, expected = table[0]["run_id"], least_margin(table, 5)
    target = f"s3://{bucket}/exports/{to}.{'xml' if to == 'cvat' else 'json'}"
    result = pipeline("export", outputs["classified"], "--to", to, "--select", "uncertain:5", "--by", "margin",
                      "-o", target)
    assert result.returncode == 0, result.stderr
    assert f"Exported 5 of 16 eligible rows of run {run_id}" in result.stdout  # the broken photo never
    document = storage.read_bytes(target)
    by_uri = {r["uri"]: r for r in table}
    if to == "label-studio":
        tasks = json.loads(document)
        assert [t["data"]["uri"] for t in tasks] == expected == [t["data"]["image"] for t in tasks]
        for task in tasks:
            prediction = task["predictions"][0]
            assert prediction["model_version"] == f"{run_id} counting_model:build"
            assert prediction["result"][0]["value"]["choices"] == [by_uri[task["data"]["uri"]]["label"]]
        config = ET.fromstring(storage.read_bytes(f"s3://{bucket}/exports/label-studio.label_config.xml"))
        assert [c.get("value") for c in config.iter("Choice")] == ["bird", "cat", "dog", "fish"][:len(
            list(config.iter("Choice")))]
    elif to == "coco":
        coco = load_coco(outputs["tmp"] / "coco.json", document)
        assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == expected
        for annotation in coco.dataset["annotations"]:
            row = by_uri[coco.imgs[annotation["image_id"]]["file_name"]]
            assert coco.cats[annotation["category_id"]]["name"] == row["label"]
            assert annotation["bbox"] == [0, 0, row["image_width"], row["image_height"]]
    else:
        images = ET.fromstring(document).findall("image")
        assert [image.get("name") for image in images] == expected
        assert [image.find("tag").get("label") for image in images] == [by_uri[u]["label"] for u in expected]


def load_coco(path, document: bytes):
    from pycocotools.coco import COCO

    path.write_bytes(document)
    return COCO(str(path))


def test_a_detector_s_images_with_boxes_in_the_band(outputs, tmp_path):
    """Boxes scored 0.6 and 0.7 are in the default band 0.3:0.7, 0.8 is not: the image with two doubtful boxes
    first, then one near the middle, then one at the band's edge; the red-only and empty scenes never."""
    storage = outputs["storage"]
    table = {r["uri"].rsplit("/", 1)[1]: r for r in rows(storage, outputs["detected"])}
    expected = ["s2-green-blue.jpg", "s1-blue.jpg", "s3-red-green.jpg"]
    coco_file, cvat_file, tasks_file = tmp_path / "d.json", tmp_path / "d.xml", tmp_path / "tasks.json"
    for to, target in (("coco", coco_file), ("cvat", cvat_file), ("label-studio", tasks_file)):
        result = pipeline("export", outputs["detected"], "--to", to, "--select", "uncertain:10", "-o", str(target))
        assert result.returncode == 0, result.stderr
    coco = load_coco(coco_file, coco_file.read_bytes())
    names = [coco.imgs[i]["file_name"].rsplit("/", 1)[1] for i in sorted(coco.imgs)]
    assert names == expected
    results = coco.loadRes(coco.dataset["annotations"])  # the scored boxes as pycocotools' detection results
    for image_id, name in zip(sorted(coco.imgs), names):
        boxes = [(coco.cats[a["category_id"]]["name"], a["bbox"], a["score"])
                 for a in results.imgToAnns[image_id]]
        assert boxes == [(d["label"], pytest.approx([d["x1"], d["y1"], d["x2"] - d["x1"], d["y2"] - d["y1"]]),
                          pytest.approx(d["score"])) for d in table[name]["detections"]]
    images = ET.fromstring(cvat_file.read_bytes()).findall("image")
    assert [(i.get("name").rsplit("/", 1)[1], [b.get("label") for b in i.findall("box")]) for i in images] == [
        (name, [d["label"] for d in table[name]["detections"]]) for name in expected]
    task = json.loads(tasks_file.read_text())[0]
    row, box = table[expected[0]], json.loads(tasks_file.read_text())[0]["predictions"][0]["result"][0]["value"]
    detection = row["detections"][0]
    assert box["x"] == pytest.approx(100 * detection["x1"] / row["image_width"])
    assert box["height"] == pytest.approx(100 * (detection["y2"] - detection["y1"]) / row["image_height"])
    assert task["data"]["uri"] == row["uri"]
    config = ET.fromstring((tmp_path / "tasks.label_config.xml").read_text())
    assert [label.get("value") for label in config.iter("Label")] == ["blue", "green", "red"]

    other_band = pipeline("export", outputs["detected"], "--to", "coco", "--band", "0.75:0.85", "-o", str(coco_file))
    assert other_band.returncode == 0, other_band.stderr
    assert sorted(i["file_name"].rsplit("/", 1)[1] for i in json.loads(coco_file.read_text())["images"]) == [
        "s0-red.jpg", "s3-red-green.jpg"]


def test_tasks_go_into_a_label_studio_project_with_their_predictions(outputs, label_studio):
    """Through Label Studio's API as a reviewer's browser sees it; images as presigned URLs that fetch the photo."""
    storage = outputs["storage"]
    result = pipeline("export", outputs["classified"], "--to", "label-studio", "--select", "random:4",
                      "--per-label", "1", "--presign", "600", "-o", label_studio.url,
                      env={"LABEL_STUDIO_API_KEY": label_studio.token})
    assert result.returncode == 0, result.stderr
    assert label_studio.token not in result.stdout + result.stderr
    project = int(re.search(r"Label Studio project (\d+), (\S+)", result.stdout).group(1))
    assert f"{label_studio.url}/projects/{project}/data" in result.stdout
    config = label_studio.api(f"/api/projects/{project}")["label_config"]
    assert '<Choices name="label" toName="image"' in config
    tasks = label_studio.api(f"/api/tasks?project={project}&fields=all&page_size=100")["tasks"]
    table = {r["uri"]: r for r in rows(storage, outputs["classified"])}
    assert len(tasks) == 4 and {t["data"]["uri"] for t in tasks} <= set(table)
    for task in tasks:
        row = table[task["data"]["uri"]]
        prediction = task["predictions"][0]
        assert prediction["model_version"] == f"{row['run_id']} counting_model:build"
        assert prediction["score"] == pytest.approx(row["score"], abs=1e-5)
        assert prediction["result"][0]["value"]["choices"] == [row["label"]]
        assert task["data"]["run_id"] == row["run_id"]
        with urllib.request.urlopen(task["data"]["image"], timeout=30) as image:  # a reviewer's browser loads it
            assert image.read() == storage.read_bytes(row["uri"])
    # A personal access token (Label Studio 1.14+'s default) works too; random:N, seeded by the run id, picks the
    # same rows again.
    personal = label_studio.api("/api/token/", {})["token"]
    again = pipeline("export", outputs["classified"], "--to", "label-studio", "--select", "random:4", "--per-label",
                     "1", "-o", label_studio.url, env={"LABEL_STUDIO_API_KEY": personal})
    assert again.returncode == 0, again.stderr
    second = int(re.search(r"Label Studio project (\d+)", again.stdout).group(1))
    tasks_again = label_studio.api(f"/api/tasks?project={second}&fields=all&page_size=100")["tasks"]
    assert second != project and {t["data"]["uri"] for t in tasks_again} == {t["data"]["uri"] for t in tasks}

    refused = pipeline("export", outputs["classified"], "--to", "label-studio", "-o", label_studio.url,
                       env={"LABEL_STUDIO_API_KEY": "not-a-key"})
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "refused the API key" in refused.stderr
    assert "not-a-key" not in refused.stderr


def test_near_duplicates_are_left_out_for_their_representative(outputs, tmp_path):
    """With `<output>_dedup` written (as `pipeline dedup` writes it), a group's other members are never exported."""
    from pipeline.review.tables import SiblingTable

    storage = outputs["storage"]
    table = [r for r in rows(storage, outputs["classified"]) if r["error"] is None]
    ranked = sorted(table, key=lambda r: (r["score"], r["uri"]))  # least confident first
    member, representative = ranked[0]["uri"], ranked[-1]["uri"]
    dedup = SiblingTable.for_output(storage, outputs["classified"], "dedup")
    dedup.overwrite(pa.table({"uri": [representative, member], "group_id": ["g1", "g1"],
                              "representative": [representative, representative], "method": ["phash", "phash"],
                              "distance": pa.array([0, 3], pa.int32()), "run_id": [ranked[0]["run_id"]] * 2}))
    try:
        result = pipeline("export", outputs["classified"], "--to", "coco", "--select", "uncertain:3",
                          "-o", str(tmp_path / "c.json"))
    finally:
        dedup.overwrite(pa.table({"uri": pa.array([], pa.string()), "representative": pa.array([], pa.string())}))
    assert result.returncode == 0, result.stderr
    assert "1 near-duplicates left out" in result.stdout
    names = [i["file_name"] for i in json.loads((tmp_path / "c.json").read_text())["images"]]
    assert names == [r["uri"] for r in ranked[1:4]]


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_delta_and_iceberg_outputs_export_alike(s3_server, tmp_path, fmt):
    """The table formats' rows through their own readers (written here without a model: tests/output_driver.py)."""
    from output_driver import run_once

    storage, bucket = Storage.from_env(), f"export-{fmt}-{uuid.uuid4().hex[:8]}"
    storage.s3_client.create_bucket(Bucket=bucket)
    output, catalog = f"s3://{bucket}/out", tmp_path / "catalog.db"
    run_id = run_once(output, fmt, 8, catalog_db=str(catalog) if fmt == "iceberg" else None)["run_id"]
    where = ["--catalog", "type=sql", "--catalog", f"uri=sqlite:///{catalog}"] if fmt == "iceberg" else []
    result = pipeline("export", output, *where, "--to", "label-studio", "--select", "label=cat",
                      "-o", str(tmp_path / "tasks.json"))
    assert result.returncode == 0, result.stderr
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    cats = [i for i in range(8) if i % 5 % 2]  # output_driver labels rows cat and dog by turns, 5 rows a batch
    assert [t["data"]["uri"] for t in tasks] == [f"s3://photos/img-{i:05d}.jpg" for i in cats]
    assert {t["data"]["run_id"] for t in tasks} == {run_id}
