"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`): a job's model
actors run on both nodes, the second node is SIGKILLed mid-job, and the output is still complete, once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pytest

from conftest import photo_jpeg
from counting_model import images_seen, nodes_seen
from ray_cluster import TwoNodeCluster
from test_crash import staged_rows

TESTS = os.path.dirname(__file__)
INPUTS = 400


@pytest.mark.slow
def test_job_survives_losing_a_node_mid_run(tmp_path, s3_server, storage, bucket):
    for i in range(INPUTS):
        # Photo-sized: 400 thumbnails would fit in one block, too few to spread over both nodes' actors.
        storage.s3_client.put_object(Bucket=bucket, Key=f"in/{i:04d}.jpg", Body=photo_jpeg(i))
    spec = tmp_path / "job.yaml"
    # One model actor per node: each wants 1.5 of a node's 2 CPUs, leaving room for reading and decoding.
    spec.write_text(json.dumps({
        "input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": f"s3://{bucket}/out", "checkpoint_rows": 16},
        "model": {"name": "counting_model:build", "preprocess": {"resize_size": 128, "crop_size": 128}},
        "compute": {"batch_size": 8, "min_actors": 2, "max_actors": 2, "num_cpus_per_actor": 1.5,
                    "memory_per_actor_gb": 0.5}}))
    calls = tmp_path / "calls.txt"
    env = {"PYTHONPATH": TESTS, "PIPELINE_TEST_CALLS": str(calls), "PIPELINE_TEST_DELAY_S": "0.5"}
    with TwoNodeCluster(head_cpus=2, worker_cpus=2, env=env) as cluster:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(spec), "--ray-address",
                                   cluster.address], env={**cluster.env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while len(nodes_seen(calls)) < 2 or staged_rows(f"s3://{bucket}/out", storage) < INPUTS // 4:
                assert driver.poll() is None and time.monotonic() < deadline, stopped(driver)
                time.sleep(0.2)
            assert staged_rows(f"s3://{bucket}/out", storage) < INPUTS  # the kill lands mid-job
            cluster.kill_worker()
            out, err = driver.communicate(timeout=300)
        finally:  # a failed wait leaves no driver behind, dialling a cluster that is gone
            stopped(driver)
    assert driver.returncode == 0, err[-3000:]
    assert nodes_seen(calls) == {cluster.head_node_id, cluster.worker_node_id}

    fs, path = storage.fs(f"s3://{bucket}/out")
    fs.invalidate_cache()
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert table.num_rows == INPUTS and len(set(table["uri"].to_pylist())) == INPUTS
    assert table["error"].null_count == INPUTS
    # Batches the dead node had taken were redone elsewhere; none was written twice (checked above). The summary
    # says how many, and which node left.
    assert images_seen(calls) >= INPUTS
    summary = json.loads(storage.read_bytes(f"s3://{bucket}/out/_summary.json"))
    # `redone` counts inputs the model stage started again; the model saw fewer when the kill landed between
    # a batch's start and its forward pass (up to the dead actor's queue of 4 batches of 8).
    seen_again = images_seen(calls) - INPUTS
    assert seen_again <= summary["redone"] <= seen_again + 4 * 8
    assert summary["nodes_left"] == {"died": 1}
    assert "nodes left  1 died" in out
    assert not summary["redone"] or f"redone      {summary['redone']:,} inputs" in out


def stopped(driver: subprocess.Popen) -> tuple[str, str]:
    """The driver's (stdout, stderr), killed first if it still runs (a failed wait's message must not wait on it)."""
    if driver.poll() is None:
        driver.kill()
    return driver.communicate()
