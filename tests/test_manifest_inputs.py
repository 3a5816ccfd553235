"""A manifest as users write them, run through `pipeline run` as they run it: each input once however often and
however it is spelt, a line with an unquoted comma skipped wherever it is, S3 keys read exactly as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import encode, photo
from pipeline.io.distinct import SeenKeys
from pipeline.io.manifest import manifest_columns, read_manifest
from pipeline.io.storage import Storage

TESTS = Path(__file__).parent


def pipeline_run(manifest: str, output: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "--input", manifest, "--output", output,
                           "--model", "counting_model:build", "--batch-size", "4"],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_a_manifest_on_s3_gives_one_row_per_input(storage, bucket, tmp_path):
    """Three spellings of one object, a repeated URI, a key holding `?versionId=` (s3fs's syntax for a version,
    which cut such keys short: "object not found") and an unquoted comma in the first line (refused as an
    unreadable manifest, while further down it was skipped)."""
    a, odd = "in/a.png", "in/b.png?versionId=3"
    storage.s3_client.put_object(Bucket=bucket, Key=a, Body=encode(photo(seed=1), "PNG"))
    storage.s3_client.put_object(Bucket=bucket, Key=odd, Body=encode(photo(seed=2), "PNG"))
    lines = ["uri", "in/c, d.png", a, f"./{a}", f"s3://{bucket}/{a}", odd, f"s3://{bucket}/{odd}",
             f"s3://{bucket}/in/./a.png"]
    storage.write_bytes(f"s3://{bucket}/list.csv", ("\n".join(lines) + "\n").encode())
    output = str(tmp_path / "out")

    first = pipeline_run(f"s3://{bucket}/list.csv", output)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = {r["uri"]: r for r in pads.dataset(output, format="parquet").to_table().to_pylist()}
    assert sorted(rows) == sorted([f"s3://{bucket}/{a}", f"s3://{bucket}/{odd}", f"s3://{bucket}/in/./a.png"])
    assert rows[f"s3://{bucket}/{a}"]["error"] is None and rows[f"s3://{bucket}/{odd}"]["error"] is None
    assert rows[f"s3://{bucket}/in/./a.png"]["error_type"] == "read.not_found"  # an S3 key is kept as written
    summary = json.loads((Path(output) / "_summary.json").read_text())
    assert (summary["inputs"], summary["duplicates"]) == (3, 3)
    assert "duplicates  3" in first.stdout

    again = pipeline_run(f"s3://{bucket}/list.csv", output)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "unchanged   3" in again.stdout and "inputs      0" in again.stdout, again.stdout


@pytest.mark.unit
def test_local_spellings_of_one_file_are_one_entry(tmp_path):
    (tmp_path / "img.jpg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    entries = ["img.jpg", "./img.jpg", str(tmp_path / "img.jpg"), f"file://{tmp_path}/img.jpg",
               "sub/../img.jpg", f"{tmp_path}//img.jpg", "sub/other.jpg", "img.jpg"]
    (tmp_path / "list.csv").write_text("uri\n" + "\n".join(entries) + "\n")
    dropped = []
    uris = [o.uri for page in read_manifest(str(tmp_path / "list.csv"), Storage(), duplicates=dropped.append)
            for o in page]
    assert uris == [str(tmp_path / "img.jpg"), str(tmp_path / "sub" / "other.jpg")]
    assert sum(dropped) == 6


@pytest.mark.unit
def test_an_unquoted_comma_is_skipped_wherever_it_is(tmp_path, caplog):
    """The same line first and far past the first MiB: skipped both times, and counted."""
    filler = [f"{i:07d}-a-long-enough-file-name-to-fill-a-mebibyte-quickly.jpg" for i in range(40_000)]
    (tmp_path / "list.csv").write_text("\n".join(["uri", "a, b.jpg", *filler, "a, b.jpg"]) + "\n")
    assert (tmp_path / "list.csv").stat().st_size > 2 * 2**20
    assert manifest_columns(str(tmp_path / "list.csv"), Storage()) == ["uri"]  # the checks' look at the header before a run
    with caplog.at_level("WARNING", logger="pipeline.io.manifest"):
        uris = [o.uri for page in read_manifest(str(tmp_path / "list.csv"), Storage()) for o in page]
    assert len(uris) == 40_000
    assert "2 line(s) skipped in all" in caplog.text


@pytest.mark.unit
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_seen_keys_keeps_the_first_of_each(batch):
    keys = [f"s3://b/{i % 2500}.jpg" for i in range(10_000)] + ["ü/é", "ü/é"]
    seen, kept = SeenKeys(), []
    for start in range(0, len(keys), batch):
        part = keys[start:start + batch]
        kept += [k for k, new in zip(part, seen.first_seen(part)) if new]
    assert kept == [f"s3://b/{i}.jpg" for i in range(2500)] + ["ü/é"]
    assert len(seen) == 2501


@pytest.mark.unit
def test_a_key_holding_version_id_text_is_read_as_written(storage, bucket):
    """s3fs reads `k?versionId=v` as version v of `k`: it fetched `k` (another object) or "not found"."""
    storage.s3_client.put_object(Bucket=bucket, Key="k.jpg?versionId=7", Body=b"the odd key")
    storage.s3_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"the plain key")
    odd, plain, absent = (f"s3://{bucket}/k.jpg?versionId=7", f"s3://{bucket}/k.jpg",
                          f"s3://{bucket}/gone.jpg?versionId=7")
    assert storage.read_many([odd, plain])[:2] == [b"the odd key", b"the plain key"]
    assert isinstance(storage.read_many([absent])[0], FileNotFoundError)
    assert storage.exists(odd) and not storage.exists(absent) and storage.read_bytes(odd) == b"the odd key"
