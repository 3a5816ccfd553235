"""A request that arrives late must not change a committed run (docs/commit-protocol.md, "A request that
arrives late"), tried the way it happens, for every output.format on the S3 server.

A first driver stages every input (one of them fails) and starts to publish, through a proxy that holds one of
its data-file PUTs, received whole. The driver is frozen (SIGSTOP) until its lease expires; a second driver
takes the output over, resumes the run (retrying the input that failed) and commits. Only then is the held PUT
forwarded, and the first driver thawed. Every reader -- the commit record, a glob of the folder, the table's
own reader -- then sees each input exactly once, with the second attempt's values.

Run as a script, this file is the first driver: `python tests/test_late_write.py OUTPUT FORMAT [CATALOG_DB]`.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from faults import FaultyProxy
from output_driver import IDENTITY, inputs, job
from pipeline.io.storage import Storage
from readers import duckdb_connection

TESTS = Path(__file__).parent

N = 20
FAILED = 2  # the input whose read failed in the first attempt, and that the second one retries
LEASE_TTL_S, RENEW_EVERY_S = 4.0, 0.5  # short, so that the test waits seconds for the lease to expire
SCORES = {"first": 0.25, "second": 0.75}
HOLD = {"parquet": 2, "delta": 1, "iceberg": 1}  # which data-file PUT of the first driver is held

pytestmark = pytest.mark.kill  # real processes frozen, thawed and killed (tests/conftest.py: lanes)


def rows(objects, attempt: str) -> pa.Table:
    """Rows as the job makes them; in the first attempt, input FAILED's read fails."""
    failed = [attempt == "first" and o.uri.endswith(f"img-{FAILED:05d}.jpg") for o in objects]
    return pa.table({"uri": [o.uri for o in objects], "etag": [o.etag for o in objects],
                     "last_modified": [o.last_modified for o in objects], "size": [o.size for o in objects],
                     "label": [None if f else "cat" for f in failed],
                     "score": [None if f else SCORES[attempt] for f in failed],
                     "error": ["read: connection reset" if f else None for f in failed],
                     "error_type": ["read.io_error" if f else None for f in failed]})


def attempt(output: str, fmt: str, name: str, storage: Storage, catalog_db: str | None, out=None,
            before_commit=lambda: None) -> dict:
    """One attempt at the job: stage what is not staged yet, five rows a batch, then commit."""
    from pipeline.output import RunPolicy, open_output
    from pipeline.job.rows import OUTPUT_SCHEMA

    cfg = job(output, fmt, catalog_db=catalog_db)
    with open_output(cfg.output, RunPolicy.of(cfg), storage, IDENTITY, OUTPUT_SCHEMA, out or io.StringIO()) as side:
        todo = side.history().load(storage).todo(inputs(N))
        sink = side.sink({"model": "counting", "weights": "sha256:0", "run_id": side.run_id}, checkpoint_rows=10)
        for start in range(0, len(todo), 5):
            sink.add(rows(todo[start:start + 5], name))
        sink.flush()
        before_commit()
        return side.on_write_complete(sink)


def first_driver(output: str, fmt: str, proxy_url: str, catalog_db: str | None) -> subprocess.Popen:
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy_url, "AWS_ENDPOINT_URL_S3": proxy_url,
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, output, fmt, *([catalog_db] if catalog_db else [])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_driver_put(fmt: str, held: str):
    """A predicate for the proxy: the HOLD[fmt]-th PUT of a data file under the output, or (`held` "record") the
    first PUT of a commit record after a data file (a claim comes before them)."""
    parts = []

    def accept(method: str, target: str) -> bool:
        path = target.split("?", 1)[0]
        if method != "PUT" or "/_staging/" in path:
            return False
        if path.endswith(".parquet"):
            parts.append(path)
            return held == "part" and len(parts) == HOLD[fmt]
        return held == "record" and "/_commits/" in path and bool(parts)
    return accept


def wait_until_expired(storage: Storage, output: str) -> None:
    from pipeline.output.lease import read_object_lease

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, _, age = read_object_lease(storage, output)
        if age > LEASE_TTL_S + 1:
            return
        time.sleep(0.5)
    raise AssertionError("the frozen driver's lease never expired")


def visible_rows(output: str, fmt: str, storage: Storage, catalog_db: str | None) -> dict[str, list[tuple]]:
    """(uri, score, error, run_id) of every row, by reader: the folder's commit records and two globs, or the
    table's reader (a table is read through its format: a glob of its files is no reader of it)."""
    from pipeline.output import make_format
    from pipeline.job.rows import OUTPUT_SCHEMA

    table = make_format(job(output, fmt, catalog_db=catalog_db).output, storage, OUTPUT_SCHEMA)
    select = "SELECT uri, score, error, run_id FROM {} ORDER BY uri"
    if fmt == "delta":
        return {"delta_scan": duckdb_connection(storage, "delta").execute(
            select.format(f"delta_scan('{output}')")).fetchall()}
    if fmt == "iceberg":
        return {"iceberg_scan": duckdb_connection(storage, "iceberg").execute(
            select.format(f"iceberg_scan('{table.metadata_location}')")).fetchall()}
    import pyarrow.dataset as pads

    con = duckdb_connection(storage)
    globbed = pads.dataset(output.removeprefix("s3://"), filesystem=storage.s3fs, format="parquet").to_table(
        columns=["uri", "score", "error", "run_id"]).sort_by("uri")
    return {"commit record": con.execute(select.format(f"read_parquet({table.data_files()!r})")).fetchall(),
            "duckdb glob": con.execute(select.format(f"read_parquet('{output}/*.parquet')")).fetchall(),
            "pyarrow dataset": [tuple(r.values()) for r in globbed.to_pylist()]}


@pytest.mark.parametrize("fmt, held", [("parquet", "part"), ("delta", "part"), ("iceberg", "part"),
                                       ("parquet", "record")])
def test_a_put_that_lands_after_another_driver_took_over_changes_nothing(fmt, held, s3_server, bucket, storage,
                                                                         tmp_path, monkeypatch):
    """A held part lands after the second driver committed; a held commit record (the folder's), after the
    second driver resumed the run but before it commits."""
    monkeypatch.setattr("pipeline.output.lease.LEASE_TTL_S", LEASE_TTL_S)
    monkeypatch.setattr("pipeline.output.lease.RENEW_EVERY_S", RENEW_EVERY_S)
    output, catalog_db = f"s3://{bucket}/late", (str(tmp_path / "catalog.db") if fmt == "iceberg" else None)
    with FaultyProxy(s3_server.endpoint_url, fail_rate=0, stall_rate=0, reset_rate=0) as proxy:
        proxy.hold = first_driver_put(fmt, held)
        first = first_driver(output, fmt, proxy.url, catalog_db)
        try:
            assert proxy.held.wait(120), first.communicate(timeout=60)
            first.send_signal(signal.SIGSTOP)  # between its lease check and the PUT's answer, for a long while
            wait_until_expired(storage, output)
            printed = io.StringIO()

            def land_the_held_put():
                proxy.release()
                assert proxy.held_answered.wait(60)
            second = attempt(output, fmt, "second", storage, catalog_db, printed,
                             before_commit=land_the_held_put if held == "record" else lambda: None)
            assert "Resuming run" in printed.getvalue() and "tried again" in printed.getvalue()
            if held == "part":
                land_the_held_put()  # after the run committed
        finally:
            first.send_signal(signal.SIGCONT)
        try:
            _, err = first.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            _, err = first.communicate()
    # Thawed, the first driver stops (it lost its lease) or finds the run committed (a table's commit already
    # under way when it froze: the table's own concurrency control then refuses it); either way what it had sent
    # changes nothing:

    expected = [(o.uri, SCORES["second" if i == FAILED else "first"], None, second["run_id"])
                for i, o in enumerate(inputs(N))]
    for reader, seen in visible_rows(output, fmt, storage, catalog_db).items():
        extra, missing = Counter(seen) - Counter(expected), Counter(expected) - Counter(seen)
        assert seen == expected, (f"{reader}: {len(seen)} rows; extra {sorted(extra)[:3]}, missing "
                                  f"{sorted(missing)[:3]}; the first driver said: {err[-1500:]}")


if __name__ == "__main__":
    import pipeline.output.lease as lease

    lease.LEASE_TTL_S, lease.RENEW_EVERY_S = LEASE_TTL_S, RENEW_EVERY_S
    output_uri, output_format = sys.argv[1], sys.argv[2]
    print(attempt(output_uri, output_format, "first", Storage.from_env(), sys.argv[3] if len(sys.argv) > 3 else None))
