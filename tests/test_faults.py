"""Flaky object storage: a job whose every S3 request (listing, reads, staged chunks, parts, commit record,
lease) goes through a proxy that fails, resets or stalls a share of them still commits every input once."""

from __future__ import annotations

import io
import json
import os
import re

import pyarrow.dataset as pads
import pytest

from conftest import encode, photo
from faults import FaultyProxy
from pipeline.io.storage import Storage
from pipeline.output.folder import ParquetFolder
from pipeline.ray.executor import run_on_ray
from test_pipeline import job, put_objects

pytestmark = pytest.mark.usefixtures("ray_session")


def test_a_job_through_a_faulty_s3_loses_and_duplicates_nothing(s3_server, storage, bucket, classifier_files):
    inputs = {f"photos/{i:03d} x.jpg": encode(photo(64, 48, seed=i), "JPEG") for i in range(60)}
    put_objects(storage, bucket, "", inputs)
    with FaultyProxy(s3_server.endpoint_url, fail_rate=0.15, reset_rate=0.05, stall_rate=0.03,
                     stall_seconds=3.0, seed=7) as proxy:
        cfg = job(classifier_files, f"s3://{bucket}/photos/", f"s3://{bucket}/out",
                  storage={"endpoint_url": proxy.url, "read_timeout_s": 1.0, "connect_timeout_s": 1.0},
                  output={"checkpoint_rows": 8, "rows_per_file": 25})
        summary = run_on_ray(cfg, out=io.StringIO())
        stats = proxy.stats
    assert stats["fail"] > 5 and stats["reset"] > 0 and stats["stall"] > 0, stats
    assert summary.errors == 0 and summary.committed_rows == 60

    fs, path = Storage.from_env().fs(f"s3://{bucket}/out")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert sorted(table["uri"].to_pylist()) == sorted(f"s3://{bucket}/{key}" for key in inputs)
    assert table["error"].null_count == 60
    record = json.loads(fs.cat_file(f"{path}/_commits/{summary.run_id}.json"))
    assert [f["rows"] for f in record["files"]] == [25, 25, 10]
    # A PUT the proxy held back past its client's timeout, and that the client sent again, can still land after the
    # run dropped its staging: only ever a publish intent of the committed run, which the next run's start removes.
    fs.invalidate_cache()
    left = fs.find(f"{path}/_staging")
    assert all(re.search(rf"/_staging/{summary.run_id}/publish/[^/]+\.json$", p) for p in left), left
    ParquetFolder(Storage.from_env(), f"s3://{bucket}/out").recover(set())
    fs.invalidate_cache()
    assert not fs.find(f"{path}/_staging")


def test_reads_that_keep_failing_become_error_rows_and_are_retried_later(s3_server, storage, bucket,
                                                                         classifier_files, tmp_path):
    """A storage that cuts every object's body short for a while: rows say so, the run commits, and the next
    run tries exactly those inputs again by itself (an I/O error says nothing about the input)."""
    put_objects(storage, bucket, "p/", {f"{i}.jpg": encode(photo(seed=i), "JPEG") for i in range(4)})
    with FaultyProxy(s3_server.endpoint_url, fail_rate=0.0, reset_rate=0.0, stall_rate=0.0, seed=1) as proxy:
        cfg = job(classifier_files, f"s3://{bucket}/p/", str(tmp_path / "out"),
                  storage={"endpoint_url": proxy.url, "max_attempts": 2})
        proxy.cut_rate = 1.0  # every object GET is reset mid-body; the listing (a GET with list-type) still works
        proxy.only = lambda method, target: method == "GET" and "list-type" not in target
        first = run_on_ray(cfg, out=io.StringIO())
        proxy.cut_rate = 0.0
        second = run_on_ray(cfg, out=io.StringIO())
    assert first.errors == 4 and set(first.errors_by_type) == {"read.io_error"}
    assert second.inputs == 4 and second.errors == 0 and second.already_done == 0


def test_a_body_cut_short_is_read_again(s3_server, storage, bucket):
    """A connection reset mid-body carries no status for botocore to retry: the storage layer reads it again."""
    objects = {f"c/{i}.bin": os.urandom(200_000 + i) for i in range(6)}
    put_objects(storage, bucket, "", objects)
    with FaultyProxy(s3_server.endpoint_url, fail_rate=0.0, reset_rate=0.0, stall_rate=0.0, cut_rate=1.0,
                     seed=3) as proxy:
        first_get: set[str] = set()

        def once_per_key(method, target):  # cut each object's first GET only
            if method != "GET" or target in first_get:
                return False
            first_get.add(target)
            return True

        proxy.only = once_per_key
        read = Storage.from_env(proxy.url).read_many([f"s3://{bucket}/{key}" for key in objects])
        assert proxy.stats["cut"] == 6
    assert read == list(objects.values())
