"""The output side on its own, the same tests for every output.format, on local disk and on the S3 server:
incremental runs, overwrite, a driver killed at each step of a run, readers during a commit, a second
driver, a driver that lost its lease, and a store that ignores conditional writes. No Ray, no model
(tests/output_driver.py stands in for the job); the killed attempts are real processes."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import FaultyProxy
from output_driver import job, run_once
from pipeline.io.storage import Storage
from pipeline.output import make_format
from pipeline.output.lease import Holder, check_conditional_writes
from pipeline.job.errors import UserError
from pipeline.job.rows import OUTPUT_SCHEMA
from readers import duckdb_connection

TESTS = Path(__file__).parent
FORMATS = ["parquet", "delta", "iceberg"]


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(output uri, SQLite file for an Iceberg catalog or None: a local table keeps its catalog inside)."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/preds", str(tmp_path / "catalog.db")


def output_format(output: str, fmt: str, storage: Storage, catalog_db: str | None = None):
    return make_format(job(output, fmt, catalog_db=catalog_db).output, storage, OUTPUT_SCHEMA)


def current_rows(output: str, fmt: str, storage: Storage, catalog_db: str | None = None) -> list[tuple]:
    """(uri, run_id) of every row a reader sees now, read by DuckDB the way the docs tell users to."""
    s3 = storage if output.startswith("s3://") else None
    if not output_format(output, fmt, storage, catalog_db).committed():
        return []  # no table yet
    if fmt == "delta":
        source = f"delta_scan('{output}')"
    elif fmt == "iceberg":
        table = output_format(output, fmt, storage, catalog_db)
        if table.metadata_location is None:
            return []
        source = f"iceberg_scan('{table.metadata_location}')"
    else:  # the strict reader: the live commit records' file lists
        files = output_format(output, fmt, storage).data_files()
        if not files:
            return []
        source = f"read_parquet({files!r})"
    con = duckdb_connection(s3, *([fmt] if fmt != "parquet" else []))
    return con.execute(f"SELECT uri, run_id FROM {source} ORDER BY uri, run_id").fetchall()


def driver(output: str, fmt: str, n: int, catalog_db: str | None, failpoints: str, *extra: str):
    """The job as a process of its own, with failpoints (tests/output_driver.py)."""
    env = {**os.environ, "PIPELINE_FAILPOINTS": failpoints,
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(TESTS / "output_driver.py"), output, fmt, str(n), *extra]
    if catalog_db:
        cmd += ["--catalog-db", catalog_db]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_incremental_runs_then_an_overwrite(fmt, place, storage, tmp_path):
    output, catalog_db = place
    first = run_once(output, fmt, 30, catalog_db=catalog_db, storage=storage)
    assert first["processed"] == 30
    assert run_once(output, fmt, 30, catalog_db=catalog_db, storage=storage)["processed"] == 0  # nothing new
    changed = run_once(output, fmt, 30, changed=5, catalog_db=catalog_db, storage=storage)
    assert changed["processed"] == 5
    rows = current_rows(output, fmt, storage, catalog_db)
    assert len(rows) == 35 and len({uri for uri, _ in rows}) == 30  # a changed input has a row per version
    assert {run for _, run in rows} == {first["run_id"], changed["run_id"]}

    backfill = run_once(output, fmt, 12, overwrite=True, catalog_db=catalog_db, storage=storage)
    assert backfill["processed"] == 12
    rows = current_rows(output, fmt, storage, catalog_db)
    assert len(rows) == 12 and {run for _, run in rows} == {backfill["run_id"]}
    table = output_format(output, fmt, storage, catalog_db)
    assert [r["run_id"] for r in table.live()] == [backfill["run_id"]]
    assert len(table.committed()) == 4  # each run committed once, the empty one included
    # Later incremental runs learn only from the backfill, not from the runs it replaced.
    last = run_once(output, fmt, 30, catalog_db=catalog_db, storage=storage)
    assert last["processed"] == 18
    empty = run_once(output, fmt, 30, catalog_db=catalog_db, storage=storage)  # a night with nothing new
    runs = [first["run_id"], changed["run_id"], last["run_id"], empty["run_id"]]
    assert_history_and_report(output, catalog_db if fmt == "iceberg" else None, runs, tmp_path)


def assert_history_and_report(output: str, catalog_db: str | None, runs: list[str], folder: Path) -> None:
    """`pipeline runs` and `pipeline report` read every format, local and on S3, as users call them."""
    import contextlib

    from pipeline.cli.commands import main

    catalog = ["--catalog", "type=sql", "--catalog", f"uri=sqlite:///{catalog_db}"] if catalog_db else []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["runs", output, "--no-listing", *catalog]) == 0
    history = printed.getvalue()
    assert "6 committed run(s)" in history and all(run in history for run in runs)
    assert history.count("(* replaced by a later overwrite)") == 3  # the runs before the backfill, the empty one too
    page = folder / "report.html"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", output, *catalog, "-o", str(page)]) == 0  # the latest: nothing new that night
        assert "This run wrote no rows" in page.read_text() and runs[-1] in page.read_text()
        assert main(["report", output, *catalog, "--run", runs[-2], "-o", str(page)]) == 0
        assert main(["report", output, *catalog, "--run", runs[0], "-o", str(page) + ".old"]) == 2
    html = page.read_text()
    assert runs[-2] in html and "input unavailable or unreadable" in html  # its inputs are made up
    shown = dict(re.findall(r"<h3>(\w+) <span class=\"sub\">\((\d+)\)</span></h3>", html))
    assert shown == {"dog": "11", "cat": "7"}  # 18 rows staged 5 at a time, every other one of each 5 a cat


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_interrupted_run_is_not_resumed_after_another_job_committed(fmt, tmp_path, storage):
    """Its staged rows may be in the later commit already: resuming would commit them twice."""
    output = str(tmp_path / "out")
    killed = driver(output, fmt, 30, None, "chunk_written:2")
    killed.wait(timeout=120)
    assert killed.returncode == -9
    assert run_once(output, fmt, 30, storage=storage, job_key="job-2")["processed"] == 30  # another job, all inputs
    printed = io.StringIO()
    again = run_once(output, fmt, 30, storage=storage, out=printed)
    assert "dropping interrupted run" in printed.getvalue() and again["processed"] == 0
    rows = current_rows(output, fmt, storage)
    assert len(rows) == 30 and len({uri for uri, _ in rows}) == 30


@pytest.mark.parametrize("fmt", ["parquet", "delta"])  # an Iceberg table's metadata holds absolute paths
def test_a_moved_output_keeps_its_history(fmt, tmp_path, storage):
    run_once(str(tmp_path / "out"), fmt, 20, storage=storage)
    (tmp_path / "out").rename(tmp_path / "moved")
    moved = str(tmp_path / "moved")
    assert run_once(moved, fmt, 25, storage=storage)["processed"] == 5
    assert run_once(moved, fmt, 0, overwrite=True, storage=storage)["processed"] == 0  # an empty backfill...
    assert len(current_rows(moved, fmt, storage)) == 25  # ...replaces nothing


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("failpoint, redone", [("chunk_written:1", 10), ("chunk_published:1", 0), ("committed:1", 0)])
def test_a_killed_run_is_finished_by_the_rerun_exactly_once(fmt, failpoint, redone, place, storage):
    """Killed while staging, mid-commit, or after its commit: readers see the night before until the rerun
    commits, and then every input exactly once, in one commit of the run."""
    output, catalog_db = place
    night_before = run_once(output, fmt, 10, catalog_db=catalog_db, storage=storage)
    killed = driver(output, fmt, 30, catalog_db, failpoint)
    killed.wait(timeout=120)
    assert killed.returncode == -9, killed.stderr.read()
    seen = current_rows(output, fmt, storage, catalog_db)
    if failpoint == "committed:1":
        assert len(seen) == 30  # it did commit
    else:
        assert {run for _, run in seen} == {night_before["run_id"]} and len(seen) == 10

    rerun = run_once(output, fmt, 30, catalog_db=catalog_db, storage=storage)
    rows = current_rows(output, fmt, storage, catalog_db)
    assert len(rows) == 30 and len({uri for uri, _ in rows}) == 30
    runs = [r["run_id"] for r in output_format(output, fmt, storage, catalog_db).committed()]
    assert len(runs) == len(set(runs))  # no run committed twice
    assert rerun["processed"] == redone  # what the killed attempt had not staged
    assert len(runs) == (3 if failpoint == "committed:1" else 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_readers_polling_during_a_commit_see_the_old_version_or_the_new(fmt, place, storage):
    output, catalog_db = place
    run_once(output, fmt, 10, catalog_db=catalog_db, storage=storage)
    slow = driver(output, fmt, 60, catalog_db, "chunk_published@0.15")
    counts = set()
    while slow.poll() is None:
        counts.add(len(current_rows(output, fmt, storage, catalog_db)))
    assert slow.returncode == 0, slow.stderr.read()
    counts.add(len(current_rows(output, fmt, storage, catalog_db)))
    assert counts == {10, 60} or counts == {60}  # never a part of the run


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_second_driver_is_refused_while_a_run_holds_the_output(fmt, place, storage):
    output, catalog_db = place
    from pipeline.output import RunPolicy, open_output
    from output_driver import IDENTITY

    cfg = job(output, fmt, catalog_db=catalog_db)
    with open_output(cfg.output, RunPolicy.of(cfg), storage, IDENTITY, OUTPUT_SCHEMA, io.StringIO()):
        with pytest.raises(UserError, match="is in use by run"):
            run_once(output, fmt, 5, catalog_db=catalog_db, storage=storage)
    assert run_once(output, fmt, 5, catalog_db=catalog_db, storage=storage)["processed"] == 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_driver_whose_lease_was_taken_over_commits_nothing(fmt, bucket, tmp_path, storage):
    """A driver paused past its lease (a long GC, a frozen VM) finds on waking that another took the output
    over: the fence before every visible write stops it."""
    from output_driver import IDENTITY, inputs, rows_for
    from pipeline.output import RunPolicy, open_output

    output, catalog_db = f"s3://{bucket}/preds", str(tmp_path / "catalog.db")
    cfg = job(output, fmt, catalog_db=catalog_db)
    with open_output(cfg.output, RunPolicy.of(cfg), storage, IDENTITY, OUTPUT_SCHEMA, io.StringIO()) as side:
        sink = side.sink({"model": "m", "weights": "w", "run_id": side.run_id}, checkpoint_rows=10)
        sink.add(rows_for(inputs(10)))
        sink.flush()
        storage.s3_client.put_object(Bucket=bucket, Key="preds/_lock.json",
                                     Body=Holder("20261129T000000Z-00000000", "other", 1, "elsewhere", time.time()).to_bytes())
        side.lease._renew_once()  # what its renewer thread does next
        with pytest.raises(UserError, match="lost the lease"):
            side.on_write_complete(sink)
    assert current_rows(output, fmt, storage, catalog_db) == []


def test_a_store_that_ignores_conditional_writes_is_refused_unless_the_user_opts_out(s3_server, bucket, tmp_path):
    with FaultyProxy(s3_server.endpoint_url, fail_rate=0, stall_rate=0, reset_rate=0) as proxy:
        proxy.ignore_conditions = True
        storage = Storage(endpoint_url=proxy.url, region="us-east-1")
        with pytest.raises(UserError, match="ignores conditional writes.*conditional_writes: false"):
            check_conditional_writes(storage, f"s3://{bucket}/preds")
        weaker = Storage(endpoint_url=proxy.url, region="us-east-1", conditional_writes=False)
        result = run_once(f"s3://{bucket}/preds", "parquet", 5, storage=weaker, conditional_writes=False)
        assert result["processed"] == 5
    check_conditional_writes(Storage.from_env(), f"s3://{bucket}/preds")  # moto itself honours them


ODD_VALUES = ["ünï", "日本語", "a/b", "50% off", "x=y", "with space", "q?", "#1", "colon:x", "back\\slash", None, ""]


def test_partition_folders_are_named_as_spark_names_them_and_read_back_everywhere(tmp_path):
    """Non-ASCII stays as it is and only Spark's reserved characters are %-escaped (Spark reads a UTF-8
    %-encoding back as one character per byte: 'Ã¼nÃ¯'); None and '' are Hive's default partition."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from pipeline.output.formats import Commit, Partitioning
    from pipeline.output.folder import ParquetFolder
    from pipeline.output.hive import folder_name

    assert [folder_name("label", v) for v in ("ünï", "a/b", "50% off", "x=y", None)] == [
        "label=ünï", "label=a%2Fb", "label=50%25 off", "label=x%3Dy", "label=__HIVE_DEFAULT_PARTITION__"]
    rows = pa.table({"uri": [f"u{i}" for i in range(len(ODD_VALUES))], "label": ODD_VALUES,
                     "run_id": ["r"] * len(ODD_VALUES)})
    output = str(tmp_path / "out")
    ParquetFolder(Storage(), output).commit(Commit(
        run_id="20261129T000000Z-00000000", rows=lambda: iter([rows]), schema=rows.schema,
        record={"run_id": "20261129T000000Z-00000000", "committed_at": "now", "mode": "append"}, overwrite=False,
        partitioning=Partitioning(column="label"), rows_per_file=100, fence=lambda: None))
    expected = sorted((f"u{i}", None if v == "" else v) for i, v in enumerate(ODD_VALUES))
    hive = pads.partitioning(pa.schema([("label", pa.string())]), flavor="hive")
    table = pads.dataset(output, format="parquet", partitioning=hive).to_table()
    assert sorted(zip(table["uri"].to_pylist(), table["label"].to_pylist())) == expected
    con = duckdb_connection()
    read = con.execute(f"SELECT uri, label FROM read_parquet('{output}/**/*.parquet', hive_partitioning = true, "
                       "hive_types = {'label': VARCHAR}) ORDER BY uri").fetchall()
    assert sorted(read) == expected
