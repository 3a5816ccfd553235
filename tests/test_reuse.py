"""Exact duplicates are not recomputed: an input whose bytes the same model identity already predicted, in this run
or a committed one (or the staged rows of this run's interrupted attempt), gets that prediction copied with
`reused_from`/`reused_run`, and the model is not called for it (tests/counting_model.py counts its real calls)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import encode, photo, photo_jpeg
from counting_model import images_seen
from pipeline.decode.hashes import content_hash
from pipeline.job.config import load_job
from test_crash import env_for

MODEL = {"name": "counting_model:build", "preprocess": {"resize_size": 32, "crop_size": 32}}


def image(seed: int) -> bytes:
    return encode(photo(32, 24, seed=seed), "PNG")


def pipeline_run(tmp_path: Path, input_uri: str, output: str, calls: Path, model: dict = MODEL,
                 failpoint: str | None = None, **output_fields) -> subprocess.CompletedProcess:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"model": model, "output": output_fields}))
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec), "--input", input_uri, "--output",
                           output, "--batch-size", "2", "--executor", "local"],
                          env=env_for(calls, failpoint), capture_output=True, text=True, timeout=300)


def rows_of(output: str, storage) -> dict[str, dict]:
    fs, path = storage.fs(output)
    fs.invalidate_cache()
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    return {r["uri"].rsplit("/", 1)[1]: r for r in table.to_pylist()}


def summary_of(output: str, storage) -> dict:
    return json.loads(storage.read_bytes(output.rstrip("/") + "/_summary.json"))


def test_duplicates_in_a_run_and_across_runs_call_the_model_once_per_content(tmp_path, storage, bucket):
    """Through `pipeline run` on the S3 server: 3 contents under 3 keys each and one more, then a night that adds
    a key of old bytes and one new content."""
    for seed in range(3):
        for copy in range(3):
            storage.s3_client.put_object(Bucket=bucket, Key=f"in/{seed}-{copy}.png", Body=image(seed))
    storage.s3_client.put_object(Bucket=bucket, Key="in/9.png", Body=image(9))
    output, calls = f"s3://{bucket}/out", tmp_path / "calls.txt"
    first = pipeline_run(tmp_path, f"s3://{bucket}/in", output, calls)
    assert first.returncode == 0, first.stderr[-3000:]
    assert images_seen(calls) == 4  # one model call per distinct content
    rows = rows_of(output, storage)
    first_run = summary_of(output, storage)
    assert len(rows) == 10 and first_run["reused"] == 6 and first_run["model_seconds_saved"] > 0
    for seed in range(3):
        group = [rows[f"{seed}-{copy}.png"] for copy in range(3)]
        assert len({(r["label"], r["score"], tuple(r["topk_scores"])) for r in group}) == 1
        assert sum(r["reused_from"] is None for r in group) == 1 and len({r["content_hash"] for r in group}) == 1
        source = next(r for r in group if r["reused_from"] is None)
        assert all(r["reused_from"] in (None, source["uri"]) and r["reused_run"] in (None, r["run_id"])
                   for r in group)

    storage.s3_client.put_object(Bucket=bucket, Key="in/old bytes.png", Body=image(1))
    storage.s3_client.put_object(Bucket=bucket, Key="in/new.png", Body=image(5))
    second = pipeline_run(tmp_path, f"s3://{bucket}/in", output, calls)
    assert second.returncode == 0, second.stderr[-3000:]
    assert images_seen(calls) == 5  # only the new content
    rows = rows_of(output, storage)
    copy = rows["old bytes.png"]
    assert copy["reused_run"] == first_run["run_id"] and copy["reused_from"].endswith("/1-0.png")
    assert (copy["label"], copy["score"]) == (rows["1-0.png"]["label"], rows["1-0.png"]["score"])
    assert summary_of(output, storage)["reused"] == 1



def test_killed_and_resumed_each_input_once_and_no_staged_content_predicted_again(tmp_path):
    """Killed right after its first checkpoint, then rerun: the resumed attempt predicts only contents that no
    staged row holds, each once, and copies the rest."""
    folder = tmp_path / "in"
    folder.mkdir()
    contents = {seed: image(seed) for seed in range(8)}
    for copy in "ab":
        for seed, data in contents.items():
            (folder / f"{copy}-{seed}.png").write_bytes(data)
    output = str(tmp_path / "out")
    killed = pipeline_run(tmp_path, str(folder), output, tmp_path / "calls-1.txt", failpoint="chunk_written:1",
                          checkpoint_rows=4)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    time.sleep(1)  # the killed driver's model process ends with it
    staged = pa.concat_tables([pq.read_table(c) for c in (tmp_path / "out" / "_staging").glob("*/chunk-*")])
    staged_uris = set(staged["uri"].to_pylist())
    known = set(staged.filter(staged["error"].is_null())["content_hash"].to_pylist())
    left = {content_hash(p.read_bytes()) for p in folder.iterdir() if str(p) not in staged_uris}

    resumed = pipeline_run(tmp_path, str(folder), output, tmp_path / "calls-2.txt", checkpoint_rows=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert images_seen(tmp_path / "calls-2.txt") == len(left - known)
    rows = pads.dataset(output, format="parquet").to_table()
    assert sorted(rows["uri"].to_pylist()) == sorted(str(p) for p in folder.iterdir())  # each input once
    for seed, data in contents.items():
        pair = rows.filter(pa.compute.equal(rows["content_hash"], content_hash(data))).to_pylist()
        assert len(pair) == 2 and pair[0]["label"] == pair[1]["label"] and pair[0]["score"] == pair[1]["score"]
        assert sum(r["reused_from"] is not None for r in pair) >= 1


def test_on_ray_a_content_is_predicted_once_across_actors_and_never_for_another_model_identity(tmp_path,
                                                                                               ray_session):
    """Two model actors share the run's claims (its ledger): photo-sized inputs reach both, each content under two
    keys, plus committed contents under new keys. Then another model identity on the same output reuses nothing of
    the first, only its own repeats."""
    from pipeline.ray.executor import run_on_ray
    from pipeline.run.inline import InlineExecutor
    from pipeline.run.job import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    for seed in range(3):
        (folder / f"{seed}.png").write_bytes(image(seed))
    output = str(tmp_path / "out")

    def job(model: dict = MODEL):
        spec = tmp_path / "job.json"
        spec.write_text(json.dumps({"model": model, "compute": {"min_actors": 2, "max_actors": 2}}))
        return load_job(str(spec), {"input": str(folder), "output": output, "batch_size": 4})

    run_job(job(), InlineExecutor(), io.StringIO())
    for seed in range(3):
        (folder / f"copy {seed}.png").write_bytes(image(seed))
    for seed in range(20):  # ~14 photos a 1 MiB block: blocks for both actors
        for key in "ab":
            (folder / f"{key} {seed:02d}.jpg").write_bytes(photo_jpeg(seed))
    summary = run_on_ray(job(), out=io.StringIO())
    # (The session's Ray workers do not see a PIPELINE_TEST_CALLS set now; a copy skips the model: reuse.py.)
    assert (summary.inputs, summary.reused) == (43, 3 + 20)
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in pads.dataset(output).to_table().to_pylist()}
    assert all(rows[f"copy {s}.png"]["reused_from"] == str(folder / f"{s}.png") for s in range(3))
    for seed in range(20):
        pair = [rows[f"{key} {seed:02d}.jpg"] for key in "ab"]
        assert pair[0]["score"] == pair[1]["score"] and sum(r["reused_from"] is None for r in pair) == 1

    other = {**MODEL, "preprocess": {"resize_size": 40, "crop_size": 32}}  # another model identity, same output
    again = run_on_ray(job(other), out=io.StringIO())
    assert (again.inputs, again.reused) == (46, 23)  # its 23 contents once each; their repeats in its run copied
    table = pads.dataset(output).to_table().to_pylist()
    assert {r["reused_run"] for r in table if r["run_id"] == again.run_id} == {None, again.run_id}
