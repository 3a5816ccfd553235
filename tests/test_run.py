"""The run's story without an engine: pipeline/run/ drives a job through the in-process executor from the same
stage declarations Ray reads; a stage added to a plan runs without a change to the executor."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.dataset as pads
import pytest

from conftest import encode, photo
from pipeline.io.storage import Storage
from pipeline.job.config import load_job
from pipeline.job.errors import JobStopped
from pipeline.job.rows import error_columns
from pipeline.job.stage import Batch, Resources, Stage
from pipeline.models.resolve import resolve_model
from pipeline.run.inline import InlineExecutor
from pipeline.run.job import run_job
from pipeline.run.plan import plan_stages


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i:02d}.png").write_bytes(encode(photo(seed=i), "PNG"))
    (folder / "truncated.jpg").write_bytes(encode(photo(seed=99), "JPEG")[:300])
    (folder / "notes.txt").write_text("not an image")
    return folder


def job(classifier_files, input_uri, output_uri, **errors):
    cfg = load_job(None, {"input": input_uri, "output": output_uri, **classifier_files})
    for key, value in errors.items():
        setattr(cfg.errors, key, value)
    return cfg


def test_a_job_runs_through_the_story_without_an_engine(classifier_files, photos, tmp_path):
    out = io.StringIO()
    summary = run_job(job(classifier_files, str(photos), str(tmp_path / "out")), InlineExecutor(), out)
    assert (summary.status, summary.inputs, summary.predicted, summary.errors) == ("completed", 11, 10, 1)
    assert summary.skipped_by_extension == 1 and summary.errors_by_type == {"decode.truncated": 1}
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert sorted(r["uri"].rsplit("/", 1)[1] for r in rows) == [f"{i:02d}.png" for i in range(10)] + ["truncated.jpg"]
    assert {r["label"] for r in rows if r["error"] is None} <= {"cat", "dog", "bird", "fish"}
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["run_id"] == summary.run_id
    assert "model: in this process" in out.getvalue() and f"Run {summary.run_id} completed" in out.getvalue()
    again = run_job(job(classifier_files, str(photos), str(tmp_path / "out")), InlineExecutor(), io.StringIO())
    assert (again.inputs, again.already_done) == (0, 11)  # incremental: nothing changed, nothing redone


def test_the_error_rate_stop_commits_nothing_and_keeps_what_is_staged(classifier_files, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    cfg = job(classifier_files, str(folder), str(tmp_path / "out"), max_error_rate=0.5, min_inputs=4)
    with pytest.raises(JobStopped, match="over errors.max_error_rate=0.5"):
        run_job(cfg, InlineExecutor(), io.StringIO())
    assert not (tmp_path / "out" / "_commits").exists() or not any((tmp_path / "out" / "_commits").iterdir())
    staged = [chunk.parent.name for chunk in (tmp_path / "out" / "_staging").rglob("chunk-*")]
    assert staged
    cfg.errors.max_error_rate = 1.0
    resumed = run_job(cfg, InlineExecutor(), io.StringIO())  # the same run, its failed inputs tried again
    assert (resumed.run_id, resumed.committed_rows, resumed.errors) == (staged[0], 6, 6)


class Stamp(Stage):
    """A stage the package does not have: it adds a column and fails one input, as any stage may."""
    name = "stamp"
    resources = Resources(cpus=0, batch_size=3)

    def process(self, batch: Batch) -> Batch:
        batch["stamp"] = np.array([len(u) for u in batch["uri"]])
        errors, error_types = error_columns(batch)  # as the engine hands them over (all-null may come as NaN)
        chosen = [str(u).endswith("03.png") for u in batch["uri"]]
        errors[chosen], error_types[chosen] = "stamp: not this one", "stamp.chosen"
        batch.update(error=errors, error_type=error_types)
        return batch


def test_a_new_stage_runs_without_a_change_to_the_executor(classifier_files, photos, tmp_path):
    cfg = job(classifier_files, str(photos), str(tmp_path / "out"))
    storage = Storage.from_env()
    executor = InlineExecutor()
    plan = plan_stages(cfg, resolve_model(cfg.model, storage), storage, executor.pool(cfg.compute))
    plan.stages.insert(1, Stamp())  # after reading, before decoding and the model
    rows = [row for table in executor.run(plan, cfg.output.uri) for row in table.to_pylist()]
    assert len(rows) == 11 and all(row["stamp"] == len(row["uri"]) for row in rows)
    failed = {row["uri"].rsplit("/", 1)[1]: row["error"] for row in rows if row["error"]}
    assert failed["03.png"] == "stamp: not this one" and "label" in rows[0]


def test_the_story_never_imports_ray(classifier_files, photos, tmp_path):
    """pipeline/run/ and the stages run a whole job in a process where Ray was never imported."""
    script = textwrap.dedent(f"""
        import io, sys
        from pipeline.job.config import load_job
        from pipeline.run.inline import InlineExecutor
        from pipeline.run.job import run_job
        cfg = load_job(None, {{"input": {str(photos)!r}, "output": {str(tmp_path / 'out')!r}, **{classifier_files!r}}})
        summary = run_job(cfg, InlineExecutor(), io.StringIO())
        print(summary.status, summary.inputs, "ray" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["completed", "11", "False"]
