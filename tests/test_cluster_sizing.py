"""`compute: auto` on the cluster as it is and as its autoscaler can make it: the pool decided, the one-line
refusals of what no node can ever hold, and the waiting line. tests/test_autoscaling.py runs the real thing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.ray.cluster import ClusterView, NodeType, node_types_from_autoscaling_config, plan_pool, read_cluster, \
    waiting_for
from pipeline.job.config import ComputeConfig, load_job
from pipeline.job.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
HEAD = {"memory": 6 * GIB, "node:__internal_head__": 1.0}  # a KubeRay head with num-cpus 0


def shipped_cluster() -> ClusterView:
    """infra/kuberay/raycluster.yaml as KubeRay's in-tree autoscaler reads it (Ray's own translation)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = yaml.safe_load((ROOT / "infra/kuberay/raycluster.yaml").read_text())
    return ClusterView([HEAD], node_types_from_autoscaling_config(_derive_autoscaling_config_from_ray_cr(cr)),
                       "KubeRay RayCluster batch-inference/pipeline")


def shape(pool) -> tuple[float, int, int]:
    return pool.num_gpus, pool.min_actors, pool.max_actors


def job_compute(name: str) -> ComputeConfig:
    return load_job(str(ROOT / "jobs" / name), {}).compute


def test_local_ray_without_autoscaler_keeps_todays_pool(ray_session):
    view = read_cluster()  # the test session's Ray: 2 CPUs, no GPU, no autoscaler
    assert view.autoscaler is None and not view.has_gpus and view.max_cpus == 2
    assert shape(plan_pool(ComputeConfig(), view)[0]) == (0.0, 2, 2)
    assert shape(plan_pool(ComputeConfig(num_cpus_per_actor=0.5), view)[0]) == (0.0, 4, 4)
    assert shape(plan_pool(ComputeConfig(min_actors=1), view)[0]) == (0.0, 1, 2)
    assert shape(plan_pool(ComputeConfig(min_actors=1, max_actors=3), view)[0]) == (0.0, 1, 3)


def test_shipped_nightly_spec_on_the_shipped_cluster_gets_one_gpu_actor_per_gpu_of_the_group():
    view = shipped_cluster()
    assert {t.name: (t.min_workers, t.max_workers, t.resources.get("GPU", 0)) for t in view.node_types} == \
        {"cpu": (0, 4, 0), "gpu": (0, 8, 1)}
    pool, request = plan_pool(job_compute("nightly_labeling.yaml"), view)
    assert (pool.num_gpus, pool.min_actors, pool.max_actors) == (1.0, 1, 8)
    assert pool.describe(request) == "model actors: 1..8, 1 GPU each (autoscaler: gpu 0..8 x 1 GPU)"
    assert pool.cluster_cpus == 4 * 8 + 8 * 8  # read tasks are sized for the cluster it can become
    for other in ("tag_archive.yaml", "backfill_medical.yaml"):
        pool, _ = plan_pool(job_compute(other), view)
        assert (pool.num_gpus, pool.max_actors) == (1.0, 8), other


def test_cpu_inference_on_an_autoscaling_cluster_counts_the_cpu_group():
    pool, request = plan_pool(ComputeConfig(num_gpus_per_actor=0, num_cpus_per_actor=2, min_actors=1),
                              shipped_cluster())
    # cpu group: 4 nodes x 8 CPUs / 2; gpu group: 8 nodes x 8 CPUs / 2 (the autoscaler may start either).
    assert (pool.num_gpus, pool.min_actors, pool.max_actors) == (0.0, 1, 48)
    assert "cpu 0..4 x 8 CPU" in pool.describe(request)


def test_an_actor_no_node_type_can_hold_is_one_line():
    with pytest.raises(UserError) as info:
        plan_pool(ComputeConfig(memory_per_actor_gb=64), shipped_cluster())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("compute: a model actor needs 1 GPU, 1 CPU, 64 GiB memory and no node up and no node "
                              "type of its autoscaler offers that (node up: 0 GPU, 0 CPU, 6 GiB; ")
    assert "node type gpu: 1 GPU, 8 CPU, 48 GiB" in message and "memory_per_actor_gb" in message


def test_a_gpu_asked_of_a_cluster_without_any_is_one_line():
    view = ClusterView([{"CPU": 8.0, "memory": 16 * GIB}])
    with pytest.raises(UserError, match=r"needs 1 GPU, 1 CPU, 2 GiB memory and no node offers that .*"
                                        r"set compute.num_gpus_per_actor: 0"):
        plan_pool(ComputeConfig(num_gpus_per_actor=1), view)
    cpu_only = ClusterView([HEAD], [NodeType("cpu", {"CPU": 4.0, "memory": 8 * GIB}, 0, 3)], "autoscaler config")
    with pytest.raises(UserError, match="no node type of its autoscaler offers that .*node type cpu: 0 GPU, 4 CPU, 8 GiB"):
        plan_pool(ComputeConfig(num_gpus_per_actor=1), cpu_only)
    assert shape(plan_pool(ComputeConfig(), cpu_only)[0]) == (0.0, 12, 12)  # auto: CPU inference, 3 nodes x 4


def test_more_min_actors_than_the_cluster_can_ever_hold_is_one_line():
    with pytest.raises(UserError, match=r"compute.min_actors: 9 model actors .* never fit .*at most 8"):
        plan_pool(ComputeConfig(min_actors=9, max_actors=9), shipped_cluster())


def test_waiting_line_names_what_the_job_waits_for():
    view = shipped_cluster()
    pool, request = plan_pool(job_compute("nightly_labeling.yaml"), view)
    assert waiting_for(request, view) == ("waiting for nodes: a model actor needs 1 GPU, 1 CPU, 2 GiB memory; "
                                          "waiting for the autoscaler to add gpu 0..8 x 1 GPU")
    up = ClusterView([HEAD, {"CPU": 8.0, "GPU": 1.0, "memory": 48 * GIB}], view.node_types, view.autoscaler)
    assert waiting_for(request, up) is None
