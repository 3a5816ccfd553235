"""The review loop end to end, each step through the `pipeline` command or Label Studio's own API: `pipeline run`
on the S3 server → `pipeline export` of the uncertain rows into a Label Studio project → a reviewer's annotations
made through its API → the project exported as Label Studio's JSON → `pipeline truth import` → `pipeline report
--truth` with the accuracy those answers make."""

from __future__ import annotations

import json
import re
import uuid

import pytest

pytest.importorskip("pipeline.review.truth", reason="needs `pipeline truth import` (the truth helper's branch)")

from conftest import photo_jpeg  # noqa: E402
from pipeline.io.storage import Storage  # noqa: E402
from test_export import pipeline, rows  # noqa: E402

LABELS = ["cat", "dog", "bird", "fish"]


def test_uncertain_rows_reviewed_in_label_studio_score_the_run(s3_server, label_studio, tmp_path):
    storage, bucket = Storage.from_env(), f"loop-{uuid.uuid4().hex[:8]}"
    storage.s3_client.create_bucket(Bucket=bucket)
    for seed in range(10):
        storage.write_bytes(f"s3://{bucket}/photos/p{seed}.jpg", photo_jpeg(seed))
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    output = f"s3://{bucket}/labels"
    ran = pipeline("run", "--input", f"s3://{bucket}/photos/", "--output", output, "--model", "counting_model:build",
                   "--labels", str(tmp_path / "labels.txt"), "--executor", "local")
    assert ran.returncode == 0, ran.stderr[-3000:]

    exported = pipeline("export", output, "--to", "label-studio", "--select", "uncertain:6", "-o", label_studio.url,
                        env={"LABEL_STUDIO_API_KEY": label_studio.token})
    assert exported.returncode == 0, exported.stderr
    project = int(re.search(r"Label Studio project (\d+)", exported.stdout).group(1))

    # The reviewer agrees with the model on four tasks and corrects two.
    predicted = {r["uri"]: r["label"] for r in rows(storage, output)}
    tasks = label_studio.api(f"/api/tasks?project={project}&fields=all&page_size=100")["tasks"]
    assert len(tasks) == 6
    for i, task in enumerate(sorted(tasks, key=lambda t: t["data"]["uri"])):
        label = predicted[task["data"]["uri"]]
        answer = label if i < 4 else next(other for other in LABELS if other != label)
        label_studio.api(f"/api/tasks/{task['id']}/annotations", {
            "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                        "value": {"choices": [answer]}}], "was_cancelled": False})

    answers = label_studio.api(f"/api/projects/{project}/export?exportType=JSON")
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    imported = pipeline("truth", "import", output, str(tmp_path / "answers.json"))
    assert imported.returncode == 0, imported.stderr
    report = pipeline("report", output, "--truth", "-o", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr
    assert re.search(r"accuracy 66\.7% on 6 reviewed inputs \(4 right\)", report.stdout), report.stdout
