"""The README's review-loop commands in a subprocess, on outputs `pipeline run` (local executor) wrote on the S3
server: `pipeline truth import OUTPUT s3://…/FILE` then `pipeline report OUTPUT --truth`, whose printed accuracy is
the one the answers make; each format with another tool's file; and the loop's commands in order (dedup, export,
truth import, report) on local outputs of each format. (A detector's mAP@0.5 through the command:
tests/test_truth.py, on a detection output written in-process.)"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import encode, photo
from pipeline.io.storage import Storage
from pipeline.report.outputs import open_output_for_reading

TESTS = Path(__file__).parent
LABELS = ["cat", "dog", "bird"]


def pipeline(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def predictions(storage: Storage, output: str, catalog: dict | None) -> dict[str, dict]:
    """uri -> row, read back through the format's own reader (pyarrow, delta-rs, pyiceberg)."""
    table = open_output_for_reading(storage, output, catalog)
    return {row["uri"]: row for batch in table.rows().batches(storage, ["uri", "label"])
            for row in batch.to_pylist()}


def csv_answers(answers: dict[str, str]) -> bytes:
    text = io.StringIO()
    csv.writer(text, dialect="excel").writerows([("image", "class"), *answers.items()])
    return ("\ufeff" + text.getvalue()).encode()  # Excel's CSV UTF-8


def label_studio_answers(answers: dict[str, str]) -> bytes:
    tasks = [{"id": i, "data": {"image": uri, "uri": uri},
              "annotations": [{"id": i, "completed_by": 1, "was_cancelled": False, "updated_at": "2026-12-06T10:00:00Z",
                               "result": [{"type": "choices", "from_name": "choice", "to_name": "image",
                                           "value": {"choices": [label]}}]}]} for i, (uri, label) in
             enumerate(answers.items())]
    return json.dumps(tasks).encode()


def coco_answers(answers: dict[str, str]) -> bytes:
    ids = {label: i + 1 for i, label in enumerate(LABELS)}
    return json.dumps({"images": [{"id": i + 1, "file_name": uri, "width": 96, "height": 72}
                                  for i, uri in enumerate(answers)],
                       "categories": [{"id": i, "name": label} for label, i in ids.items()],
                       "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": ids[label]}
                                       for i, label in enumerate(answers.values())]}).encode()


@pytest.mark.parametrize("fmt, write_answers, source", [("parquet", csv_answers, "csv"),
                                                        ("delta", label_studio_answers, "label-studio"),
                                                        ("iceberg", coco_answers, "coco")])
def test_truth_import_then_report_truth(fmt, write_answers, source, storage, bucket, tmp_path):
    for i in range(6):
        storage.write_bytes(f"s3://{bucket}/in/p{i}.jpg", encode(photo(seed=i), "JPEG"))
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    output, catalog = f"s3://{bucket}/out", None
    spec = {"input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": output, "format": fmt},
            "model": {"name": "counting_model:build", "labels": str(tmp_path / "labels.txt"),
                      "preprocess": {"resize_size": 32, "crop_size": 32}},
            "compute": {"executor": "local"}}
    if fmt == "iceberg":
        catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db"}
        spec["output"]["catalog"] = catalog
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    pipeline("run", str(tmp_path / "job.yaml"))
    predicted = {uri: row["label"] for uri, row in predictions(storage, output, catalog).items()}
    assert len(predicted) == 6
    # Four answers agree with the model, two do not: accuracy 4/6.
    answers = {uri: label if i < 4 else LABELS[(LABELS.index(label) + 1) % 3]
               for i, (uri, label) in enumerate(sorted(predicted.items()))}
    answers[f"s3://{bucket}/in/gone.jpg"] = "cat"
    storage.write_bytes(f"s3://{bucket}/answers", write_answers(answers))
    flags = [arg for key, value in (catalog or {}).items() for arg in ("--catalog", f"{key}={value}")]
    imported = pipeline("truth", "import", output, f"s3://{bucket}/answers", "--reviewer", "ann", *flags).stdout
    assert f"Imported 7 answer(s) ({source})" in imported, imported
    assert "1 of 7 answers name inputs the output does not have" in imported
    report = pipeline("report", output, "--truth", "-o", str(tmp_path / "r.html"), *flags).stdout
    assert "accuracy 66.7% on 6 reviewed inputs (4 right)" in report, report
    assert "Truth: 7 reviewed input(s), 1 of them predicted by no live run" in report


def test_a_bad_answers_file_is_one_line_exit_2(tmp_path):
    from output_driver import run_once

    output = str(tmp_path / "out")
    run_once(output, "parquet", 3, storage=Storage.from_env())
    (tmp_path / "export.json").write_text('[{"id": 1, "data": {"image": "s3://photos/img-00000.jpg"}, '
                                          '"annotations": [{"result": [{"type": "choices", "value": 5}]}]}]')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pipeline", "truth", "import", output, str(tmp_path / "export.json")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'export.json'}: not a label-studio file as expected")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_the_review_commands_on_a_local_output(fmt, tmp_path):
    """The loop's commands in order on an output on local disk: dedup, export (COCO, read by pycocotools), truth
    import of a spreadsheet's CSV, and the report's accuracy."""
    from pycocotools.coco import COCO

    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"p{i}.jpg").write_bytes(encode(photo(seed=i), "JPEG"))
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    output = str(tmp_path / "out")
    pipeline("run", "--input", str(tmp_path / "in"), "--output", output, "--format", fmt, "--model",
             "counting_model:build", "--labels", str(tmp_path / "labels.txt"), "--executor", "local")
    predicted = {uri: row["label"] for uri, row in predictions(Storage(), output, None).items()}  # a local
    # Iceberg output's catalog lives inside it, and every command finds it there
    assert "0 near-duplicate group(s)" in pipeline("dedup", output).stdout
    pipeline("export", output, "--to", "coco", "--select", "random:3", "-o", str(tmp_path / "review.json"))
    assert {image["file_name"] for image in COCO(str(tmp_path / "review.json")).dataset["images"]} <= set(predicted)
    answers = {uri: label if i < 3 else LABELS[(LABELS.index(label) + 1) % 3]
               for i, (uri, label) in enumerate(sorted(predicted.items()))}
    (tmp_path / "answers.csv").write_bytes(csv_answers(answers))
    assert "Imported 4 answer(s) (csv)" in pipeline("truth", "import", output, str(tmp_path / "answers.csv")).stdout
    report = pipeline("report", output, "--truth", "-o", str(tmp_path / "r.html")).stdout
    assert "accuracy 75.0% on 4 reviewed inputs (3 right)" in report, report
    if fmt == "parquet":  # a user's mistakes with export: one line each, exit 2, nothing written
        for args, said in [(["--select", "uncertain:many"], "--select"),
                           (["-o", f"http://127.0.0.1:{free_port()}"], "127.0.0.1")]:
            bad = subprocess.run([sys.executable, "-m", "pipeline", "export", output, "--to", "label-studio", *args],
                                 capture_output=True, text=True, timeout=120)
            assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and said in bad.stderr, bad.stderr
            assert "Traceback" not in bad.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
