"""Jobs on a real Ray autoscaler (Ray's fake multi-node provider, see ray_cluster.AutoscalingHead): a head with no
CPUs and a GPU worker group that scales from 0 to 2, as infra/kuberay deploys it. The shipped nightly spec scales
to a GPU actor on each of two nodes; a request no node type can hold is one line; a node drained and killed
mid-job (a spot reclaim) loses nothing; and a run without an address never joins a cluster it finds."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torchvision

from conftest import TORCH_HOME, cache_torchvision_weights, ensure_bucket, photo_jpeg
from counting_model import images_seen, nodes_seen
from ray_cluster import AutoscalingHead, TwoNodeCluster
from ray_cluster import _free_port as free_port
from test_crash import staged_rows

ROOT = Path(__file__).resolve().parent.parent
TESTS = os.path.dirname(__file__)
NIGHTLY = str(ROOT / "jobs" / "nightly_labeling.yaml")
BUCKET = "photo-archive"  # the nightly spec's own bucket, so the spec runs unchanged
GPU_GROUP = {"resources": {"CPU": 2, "GPU": 1, "memory": 4 * 2**30}, "min_workers": 0, "max_workers": 2}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    # The nodes the autoscaler starts inherit the head's environment, not a driver's: the counting model's
    # record of forward passes (tests/counting_model.py) is set up here.
    calls = tmp_path_factory.mktemp("autoscaling") / "calls.txt"
    env = {"PYTHONPATH": TESTS, "TORCH_HOME": TORCH_HOME, "PIPELINE_TEST_CALLS": str(calls),
           "PIPELINE_TEST_DELAY_S": "0.4"}
    with AutoscalingHead(node_types={"gpu-group": GPU_GROUP}, head_cpus=0, env=env) as head:
        head.calls = calls
        yield head


@pytest.fixture(autouse=True)
def no_worker_node_up(request):
    """Each test on the cluster starts on the bare head: worker nodes an earlier test scaled up are gone once idle,
    so no test depends on what another one left.

    Idle means no resource request either. Ray Data asks the autoscaler through a detached coordinator actor on the
    head; a job's exit cancels its request with a fire-and-forget call, and a request the coordinator never hears
    cancelled (the driver exits first) holds its nodes until it expires: 180 s after the job's last renewal
    (RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S), seen by the coordinator's 20 s tick, then the 6 s idle timeout.
    The deadline covers that on a busy machine; 180 s did not (a GPU node of the nightly test still up)."""
    if "cluster" not in request.fixturenames:
        return
    cluster = request.getfixturevalue("cluster")
    started = time.monotonic()
    while cluster.worker_nodes():
        assert time.monotonic() - started < 400, f"worker nodes still up after 400 s: {cluster.worker_nodes()}"
        time.sleep(0.5)
    if time.monotonic() - started > 1:
        print(f"\nworker nodes of earlier tests gone after {time.monotonic() - started:.0f}s", file=sys.stderr)


@pytest.fixture(scope="module")
def resnet50_weights():
    """TORCH_HOME holds a file where torchvision keeps ResNet50_Weights.IMAGENET1K_V2 (seeded random weights: no
    hub is reachable here); the weights name, the cache lookup and the metadata are the real path."""
    return cache_torchvision_weights(torchvision.models.ResNet50_Weights.IMAGENET1K_V2, torchvision.models.resnet50,
                                     seed=2)


@pytest.fixture
def nightly_bucket(storage):
    """The nightly spec's own bucket, its input and output prefixes empty before and after (other tests run other
    shipped specs over the same bucket)."""
    def empty() -> None:
        for prefix in ("incoming/", "labels/"):
            for page in storage.s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    storage.s3_client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})

    ensure_bucket(storage, BUCKET)
    empty()
    yield BUCKET
    empty()


DRIVERS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_driver_outlives_its_test():
    """A driver a failed test leaves running (an assert in its wait loop, communicate()'s timeout) would hold the
    cluster's nodes, and its resource request, into the next test: it is killed with its test."""
    yield
    while DRIVERS:
        output_of(DRIVERS.pop())


def output_of(driver: subprocess.Popen) -> tuple[str, str]:
    """The driver's (stdout, stderr), killed first if it still runs (a failed wait's message must not wait on it)."""
    if driver.poll() is None:
        driver.kill()
    return driver.communicate()


def run_pipeline(args: list[str], cluster: TwoNodeCluster, extra_env: dict | None = None) -> subprocess.Popen:
    driver = subprocess.Popen([sys.executable, "-m", "pipeline", "run", *args, "--ray-address", cluster.address],
                              env={**cluster.env, **(extra_env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    DRIVERS.append(driver)
    return driver


def model_actors(cluster: AutoscalingHead) -> list[dict]:
    """The model actors Ray has placed, alive or not: their node and the resources they asked for."""
    from ray.core.generated import gcs_pb2

    gcs = cluster._gcs_client()

    async def actor_table():
        return await gcs.async_get_all_actor_info(timeout=10)

    table = asyncio.run(actor_table())
    return [{"node": a.address.node_id.hex(), "resources": dict(a.required_resources),
             "alive": a.state == gcs_pb2.ActorTableData.ALIVE}
            for a in table.values() if "MapWorker" in a.class_name]


def read_output(storage, uri: str):
    fs, path = storage.fs(uri)
    fs.invalidate_cache()
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()


def test_shipped_nightly_spec_scales_to_a_gpu_actor_per_node(cluster, storage, nightly_bucket, resnet50_weights):
    inputs = 500  # about a minute on one CPU-run actor: time for the autoscaler to bring up the second node
    for i in range(inputs):
        storage.s3_client.put_object(Bucket=BUCKET, Key=f"incoming/{i:04d}.jpg", Body=photo_jpeg(i))
    started = time.monotonic()
    # Ray Data asks the autoscaler for more nodes at most every 10 s, doubling each time; a short test job asks
    # every 2 s so that it reaches its second node well before it ends.
    # Batches of 8 (a flag, the spec unchanged): a GPU's 64 would leave a CPU-run test job a handful of batches.
    driver = run_pipeline([NIGHTLY, "--batch-size", "8"], cluster,
                          {"RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2"})
    first_gpu_actor = None
    nodes_used: set[str] = set()
    nodes_up: set[str] = set()
    while driver.poll() is None:
        actors = [a for a in model_actors(cluster) if a["alive"] and a["resources"].get("GPU")]
        if actors and first_gpu_actor is None:
            first_gpu_actor = time.monotonic() - started
        nodes_used |= {a["node"] for a in actors}
        nodes_up |= set(cluster.worker_nodes())
        assert time.monotonic() - started < 400, "nightly job did not finish"
        time.sleep(0.5)
    out, err = driver.communicate()
    assert driver.returncode == 0, err[-4000:] + out[-2000:]
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 60  # a node launched near the job's end registers a moment after it
    while len(nodes_up) < 2 and time.monotonic() < deadline:
        nodes_up |= set(cluster.worker_nodes())
        time.sleep(0.5)
    print(f"\nautoscaling: first GPU actor after {first_gpu_actor:.1f}s, {len(nodes_used)} nodes, "
          f"job {elapsed:.1f}s\n{out}", file=sys.stderr)

    assert "model actors: 1..2, 1 GPU each (autoscaler: gpu-group 0..2 x 1 GPU)" in out
    actors = model_actors(cluster)
    assert all(a["resources"].get("GPU") == 1.0 for a in actors), actors
    # Ray Data asked the autoscaler for the pool's second GPU and a second GPU node came up for it. Whether the pool
    # also starts that actor before the last batch is a race the machine's speed decides (on a quiet 2-core machine
    # this 30-second job ended first), so it is not asserted.
    assert actors and len(nodes_up) == 2, (actors, nodes_up)
    assert nodes_used and nodes_used <= nodes_up and cluster.head_node_id not in nodes_used
    table = read_output(storage, f"s3://{BUCKET}/labels/")
    assert table.num_rows == inputs and len(set(table["uri"].to_pylist())) == inputs
    assert table["error"].null_count == inputs


def test_an_actor_no_node_type_can_hold_is_one_line_exit_2(cluster, storage, bucket):
    storage.s3_client.put_object(Bucket=bucket, Key="incoming/one.jpg", Body=photo_jpeg(0))
    # 64 GiB per actor: the GPU group's nodes have 4.
    job = {"input": {"uri": f"s3://{bucket}/incoming/"}, "output": {"uri": f"s3://{bucket}/infeasible/"},
           "model": {"name": "counting_model:build", "preprocess": {"resize_size": 64, "crop_size": 64}},
           "compute": {"memory_per_actor_gb": 64}}
    path = Path(cluster.root) / "infeasible.json"
    path.write_text(json.dumps(job))
    started = time.monotonic()
    driver = run_pipeline([str(path)], cluster)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(r"error: compute: a model actor needs 1 GPU, 1 CPU, 64 GiB memory and no node up and no node "
                    r"type of its autoscaler offers that \(node up: 0 GPU, 0 CPU, [\d.]+ GiB; node type gpu-group: "
                    r"1 GPU, 2 CPU, 4 GiB\); lower compute.num_cpus_per_actor / memory_per_actor_gb", lines[0]), lines[0]
    assert time.monotonic() - started < 120


def test_a_node_drained_and_reclaimed_mid_job_loses_nothing(cluster, storage, bucket, tmp_path):
    inputs = 300
    for i in range(inputs):
        storage.s3_client.put_object(Bucket=bucket, Key=f"in/{i:04d}.jpg", Body=photo_jpeg(i))
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "input": {"uri": f"s3://{bucket}/in/"}, "output": {"uri": f"s3://{bucket}/out", "checkpoint_rows": 16},
        "model": {"name": "counting_model:build", "preprocess": {"resize_size": 128, "crop_size": 128}},
        "compute": {"batch_size": 8, "min_actors": 2, "memory_per_actor_gb": 1}}))
    calls = cluster.calls
    calls.unlink(missing_ok=True)
    driver = run_pipeline([str(spec)], cluster)
    deadline = time.monotonic() + 300
    while len(nodes_seen(calls)) < 2 or staged_rows(f"s3://{bucket}/out", storage) < inputs // 5:
        assert driver.poll() is None and time.monotonic() < deadline, output_of(driver)
        time.sleep(0.2)
    assert staged_rows(f"s3://{bucket}/out", storage) < inputs  # the reclaim lands mid-job
    victim = sorted(nodes_seen(calls) - {cluster.head_node_id})[0]
    cluster.drain(victim, deadline_s=3)
    time.sleep(4)  # the scenario's own clock: the cloud takes the machine a moment after the notice's deadline
    if not cluster.kill_node(victim):  # no process left: Ray ended the drained node itself at its deadline
        deadline = time.monotonic() + 60
        while victim in cluster.worker_nodes():
            assert time.monotonic() < deadline, "the drained node is neither killed nor gone"
            time.sleep(0.2)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err[-4000:] + out[-2000:]

    table = read_output(storage, f"s3://{bucket}/out")
    assert table.num_rows == inputs and len(set(table["uri"].to_pylist())) == inputs
    assert table["error"].null_count == inputs
    summary = json.loads(storage.read_bytes(f"s3://{bucket}/out/_summary.json"))
    assert summary["nodes_left"].get("preempted (drained)") == 1, summary["nodes_left"]
    redone = images_seen(calls) - inputs
    assert summary["redone"] == redone, (summary["redone"], redone)
    print(f"\ndrain: {redone} inputs redone; summary line: "
          f"{next(l for l in out.splitlines() if 'nodes left' in l).strip()}", file=sys.stderr)


def test_a_run_without_an_address_never_joins_a_cluster_it_finds(tmp_path, cluster, classifier_files):
    """A `ray start` left on the machine (its address in Ray's ray_current_cluster file: this module's running
    head), then the file pointing where nothing listens, as a cluster that has died leaves it: `pipeline run` without
    an address starts its own Ray both times."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(photo_jpeg(i))
    args = ["--input", str(images), "--model", classifier_files["model"], "--weights", classifier_files["weights"],
            "--labels", classifier_files["labels"]]
    # Ray looks for ray_current_cluster under $TMPDIR/ray/ (short: Ray's socket paths live below it).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_NAMESPACE")}, "TMPDIR": str(ray_tmp)}
    (ray_tmp / "ray" / "ray_current_cluster").write_text(cluster.address)
    jobs_before = len(cluster._gcs_client().get_all_job_info(timeout=10))
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", *args, "--output", str(tmp_path / "a")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(cluster._gcs_client().get_all_job_info(timeout=10)) == jobs_before  # no driver joined it
    dead_address = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead_address)  # stale: nothing listens there
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", *args, "--output", str(tmp_path / "b")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Connecting to existing Ray cluster" not in run.stderr and dead_address not in run.stderr + run.stdout
    for out in ("a", "b"):
        assert pads.dataset(str(tmp_path / out), format="parquet").count_rows() == 3
    shutil.rmtree(ray_tmp, ignore_errors=True)
