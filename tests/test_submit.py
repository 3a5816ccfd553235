"""`pipeline submit` against a real Ray head started here (`ray start --head` on 127.0.0.1, dashboard and job
API on), and the pipeline's Prometheus metrics read back from that node's metrics endpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import photo_jpeg
from inventories import Entry, entry_of, write_inventory
from pipeline.cli.commands import main
from pipeline.io.storage import Storage
from ray_cluster import DashboardHead

TESTS = Path(__file__).parent
INPUTS = 48


@pytest.fixture(scope="module")
def head(s3_server, gcs_server, azurite_server):
    # The head's processes inherit the S3 server's endpoint and credentials (and the GCS and Azure emulators')
    # from this environment, as a cluster's pods get theirs from their service account; the counting model
    # imports from tests/.
    # `pipeline` is on the PATH of the cluster's image; here, that is this virtualenv's bin folder.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    with DashboardHead(cpus=2, env={"PYTHONPATH": str(TESTS), "PIPELINE_TEST_DELAY_S": "0.5", "PATH": path}) as cluster:
        yield cluster


def job_spec(tmp_path: Path, bucket: str, input_prefix: str = "in") -> str:
    path = tmp_path / "nightly.yaml"
    path.write_text(json.dumps({
        "input": {"uri": f"s3://{bucket}/{input_prefix}/"},
        "output": {"uri": f"s3://{bucket}/predictions/"},
        "model": {"name": "counting_model:build", "preprocess": {"resize_size": 64, "crop_size": 64}},
        "compute": {"batch_size": 4, "max_actors": 2, "memory_per_actor_gb": 0.5}}))
    return str(path)


def metric(text: str, name: str, output: str) -> float | None:
    """The value of `name` (any suffix Ray's exporter adds) for this output folder, from a /metrics page."""
    for line in text.splitlines():
        if line.startswith("ray_" + name) and f'output="{output}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_submit_runs_the_job_on_the_cluster_and_exports_metrics(head, storage, bucket, tmp_path):
    for i in range(INPUTS):
        storage.s3_client.put_object(Bucket=bucket, Key=f"in/img {i:03d}.jpg", Body=photo_jpeg(i))
    output = f"s3://{bucket}/predictions/"
    command = [sys.executable, "-m", "pipeline", "submit", job_spec(tmp_path, bucket), "--address", head.dashboard_url]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # While it runs, the driver's counters and the actors' batch latencies reach the node's metrics endpoint.
    seen, latency, page, deadline = None, False, "", time.monotonic() + 240
    while time.monotonic() < deadline and not (seen and latency):
        if proc.poll() is not None:  # the last report can follow the driver's exit by a reporting interval
            deadline = min(deadline, time.monotonic() + 10)
        try:
            with urllib.request.urlopen(head.metrics_url, timeout=5) as reply:
                page = reply.read().decode()
        except OSError:
            pass
        seen = metric(page, "pipeline_images_done", output) or seen
        latency = latency or "ray_pipeline_batch_latency_seconds_bucket" in page
        time.sleep(0.5)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert seen and 0 < seen <= INPUTS and latency, page[-3000:]
    names = {line.split("{")[0] for line in page.splitlines() if line.startswith("ray_pipeline")}
    assert {"ray_pipeline_images_done_total", "ray_pipeline_images_per_second",
            "ray_pipeline_batch_latency_seconds_bucket"} <= names  # the names infra/README.md's queries use
    assert re.search(r"Submitted pipeline-\S+ to http://127\.0\.0\.1:\d+", out)
    assert f"predicted   {INPUTS}" in out and "completed" in out  # the driver's own summary, streamed back
    rows = pads.dataset(output, format="parquet").to_table()
    assert sorted(rows["uri"].to_pylist()) == sorted(f"s3://{bucket}/in/img {i:03d}.jpg" for i in range(INPUTS))


def test_submit_reads_gcs_and_writes_azure(head, tmp_path):
    """Inputs on gs://, predictions on az://, the job run on the cluster: each store reached from its nodes."""
    storage = Storage.from_env()
    name = f"submit-{uuid.uuid4().hex[:10]}"
    storage.gcs.client.create_bucket(name)
    storage.azure.service(None).create_container(name)
    photos = [f"gs://{name}/in/img {i:02d}.jpg" for i in range(8)]
    for i, uri in enumerate(photos):
        storage.write_bytes(uri, photo_jpeg(i))
    spec = tmp_path / "clouds.yaml"
    spec.write_text(json.dumps({"input": {"uri": f"gs://{name}/in/"}, "output": {"uri": f"az://{name}/predictions"},
                                "model": {"name": "counting_model:build"}, "compute": {"batch_size": 4}}))
    result = subprocess.run([sys.executable, "-m", "pipeline", "submit", str(spec), "--address", head.dashboard_url],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fs, path = storage.fs(f"az://{name}/predictions")
    rows = pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=["_", "."]).to_table()
    assert sorted(rows["uri"].to_pylist()) == photos and rows["error"].null_count == len(photos)


def test_submit_returns_the_jobs_exit_code_and_its_one_line(head, storage, bucket, tmp_path, capsys):
    code = main(["submit", job_spec(tmp_path, bucket), "--input", "s3://no-such-archive/photos/",
                 "--address", head.dashboard_url])
    out = capsys.readouterr().out
    assert code == 2
    assert "error: input.uri: bucket 'no-such-archive' does not exist" in out
    assert re.search(r"job pipeline-\S+ failed with exit code 2", out)


def test_a_bad_spec_is_refused_before_anything_is_submitted(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text("input: {uri: s3://photos/in/}\noutput: {uri: s3://photos/out/}\nmodel: {name: resnet50, top_kk: 3}\n")
    code = main(["submit", str(spec), "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown key 'model.top_kk'; did you mean 'top_k'?" in err


def test_submit_runs_an_open_vocabulary_job_whose_model_lives_on_s3(head, storage, bucket, tmp_path):
    """A model source beyond torchvision through the job API: open_clip, its config and weights read from S3 on the
    cluster, the vocabulary encoded once and every row tagged; its inputs listed by an S3 Inventory."""
    import open_clip
    import torch

    import tiny_clip

    config = tmp_path / "tiny-submit-clip.json"
    config.write_text(json.dumps(tiny_clip.CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    weights = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(config.stem).state_dict(), weights)
    storage.write_bytes(f"s3://{bucket}/models/tiny-submit-clip.json", config.read_bytes())
    storage.write_bytes(f"s3://{bucket}/models/clip.pt", weights.read_bytes())
    for i in range(8):
        storage.s3_client.put_object(Bucket=bucket, Key=f"shapes/{i}.jpg", Body=photo_jpeg(i))
    # The inputs from an S3 Inventory (CSV) read on the cluster: a delete marker and a key outside the prefix are none.
    entries = [entry_of(storage, bucket, f"shapes/{i}.jpg") for i in range(8)]
    entries += [Entry("shapes/gone.jpg", None, None, is_delete_marker=True), Entry("other/0.jpg")]
    write_inventory(storage, f"s3://{bucket}", bucket, entries, "CSV")
    spec = tmp_path / "tags.yaml"
    spec.write_text(json.dumps({
        "input": {"uri": f"s3://{bucket}/inventories/{bucket}/daily/", "prefix": "shapes/"},
        "output": {"uri": f"s3://{bucket}/tags/"},
        "model": {"source": "open_clip", "name": f"s3://{bucket}/models/tiny-submit-clip.json",
                  "pretrained": f"s3://{bucket}/models/clip.pt", "labels": tiny_clip.CLASSES,
                  "zero_shot": {"tag_threshold": 0.0}},
        "compute": {"batch_size": 4, "max_actors": 1, "memory_per_actor_gb": 0.5}}))
    run = subprocess.run([sys.executable, "-m", "pipeline", "submit", str(spec), "--address", head.dashboard_url],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = pads.dataset(f"s3://{bucket}/tags/", format="parquet").to_table().to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(f"s3://{bucket}/shapes/{i}.jpg" for i in range(8))
    assert all(r["error"] is None and r["label"] in tiny_clip.CLASSES for r in rows)
    assert all(sorted(r["tags"]) == sorted(tiny_clip.CLASSES) for r in rows)  # threshold 0: every label
