"""jobs/tag_archive.yaml end to end on the test S3 server, and the README's DuckDB queries run as written."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from color_boxes import LABELS, ColorBoxes
from conftest import download_prefix, encode, ensure_bucket
from pipeline.cli.commands import main
from test_detection import scene

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "photo-archive"  # the job spec's own bucket, so the spec runs unchanged

PHOTOS = {
    "incoming/2019/beach-0001.jpg": {"red": (40, 150, 200, 230), "blue": (0, 0, 320, 60)},
    "incoming/2019/beach-0002.jpg": {"red": (50, 140, 210, 230), "blue": (0, 0, 320, 70)},
    "incoming/2019/forest-0001.jpg": {"green": (20, 20, 300, 220)},
    "incoming/2020/lake view 01.png": {"blue": (60, 100, 260, 200)},
    "incoming/2020/market-0001.jpg": {"red": (10, 10, 60, 60), "green": (100, 10, 150, 60), "blue": (200, 10, 250, 60)},
    "incoming/2020/empty-room.jpg": {},
}


def readme_queries() -> list[str]:
    """The SQL blocks of the README's "Tag a photo archive" section, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Tag a photo archive", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


@pytest.fixture
def archive(storage, tmp_path):
    ensure_bucket(storage, BUCKET)
    for i, (key, patches) in enumerate(PHOTOS.items()):
        image = scene(320, 240, patches, seed=i)
        storage.write_bytes(f"s3://{BUCKET}/{key}", encode(image, "PNG" if key.endswith(".png") else "JPEG", quality=92))
    storage.write_bytes(f"s3://{BUCKET}/incoming/2020/broken.jpg", encode(scene(320, 240, {}), "JPEG")[:500])
    storage.write_bytes(f"s3://{BUCKET}/incoming/README.txt", b"not a photo")
    torch.manual_seed(0)
    weights, labels = tmp_path / "color_boxes.pt", tmp_path / "labels.txt"
    torch.save(ColorBoxes().state_dict(), weights)
    labels.write_text("\n".join(LABELS) + "\n")
    storage.write_bytes(f"s3://{BUCKET}/models/color_boxes.pt", weights.read_bytes())
    storage.write_bytes(f"s3://{BUCKET}/models/labels.txt", labels.read_bytes())
    yield
    storage.remove_folder(f"s3://{BUCKET}/tags/")


def test_tag_archive_job_and_the_readme_queries(archive, storage, ray_session, tmp_path, monkeypatch, capsys):
    code = main(["run", str(ROOT / "jobs" / "tag_archive.yaml"), "--model", "color_boxes:build",
                 "--weights", f"s3://{BUCKET}/models/color_boxes.pt", "--labels", f"s3://{BUCKET}/models/labels.txt"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "predicted   6" in out and "errors      1" in out and "1 other files skipped" in out
    assert "detections  9 in 5 images" in out

    rows = {r["uri"]: r for r in pads.dataset(f"s3://{BUCKET}/tags/", format="parquet").to_table().to_pylist()}
    assert len(rows) == 7 and rows[f"s3://{BUCKET}/incoming/2020/broken.jpg"]["error_type"] == "decode.truncated"
    photos_per_label = defaultdict(set)
    for uri, row in rows.items():
        for d in row["detections"] or []:
            photos_per_label[d["label"]].add(uri)
    assert {label: len(uris) for label, uris in photos_per_label.items()} == {"red": 3, "green": 2, "blue": 4}
    beach = rows[f"s3://{BUCKET}/incoming/2019/beach-0001.jpg"]
    np.testing.assert_allclose([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in beach["detections"]],
                               [[40, 150, 200, 230], [0, 0, 320, 60]], atol=2)

    # The analyst's copy of the output, then the README's queries, character for character.
    local = tmp_path / "analyst"
    download_prefix(storage, BUCKET, "tags/", local)
    monkeypatch.chdir(local)
    per_label, similar = readme_queries()

    assert duckdb.sql(per_label).fetchall() == [("blue", 4, 4), ("red", 3, 3), ("green", 2, 2)]

    ranked = duckdb.sql(similar).fetchall()
    predicted = [uri for uri, row in rows.items() if row["embedding"] is not None]
    vectors = np.array([rows[uri]["embedding"] for uri in predicted])
    similarity = vectors @ np.asarray(beach["embedding"])
    order = sorted(range(len(predicted)), key=lambda i: (-round(float(similarity[i]), 5), predicted[i]))
    assert [uri for uri, _ in ranked] == [predicted[i] for i in order][:10]
    assert ranked[0] == (beach["uri"], pytest.approx(1.0, abs=1e-5))
    assert ranked[1][0].endswith("beach-0002.jpg")  # the other beach looks most alike

    # Tomorrow night, one new photo: only it is tagged; the archive's rows stay as they are.
    storage.write_bytes(f"s3://{BUCKET}/incoming/2021/new-0001.jpg", encode(scene(320, 240, {"red": (5, 5, 90, 90)}), "JPEG"))
    assert main(["run", str(ROOT / "jobs" / "tag_archive.yaml"), "--model", "color_boxes:build",
                 "--weights", f"s3://{BUCKET}/models/color_boxes.pt",
                 "--labels", f"s3://{BUCKET}/models/labels.txt"]) == 0
    out = capsys.readouterr().out
    assert "inputs      1" in out and "unchanged   7" in out
    assert len(pads.dataset(f"s3://{BUCKET}/tags/", format="parquet").to_table()) == 8
