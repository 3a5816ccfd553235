"""Real processes, real kills: the driver is SIGKILLed at each stage of a run, then the job is rerun.

Every rerun must end with exactly one committed row per input, and the model must see only the inputs the
killed attempt had not made durable (counted by tests/counting_model.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import io
import pyarrow.dataset as pads
import pytest
from PIL import Image

from conftest import encode, photo, photo_jpeg
from pipeline.run.isolation import BuildBook, LedgerBook
from pipeline.ray.executor import run_on_ray
from pipeline.job.config import load_job
from counting_model import images_seen

TESTS = Path(__file__).parent
INPUTS = 120


def put_inputs(storage, bucket: str, prefix: str = "in") -> list[str]:
    uris = []
    for i in range(INPUTS):
        key = f"{prefix}/img {i:04d}.jpg"
        # Photo-sized, so that rows reach the driver over many blocks and the kill points fall mid-run.
        storage.s3_client.put_object(Bucket=bucket, Key=key, Body=photo_jpeg(i))
        uris.append(f"s3://{bucket}/{key}")
    return uris


EXECUTORS = pytest.mark.parametrize("executor", ["local", "ray"])


def pipeline_cmd(input_uri: str, output_uri: str, *extra: str, executor: str = "auto") -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "--input", input_uri, "--output", output_uri,
            "--model", "counting_model:build", "--batch-size", "8", "--executor", executor, *extra]


def spec_file(tmp_path: Path, **output) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"output": {"checkpoint_rows": 16, "rows_per_file": 40, **output},
                                "model": {"name": "counting_model:build",
                                          "preprocess": {"resize_size": 128, "crop_size": 128}}}))
    return str(path)


def env_for(calls: Path, failpoint: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PIPELINE_TEST_CALLS": str(calls),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("PIPELINE_FAILPOINTS", None)
    if failpoint:
        env["PIPELINE_FAILPOINTS"] = failpoint
    return env


def wait_until_quiet(calls: Path, quiet_s: float = 3.0, limit_s: float = 60.0) -> None:
    deadline, last, since = time.monotonic() + limit_s, images_seen(calls), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.2)
        if images_seen(calls) != last:
            last, since = images_seen(calls), time.monotonic()


def committed_rows(output: str, storage) -> "pyarrow.Table":
    fs, path = storage.fs(output)
    fs.invalidate_cache()  # s3fs caches listings; the output changed in another process
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()


def staged_rows(output: Path | str, storage) -> int:
    fs, path = storage.fs(str(output))
    fs.invalidate_cache()
    chunks = [p for p in fs.find(path) if p.endswith(".parquet.staged")]
    import pyarrow.parquet as pq
    return sum(pq.ParquetFile(fs.open(c, "rb")).metadata.num_rows for c in chunks)


# Kills mid-commit and after the commit, for every output format, are tests/test_output.py's (no Ray needed there).
@pytest.mark.parametrize("failpoint, on_s3", [
    ("chunk_written:3", True),      # mid-run, right after a checkpoint; rows past it in the driver's hands
])
@EXECUTORS
def test_killed_driver_resumes_with_exactly_one_row_per_input(executor, failpoint, on_s3, tmp_path, storage, bucket):
    uris = put_inputs(storage, bucket)
    output = f"s3://{bucket}/out" if on_s3 else str(tmp_path / "out")
    calls = tmp_path / "calls.txt"
    spec = spec_file(tmp_path)

    killed = subprocess.run([*pipeline_cmd(f"s3://{bucket}/in", output, executor=executor), spec],
                            env=env_for(calls, failpoint), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    wait_until_quiet(calls)  # the killed driver's actors can finish a batch before Ray reaps them
    seen_before = images_seen(calls)
    durable = staged_rows(output, storage)
    calls.unlink(missing_ok=True)

    rerun = subprocess.run([*pipeline_cmd(f"s3://{bucket}/in", output, executor=executor), spec], env=env_for(calls),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    table = committed_rows(output, storage)
    assert sorted(table["uri"].to_pylist()) == sorted(uris)  # every input, exactly once
    assert table["error"].null_count == INPUTS
    # Work made durable before the kill is not redone: the rerun's model saw only the rest.
    if failpoint.startswith("committed"):
        assert images_seen(calls) == 0 and "unchanged   120" in rerun.stdout
    else:
        expected = {"chunk_written": 0 < durable < INPUTS, "part_written": durable == INPUTS}  # publishing starts once every row is staged
        assert expected[failpoint.split(":")[0]], durable
        assert images_seen(calls) == INPUTS - durable
        assert seen_before >= durable
    assert staged_rows(output, storage) == 0  # staging cleaned up


@EXECUTORS
def test_kill_while_listing_then_rerun(executor, tmp_path, storage, bucket):
    """An external SIGKILL as soon as the run has started (listing in progress), not at a chosen point."""
    uris = put_inputs(storage, bucket)
    output = tmp_path / "out"
    calls = tmp_path / "calls.txt"
    spec = spec_file(tmp_path)
    proc = subprocess.Popen([*pipeline_cmd(f"s3://{bucket}/in", str(output), executor=executor), spec],
                            env=env_for(calls), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(output.glob("_staging/*/_run.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(output.glob("**/*.parquet"))  # nothing visible from the killed run

    rerun = subprocess.run([*pipeline_cmd(f"s3://{bucket}/in", str(output), executor=executor), spec],
                           env=env_for(calls), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = duckdb.sql(f"SELECT uri, count(*) AS n FROM read_parquet('{output}/**/*.parquet') GROUP BY uri").fetchall()
    assert sorted(u for u, _ in rows) == sorted(uris) and {n for _, n in rows} == {1}


@EXECUTORS
def test_a_model_actor_that_dies_mid_batch_is_replaced_and_its_batch_redone_once(executor, tmp_path, storage, bucket):
    uris = put_inputs(storage, bucket)
    output = str(tmp_path / "out")
    calls = tmp_path / "calls.txt"
    env = {**env_for(calls), "PIPELINE_TEST_DIE_ONCE": str(tmp_path / "died")}
    run = subprocess.run([*pipeline_cmd(f"s3://{bucket}/in", output, executor=executor), spec_file(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "died").exists()  # an actor did die, after running its batch through the model
    table = committed_rows(output, storage)
    assert sorted(table["uri"].to_pylist()) == sorted(uris) and table["error"].null_count == INPUTS
    assert images_seen(calls) > INPUTS  # the dead actor's batch was run again, by its replacement


# --- inputs that kill their process (pipeline/ray/isolation.py) ----------------------------------------------------

MAGENTA = Image.new("RGB", (64, 48), (255, 0, 255))


def test_an_input_that_kills_its_model_actor_becomes_an_error_row(tmp_path, ray_session):
    """counting_model segfaults its process on a magenta image: the job still ends, with one row per input."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(15):
        (folder / f"photo{i:02d}.jpg").write_bytes(encode(photo(seed=i), "JPEG"))
    (folder / "photo07_poison.png").write_bytes(encode(MAGENTA, "PNG"))
    cfg = load_job(None, {"input": str(folder), "output": str(tmp_path / "out"), "model": "counting_model:build",
                          "batch_size": 8})
    summary = run_on_ray(cfg, out=io.StringIO())

    rows = {r["uri"].rsplit("/", 1)[1]: r for r in pads.dataset(str(tmp_path / "out")).to_table().to_pylist()}
    assert len(rows) == 16 and summary.inputs == 16
    poisoned = {name for name, r in rows.items() if r["error_type"] == "model.worker_crashed"}
    assert poisoned == {"photo07_poison.png"}
    assert "died 2 times while handling this input" in rows["photo07_poison.png"]["error"]
    assert all(r["error"] is None and r["label"] is not None for n, r in rows.items() if n not in poisoned)
    assert summary.redone > 0  # the batches lost with the crashed processes were taken again


@EXECUTORS
def test_inputs_that_kill_their_process_become_error_rows_through_the_cli(executor, tmp_path, storage, bucket):
    """The user's path: `pipeline run` in its own process and its own local Ray, inputs on the S3 server, two
    poison inputs among photos: they become error rows, every other input is predicted once, the job ends."""
    for i in range(22):
        storage.s3_client.put_object(Bucket=bucket, Key=f"in/img {i:04d}.jpg", Body=photo_jpeg(i))
    for name, fmt in (("magenta 1.png", "PNG"), ("magenta 2.jpg", "JPEG")):
        storage.s3_client.put_object(Bucket=bucket, Key=f"in/{name}", Body=encode(MAGENTA.resize((480, 360)), fmt))
    output = str(tmp_path / "out")
    run = subprocess.run(pipeline_cmd(f"s3://{bucket}/in", output, executor=executor),
                         env=env_for(tmp_path / "calls.txt"), capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in committed_rows(output, storage).to_pylist()}
    assert len(rows) == 24
    assert {n for n, r in rows.items() if r["error_type"] == "model.worker_crashed"} == {"magenta 1.png",
                                                                                        "magenta 2.jpg"}
    if executor == "local":  # each killed its process twice: with its chunk, then alone, and was not tried again
        assert all("died 2 times" in rows[n]["error"] for n in ("magenta 1.png", "magenta 2.jpg"))
    assert all(r["error"] is None and r["label"] is not None for n, r in rows.items() if "magenta" not in n)
    done = [int(m.replace(",", "")) for m in re.findall(r"\] ([\d,]+) done", run.stdout)]
    assert done == sorted(done) and all(n <= 24 for n in done)  # rows the driver has, never batches lost since


@EXECUTORS
def test_a_model_that_crashes_every_actor_building_it_ends_the_job_in_one_line(executor, tmp_path):
    """A model that takes its process down as it loads (in the actor, not in the driver's check): Ray would
    restart the actor for ever; the job stops with one line instead."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"photo{i}.jpg").write_bytes(encode(photo(seed=i), "JPEG"))
    env = {**env_for(tmp_path / "calls.txt"), "PIPELINE_TEST_CRASH_IN_ACTOR_BUILD": "1"}
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", "--input", str(folder), "--output",
                          str(tmp_path / "out"), "--model", "counting_model:build", "--executor", executor], env=env,
                         capture_output=True, text=True, timeout=420)
    assert run.returncode == 1, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "died 2 times while building the model" in errors[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_a_batch_lost_after_it_ended_is_a_rerun_until_the_driver_has_its_rows():
    """A process can die after its batch returned and before Ray handed the rows on; Ray runs the batch again.
    That run must be one input at a time, and the input last handled alone is blamed for the death."""
    book = LedgerBook()
    assert book.start("w1", ["a", "b"]) is False
    book.finish("w1", ["a", "b"])  # w1 dies now, its rows never reach the driver
    assert book.start("w2", ["a", "b"]) is True
    assert book.begin_input("w2", "a") == 0 and book.begin_input("w2", "b") == 0
    book.finish("w2", ["a", "b"])  # and w2 dies after b, alone, had returned
    assert book.start("w3", ["a", "b"]) is True and book.begin_input("w3", "b") == 2
    book.finish("w3", ["a", "b"])
    book.received(["a", "b"])
    assert not book.open and not book.crashed and book.start("w3", ["c"]) is False


def test_an_actor_that_dies_building_its_stage_twice_is_the_jobs_failure():
    book = BuildBook()
    assert book.start("actor1") == 0 and book.start("actor2") == 0  # two actors build side by side
    book.done("actor2")
    assert book.start("actor1") == 1 and book.failure is None  # actor1's first incarnation died building
    assert book.start("actor1") == 2 and "died 2 times while building the model" in book.failure
    assert book.start("actor2") == 0  # one that built and later died (a poison input) builds again freely


def test_the_ledger_blames_only_the_input_handled_alone_when_its_process_died():
    book = LedgerBook()
    assert book.start("w1", ["a", "b", "c"]) is False  # first attempt: the batch at once; its process dies
    assert book.start("w2", ["a", "b", "c"]) is True  # a rerun: one input at a time
    assert book.begin_input("w2", "a") == 0 and book.begin_input("w2", "b") == 0  # w2 dies during b
    assert book.start("w3", ["c", "a", "b"]) is True  # Ray may regroup the rows
    assert book.begin_input("w3", "c") == 0 and book.begin_input("w3", "a") == 0
    assert book.begin_input("w3", "b") == 2  # b is written as an error row, not tried a third time
    book.finish("w3", ["c", "a", "b"])
    assert book.start("w3", ["d"]) is False and book.crashed == {"b": 1} and book.inputs_started == 10


def test_a_rerun_batch_goes_one_input_at_a_time_and_skips_the_input_that_killed_its_process():
    """Isolated over the decode stage (as CPU decode tasks run it for GPU actors), with the ledger's state in
    this process: after two deaths the poison input is an error row, the others decode, the order is kept."""
    from pipeline.decode.image import Decoder
    from pipeline.run.isolation import Isolated

    class LocalLedger:  # what ray/ledger.RayLedger does over an actor, for one worker
        def __init__(self, book, worker):
            self.book, self.worker = book, worker

        def start(self, uris):
            return self.book.start(self.worker, uris)

        def begin_input(self, uri):
            return self.book.begin_input(self.worker, uri)

        def finish(self, uris):
            self.book.finish(self.worker, uris)

    names = ["a.png", "poison.png", "c.png"]
    batch = lambda: {"uri": np.array(names, dtype=object),  # noqa: E731
                     "bytes": np.array([encode(photo(seed=i), "PNG") for i in range(3)], dtype=object),
                     "error": np.full(3, None, dtype=object), "error_type": np.full(3, None, dtype=object)}
    book = LedgerBook()
    book.start("w1", names)  # the whole batch; w1 dies
    book.start("w2", names)
    book.begin_input("w2", "a.png")
    book.begin_input("w2", "poison.png")  # w2 dies with it alone
    out = Isolated(Decoder(None, 10**8), LocalLedger(book, "w3"), "decode")(batch())
    assert list(out["uri"]) == names
    assert list(out["error_type"]) == [None, "decode.worker_crashed", None]
    assert "died 2 times while handling this input" in out["error"][1]
    assert out["pixels"][0].shape == (72, 96, 3) and out["pixels"][1].shape == (0, 0, 3)
    assert book.open  # the batch ended, but only the driver's receipt settles its inputs
    book.received(names)
    assert not book.open and not book.crashed
