"""Nightly runs over a growing prefix: only new or changed inputs, errors retried on request, --full,
date partitions, and one run at a time per output. (Overwrite, a moved output and a stale interrupted run are
tests/test_output.py's, for every output format.)"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import duckdb
import pyarrow.dataset as pads
import pytest

from conftest import encode, photo
from pipeline.io.storage import Storage
from pipeline.output.lease import Holder, OutputLease, _machine
from pipeline.local.executor import run_locally
from pipeline.job.errors import UserError
from test_pipeline import job, put_objects



def images(*seeds: int) -> dict[str, bytes]:
    return {f"img{s:02d}.jpg": encode(photo(seed=s), "JPEG") for s in seeds}


def rows_by_run(output: str) -> dict[str, list[str]]:
    table = duckdb.sql(f"SELECT run_id, uri FROM read_parquet('{output}/**/*.parquet') ORDER BY uri").fetchall()
    runs: dict[str, list[str]] = {}
    for run_id, uri in table:
        runs.setdefault(run_id, []).append(uri.rsplit("/", 1)[1])
    return runs


def test_nightly_runs_process_only_new_changed_and_failed_inputs(tmp_path, storage, bucket, classifier_files):
    put_objects(storage, bucket, "in/", images(0, 1, 2, 3, 4, 5))
    output = str(tmp_path / "out")
    cfg = job(classifier_files, f"s3://{bucket}/in/", output, output={"partitioning": "run_date"})
    first = run_locally(cfg, out=io.StringIO())
    assert first.inputs == 6 and first.committed_rows == 6

    # Between nights: two new objects, one changed, one deleted; one new object too big for tonight's limit.
    put_objects(storage, bucket, "in/", {**images(6, 7), "img01.jpg": encode(photo(seed=99), "JPEG"),
                                         "big.png": encode(photo(400, 300, seed=8), "PNG")})
    storage.s3_client.delete_object(Bucket=bucket, Key="in/img02.jpg")
    cfg.input.max_file_bytes = 100_000
    second = run_locally(cfg, out=io.StringIO())
    assert second.inputs == 4 and second.already_done == 4 and second.errors == 1
    assert rows_by_run(output)[second.run_id] == ["big.png", "img01.jpg", "img06.jpg", "img07.jpg"]

    # Nothing changed: nothing to do, and the failed row is not retried unless asked.
    assert run_locally(cfg, out=io.StringIO()).inputs == 0
    cfg.input.max_file_bytes = 10_000_000
    cfg.input.reprocess_errors = True
    retried = run_locally(cfg, out=io.StringIO())
    assert retried.inputs == 1 and retried.errors == 0
    assert rows_by_run(output)[retried.run_id] == ["big.png"]

    cfg.input.reprocess_errors, cfg.input.incremental = False, False  # --full
    assert run_locally(cfg, out=io.StringIO()).inputs == 8

    # Date partitions that readers understand, and one commit record per run that did work or not.
    dataset = pads.dataset(output, format="parquet", partitioning="hive")
    assert set(dataset.to_table()["run_date"].to_pylist()) == {first.started_at[:10]}
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_commits").glob("*.json")]
    assert len(records) == 5 and all(r["mode"] == "append" for r in records)
    assert sum(r["rows"] for r in records) == 6 + 4 + 0 + 1 + 8
    assert not list((tmp_path / "out").glob("_staging/*"))
    # The current answer per input, for analysts: the latest row of each uri still listed.
    latest = duckdb.sql(f"""SELECT uri, label FROM read_parquet('{output}/**/*.parquet')
                            QUALIFY row_number() OVER (PARTITION BY uri ORDER BY run_id DESC) = 1""").fetchall()
    assert len(latest) == 9  # 8 listed now + img02 deleted after the first night


def test_a_second_run_on_a_locked_local_output_refuses(tmp_path, classifier_files):
    output = str(tmp_path / "out")
    cfg = job(classifier_files, str(tmp_path), output)
    with OutputLease.for_output(Storage(), output, "20261124T000000Z-0000abcd"):
        with pytest.raises(UserError, match=r"is in use by run 20261124T000000Z-0000abcd \(host .*pid"):
            run_locally(cfg, out=io.StringIO())


def test_s3_lease_refuses_a_live_holder_and_takes_over_a_dead_one(storage, bucket, monkeypatch):
    output = f"s3://{bucket}/out"
    key = "out/_lock.json"
    with OutputLease.for_output(storage, output, "run-a"):
        with pytest.raises(UserError, match="is in use by run run-a"):
            OutputLease.for_output(storage, output, "run-b").__enter__()
    assert "Contents" not in storage.s3_client.list_objects_v2(Bucket=bucket, Prefix=key)  # released

    # Killed on this machine (its pid is gone): taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = Holder("run-dead", socket.gethostname(), int(dead.stdout), _machine(), time.time())
    storage.s3_client.put_object(Bucket=bucket, Key=key, Body=holder.to_bytes())
    with OutputLease.for_output(storage, output, "run-c"):
        pass
    # Alive elsewhere (written just now, from another machine): refused, naming the holder.
    holder = Holder("run-far", "another-host", 1, "another-host:boot:ns", time.time())
    storage.s3_client.put_object(Bucket=bucket, Key=key, Body=holder.to_bytes())
    with pytest.raises(UserError, match="in use by run run-far \\(host another-host"):
        OutputLease.for_output(storage, output, "run-d").__enter__()
    # Not rewritten for longer than the TTL by the server's clock: expired, taken over.
    monkeypatch.setattr("pipeline.output.lease.LEASE_TTL_S", 1.0)
    time.sleep(2.1)
    with OutputLease.for_output(storage, output, "run-e") as lease:
        # Someone rewrites the lease behind our back: our next renewal notices, and we must not publish.
        storage.s3_client.put_object(Bucket=bucket, Key=key, Body=Holder.me("run-thief").to_bytes())
        lease._renew_once()
        with pytest.raises(UserError, match="lost the lease"):
            lease.check()


def test_a_lease_that_cannot_be_renewed_is_given_up(storage, bucket, monkeypatch):
    monkeypatch.setattr("pipeline.output.lease.LEASE_TTL_S", 1.0)
    with OutputLease.for_output(storage, f"s3://{bucket}/out", "run-a") as lease:
        lease.check()
        time.sleep(0.6)  # no renewal for over TTL/2 (the renewer runs every 10 s)
        with pytest.raises(UserError, match="could not be renewed"):
            lease.check()


def test_concurrent_runs_on_one_s3_output(tmp_path, storage, bucket):
    """Two real drivers started together: one runs, the other refuses in one line; output exactly once."""
    put_objects(storage, bucket, "in/", images(*range(12)))
    tests = os.path.dirname(__file__)
    command = [sys.executable, "-m", "pipeline", "run", "--input", f"s3://{bucket}/in/",
               "--output", f"s3://{bucket}/out", "--model", "counting_model:build"]
    env = {**os.environ, "PYTHONPATH": tests}
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert refused.strip().count("\n") == 0 and "is in use by run" in refused
    table = pads.dataset(f"{bucket}/out", filesystem=storage.fs(f"s3://{bucket}/out")[0], format="parquet").to_table()
    assert table.num_rows == 12 and len(set(table["uri"].to_pylist())) == 12


def test_an_output_inside_the_input_folder_is_never_an_input(tmp_path, classifier_files):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in images(0, 1).items():
        (folder / name).write_bytes(data)
    cfg = job(classifier_files, str(folder), str(folder / "predictions"), input={"extensions": None})
    assert run_locally(cfg, out=io.StringIO()).inputs == 2
    again = run_locally(cfg, out=io.StringIO())  # our parquet, commit record and lock file are not new inputs
    assert again.inputs == 0 and again.already_done == 2


