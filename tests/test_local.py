"""The local executor (pipeline/local/): a job on this machine without Ray, the model in one process of its own.

What it shares with Ray (exactly once, resume, poison inputs, the build crash) is tested on both executors where
those behaviours are (test_crash.py, test_incremental.py, test_pipeline.py); here is what is its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.dataset as pads
import pytest

from conftest import encode, photo
from pipeline.io.read import Reader
from pipeline.io.storage import Storage
from pipeline.job.config import ComputeConfig
from pipeline.local.worker import run_stages
from pipeline.run.executor import choose_executor


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.jpg").write_bytes(encode(photo(seed=i), "JPEG"))
    (folder / "truncated.jpg").write_bytes(encode(photo(seed=99), "JPEG")[:300])
    return folder


def test_the_driver_imports_neither_ray_nor_torch(classifier_files, photos, tmp_path):
    """The driver lists and writes; the model process alone imports torch, and nothing imports Ray."""
    job = {"input": str(photos), "output": str(tmp_path / "out"), **classifier_files, "batch_size": 8}
    script = textwrap.dedent(f"""
        import io, json, sys
        from pipeline.job.config import load_job
        from pipeline.local.executor import run_locally
        summary = run_locally(load_job(None, {job!r}), out=io.StringIO())
        print(json.dumps({{"inputs": summary.inputs, "errors": summary.errors_by_type,
                          "loaded": sorted(m for m in ("torch", "torchvision", "ray") if m in sys.modules)}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.splitlines()[-1])
    assert facts == {"inputs": 41, "errors": {"decode.truncated": 1}, "loaded": []}
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert rows.num_rows == 41 and len(set(rows["uri"].to_pylist())) == 41


def test_the_cli_says_which_executor_runs_the_job(classifier_files, photos, tmp_path):
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", "--input", str(photos), "--output",
                          str(tmp_path / "out"), "--model", classifier_files["model"], "--weights",
                          classifier_files["weights"], "--labels", classifier_files["labels"]],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "the local executor ready: this machine" in run.stdout
    assert "model: one process on this machine" in run.stdout
    assert "loading Ray" not in run.stdout and "Ray ready" not in run.stdout and run.stderr == ""


def test_a_model_that_cannot_load_is_one_line_from_the_model_process(classifier_files, photos, tmp_path):
    """The model is checked where it runs: a checkpoint that is not one fails there, exit 2, one line."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", "--input", str(photos), "--output",
                          str(tmp_path / "out"), "--model", "resnet18", "--weights", str(bad), "--labels",
                          classifier_files["labels"]],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.startswith("error: model.weights") and len(run.stderr.splitlines()) == 1, run.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("**/*.parquet"))


@pytest.mark.parametrize("compute, environ, gpus, expected", [
    ({}, {}, 0, "local"),
    ({}, {}, 1, "local"),
    ({}, {}, 2, "ray"),  # a model process per GPU is Ray's to schedule
    ({}, {"RAY_ADDRESS": "ray://head:10001"}, 0, "ray"),
    ({"ray_address": "auto"}, {}, 0, "ray"),
    ({"executor": "ray"}, {}, 0, "ray"),
    ({"executor": "local"}, {}, 2, "local"),
])
def test_auto_runs_locally_unless_a_cluster_is_named_or_there_are_several_gpus(compute, environ, gpus, expected,
                                                                                monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("pipeline.run.executor.visible_gpus", lambda: gpus)
    assert choose_executor(ComputeConfig(**compute)) == expected


def test_after_a_kill_9_of_the_driver_its_model_process_ends(tmp_path):
    """The model process serves its driver only: with the driver SIGKILLed mid-batch, it is gone within seconds."""
    from test_console import alive, descendants, env_with, pipeline_run, put_photos

    put_photos(tmp_path / "in", 8)
    env = env_with(tmp_path, PIPELINE_TEST_DELAY_S="5")  # a slow model: the kill falls while it runs
    calls = tmp_path / "calls.txt"
    proc = subprocess.Popen([*pipeline_run(tmp_path), "--executor", "local"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    family: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while not (calls.exists() and calls.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        family = descendants(proc.pid)
        assert proc.poll() is None and family
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid, started) for pid, started in family.items()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid, started) for pid, started in family.items())
    finally:
        proc.kill()
        for pid, started in family.items():
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)


def test_both_executors_write_the_same_rows(classifier_files, photos, tmp_path):
    """The same stages on either executor: the same labels, scores (to float rounding) and error rows, and the same
    model identity (the local executor carries on from a Ray run's output)."""
    tables = {}
    for executor in ("local", "ray"):
        out = tmp_path / f"out-{executor}"
        run = subprocess.run([sys.executable, "-m", "pipeline", "run", "--input", str(photos), "--output", str(out),
                              "--model", classifier_files["model"], "--weights", classifier_files["weights"],
                              "--labels", classifier_files["labels"], "--executor", executor],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        tables[executor] = {r["uri"]: r for r in pads.dataset(str(out), format="parquet").to_table().to_pylist()}
    again = subprocess.run([sys.executable, "-m", "pipeline", "run", "--input", str(photos), "--output",
                            str(tmp_path / "out-ray"), "--model", classifier_files["model"], "--weights",
                            classifier_files["weights"], "--labels", classifier_files["labels"], "--executor",
                            "local"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "unchanged   41" in again.stdout, again.stdout  # one model identity: no redo
    local, ray = tables["local"], tables["ray"]
    assert local.keys() == ray.keys() and len(local) == 41
    for uri, row in local.items():
        assert (row["label"], row["error_type"], row["image_width"]) == (ray[uri]["label"], ray[uri]["error_type"],
                                                                       ray[uri]["image_width"])
        assert row["score"] == pytest.approx(ray[uri]["score"], abs=1e-4) or row["error"] is not None


def test_an_input_that_killed_the_model_process_while_read_becomes_its_read_error_row(tmp_path):
    """The process died twice in the read stage with this input: its row is written there, and it is not read."""
    (tmp_path / "a.jpg").write_bytes(encode(photo(), "JPEG"))
    listed = {"uri": np.array([str(tmp_path / "a.jpg")], dtype=object), "size": np.array([None], dtype=object),
              "etag": np.array([None], dtype=object), "last_modified": np.array([None], dtype=object)}
    row = run_stages([Reader(Storage.from_env(), max_file_bytes=10**9)], listed, None, ("read", 2))
    assert row["error_type"][0] == "read.worker_crashed" and "died 2 times" in row["error"][0]
    assert row["bytes"][0] == b""
