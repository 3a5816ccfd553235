"""A committed run's skip-set keys (pipeline/output/run_keys.py): kept by its commit, read by the next run instead
of hashing the table's rows, and not trusted once the table no longer holds exactly the rows they were kept for.
No Ray: the output side is driven directly (tests/output_driver.py), on each format."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from output_driver import run_once
from pipeline.io.storage import Storage
from pipeline.output.run_keys import KEYS_FOLDER

FORMATS = ["parquet", "delta", "iceberg"]


def run(output: Path, fmt: str, n: int, **kwargs) -> dict:
    catalog = {"catalog_db": str(output.parent / "catalog.db")} if fmt == "iceberg" else {}
    return run_once(str(output), fmt, n, storage=Storage(), **catalog, **kwargs)


def kept(output: Path) -> list[Path]:
    return sorted((output / KEYS_FOLDER).glob("*/index.json"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_next_run_reads_the_keys_each_commit_kept(fmt, tmp_path):
    output = tmp_path / "out"
    first = run(output, fmt, 20)
    [index] = kept(output)
    assert index.parent.name == f"{first['run_id']}-20"
    assert json.loads(index.read_text())["done"] == 20
    assert run(output, fmt, 30)["processed"] == 10  # the first run's 20 skipped

    # Keep only 5 of the first run's 20 keys: the next run does the other 15 again, so the keys, not the rows,
    # made the skip set.
    part = index.parent / "part-00000.npz"
    with np.load(part) as arrays:
        done, failed = arrays["done"][:5], arrays["failed"]
    buffer = io.BytesIO()
    np.savez(buffer, done=done, failed=failed)
    part.write_bytes(buffer.getvalue())
    assert run(output, fmt, 30)["processed"] == 15


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_kept_keys_the_rows_are_hashed(fmt, tmp_path):
    output = tmp_path / "out"
    run(output, fmt, 20)
    shutil.rmtree(output / KEYS_FOLDER)
    assert run(output, fmt, 25)["processed"] == 5
    assert len(kept(output)) == 1  # the second run's own


def test_keys_of_a_run_another_engine_deleted_rows_of_are_not_trusted(tmp_path):
    from deltalake import DeltaTable

    output = tmp_path / "out"
    run(output, "delta", 20)
    assert DeltaTable(str(output)).delete("uri = 's3://photos/img-00003.jpg'")["num_deleted_rows"] == 1
    assert run(output, "delta", 20)["processed"] == 1  # the deleted row's input, and only it


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_overwrite_drops_the_keys_of_the_runs_it_replaced(fmt, tmp_path):
    output = tmp_path / "out"
    run(output, fmt, 20)
    replacing = run(output, fmt, 10, overwrite=True)
    assert [index.parent.name for index in kept(output)] == [f"{replacing['run_id']}-10"]
    assert run(output, fmt, 12)["processed"] == 2


@pytest.mark.e2e
def test_through_the_cli_on_s3_kept_keys_or_none_the_rerun_predicts_nothing(storage, bucket):
    """`pipeline run` twice on the S3 server: the first run keeps its keys under the output; with them deleted, the
    rerun hashes the table's rows instead and still finds every input unchanged."""
    import os
    import subprocess
    import sys

    from conftest import encode, photo

    for i in range(6):
        storage.s3_client.put_object(Bucket=bucket, Key=f"in/img {i}.png", Body=encode(photo(seed=i), "PNG"))
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    output = f"s3://{bucket}/out"
    command = [sys.executable, "-m", "pipeline", "run", "--input", f"s3://{bucket}/in/", "--output", output,
               "--model", "counting_model:build", "--executor", "local"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    kept = storage.s3_client.list_objects_v2(Bucket=bucket, Prefix=f"out/{KEYS_FOLDER}/")["Contents"]
    assert any(o["Key"].endswith("-6/index.json") for o in kept)
    storage.delete([f"s3://{bucket}/{o['Key']}" for o in kept])
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "inputs      0" in again.stdout and "unchanged   6" in again.stdout, again.stdout
