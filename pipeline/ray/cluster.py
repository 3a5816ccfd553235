"""What the Ray cluster offers the model actors: the nodes up now and, on a cluster with an autoscaler, the node
types it can add (from the GCS, the KubeRay RayCluster or the head's autoscaling config). `plan_pool` turns that
and the job's `compute` section into the pool Ray Data runs (`compute`'s `auto` settings sized for what the cluster
can become); `ClusterWatch` tells the progress line what the job is waiting for and counts the nodes that leave
while it runs. Why: docs/design-notes.md#pipelinerayclusterpy"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

from pipeline.job.errors import UserError

GIB = 2**30
KUBERAY_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Ray's NodeDeathInfo.Reason, as ray.nodes() reports it in DeathReason.
DEATH_REASONS = {1: "stopped", 2: "died", 3: "preempted (drained)", 4: "idle, removed by the autoscaler"}


@dataclass(frozen=True)
class NodeType:
    """A worker group the autoscaler may start: each node's Ray resources (memory in bytes) and its bounds."""
    name: str
    resources: dict[str, float]
    min_workers: int
    max_workers: int

    def describe(self) -> str:
        gpus = self.resources.get("GPU", 0)
        offer = f"{_num(gpus)} GPU" if gpus else f"{_num(self.resources.get('CPU', 0))} CPU"
        return f"{self.name} {self.min_workers}..{self.max_workers} x {offer}"


@dataclass(frozen=True)
class ActorRequest:
    """The resources one model actor asks Ray for."""
    cpus: float
    gpus: float
    memory: float  # bytes

    def fits(self, resources: dict[str, float]) -> int:
        """How many such actors one node with these resources holds. An undeclared memory does not limit."""
        counts = [math.floor(resources.get("CPU", 0) / self.cpus + 1e-9)] if self.cpus else []
        if self.gpus:
            counts.append(math.floor(resources.get("GPU", 0) / self.gpus + 1e-9))
        if self.memory and "memory" in resources:
            counts.append(math.floor(resources["memory"] / self.memory + 1e-9))
        return max(0, min(counts)) if counts else 0

    def describe(self) -> str:
        parts = [f"{_num(self.gpus)} GPU"] if self.gpus else []
        parts.append(f"{_num(self.cpus)} CPU")
        if self.memory:
            parts.append(f"{_num(self.memory / GIB)} GiB memory")
        return ", ".join(parts)


@dataclass
class ClusterView:
    """The nodes up now and, where an autoscaler was found, its worker node types."""
    nodes: list[dict[str, float]]  # alive nodes' total resources
    node_types: list[NodeType] = field(default_factory=list)
    autoscaler: str | None = None  # where the node types came from; None: no autoscaler known

    @property
    def max_cpus(self) -> float:
        now = sum(n.get("CPU", 0) for n in self.nodes)
        head = sum(n.get("CPU", 0) for n in self.nodes if n.get("node:__internal_head__"))
        return max(now, head + sum(t.resources.get("CPU", 0) * t.max_workers for t in self.node_types))

    @property
    def has_gpus(self) -> bool:
        return any(n.get("GPU", 0) > 0 for n in self.nodes) or \
            any(t.resources.get("GPU", 0) > 0 and t.max_workers > 0 for t in self.node_types)


@dataclass(frozen=True)
class PoolPlan:
    num_gpus: float
    min_actors: int
    max_actors: int
    why: str
    cluster_cpus: float = 0  # the CPUs the cluster has, or can have once its autoscaler has added every node
    cpus_each: float = 1
    cpu_decode_apart: bool = False  # without a GPU, each actor decodes its own batches on its own core

    def describe(self, request: ActorRequest | None = None) -> str:
        cpus = request.cpus if request is not None else self.cpus_each
        each = f"{_num(self.num_gpus)} GPU each" if self.num_gpus else f"{_num(cpus)} CPU each, no GPU"
        return f"model actors: {self.min_actors}..{self.max_actors}, {each} ({self.why})"


def plan_pool(compute, view: ClusterView) -> tuple[PoolPlan, ActorRequest]:
    """The model-actor pool for this job on this cluster. Raises UserError when no node up now, and no node
    type the autoscaler can add, holds even one actor (Ray would wait for it forever)."""
    if compute.num_gpus_per_actor == "auto":
        num_gpus = 1.0 if view.has_gpus else 0.0
    else:
        num_gpus = float(compute.num_gpus_per_actor)
    request = ActorRequest(cpus=float(compute.num_cpus_per_actor), gpus=num_gpus,
                           memory=float(compute.memory_per_actor_gb) * GIB)
    now = sum(request.fits(n) for n in view.nodes)
    if view.autoscaler is not None:
        scalable = [(t, request.fits(t.resources)) for t in view.node_types]
        # Worker nodes up now belong to the node types; only the head adds room of its own.
        capacity = sum(fit * t.max_workers for t, fit in scalable) + sum(
            request.fits(n) for n in view.nodes if n.get("node:__internal_head__"))
        groups = ", ".join(t.describe() for t, fit in scalable if fit and t.max_workers) or "no node type fits one"
        why = f"autoscaler: {groups}"
    else:
        capacity = now
        why = "no autoscaler: the nodes up now"
    if capacity == 0:
        raise UserError(infeasible_message(request, view))
    max_actors = capacity if compute.max_actors == "auto" else compute.max_actors
    min_actors = max_actors if compute.min_actors == "auto" else compute.min_actors
    if min_actors > capacity:
        raise UserError(f"compute.min_actors: {min_actors} model actors of {request.describe()} each never fit "
                        f"this cluster (at most {capacity}: {why}); lower compute.min_actors or leave it 'auto'")
    return PoolPlan(num_gpus, min_actors, max_actors, why, view.max_cpus, request.cpus), request


def infeasible_message(request: ActorRequest, view: ClusterView) -> str:
    offers = [f"node up: {_offer(n)}" for n in view.nodes]
    offers += [f"node type {t.name}: {_offer(t.resources)}" for t in view.node_types if t.max_workers]
    fix = ("set compute.num_gpus_per_actor: 0 for CPU inference, or add a GPU node type" if request.gpus and
           not view.has_gpus else "lower compute.num_cpus_per_actor / memory_per_actor_gb, or add a larger "
           "node type")
    scope = "no node up and no node type of its autoscaler offers" if view.autoscaler else "no node offers"
    return f"compute: a model actor needs {request.describe()} and {scope} that ({'; '.join(offers)}); {fix}"


def waiting_for(request: ActorRequest, view: ClusterView) -> str | None:
    """What the job waits for while no node up can hold a model actor; None once one can."""
    if any(request.fits(n) for n in view.nodes):
        return None
    groups = [t.describe() for t in view.node_types if request.fits(t.resources) and t.max_workers]
    by = f"for the autoscaler to add {' or '.join(groups)}" if groups else "for a node that can hold one"
    return f"waiting for nodes: a model actor needs {request.describe()}; waiting {by}"


class ClusterWatch:
    """Polls the cluster's nodes while the job runs: what it waits for, and the nodes that left (and why).

    A node left during the run when it is dead now and was not dead when the watch began: polls a few seconds apart
    can miss a node's whole life (a spot node added and reclaimed between two of them), the GCS's dead-node record
    does not."""

    def __init__(self, request: ActorRequest, node_types: list[NodeType], nodes: list[dict]):
        self.request = request
        self.node_types = node_types
        self.dead_before = {n["NodeID"] for n in nodes if not n.get("Alive")}
        self.left: dict[str, str] = {}  # node id -> why it left
        self._lock = threading.Lock()

    def poll(self) -> str | None:
        """Updates the node record; returns a waiting line while no node up can hold a model actor."""
        import ray

        try:
            nodes = ray.nodes()
        except Exception:  # noqa: BLE001 - a GCS hiccup costs one progress line, never the job
            return None
        with self._lock:
            for n in nodes:
                if not n.get("Alive") and n["NodeID"] not in self.dead_before and n["NodeID"] not in self.left:
                    self.left[n["NodeID"]] = DEATH_REASONS.get(n.get("DeathReason", 0), "lost")
        alive = [n["Resources"] for n in nodes if n.get("Alive")]
        return waiting_for(self.request, ClusterView(alive, self.node_types))

    def nodes_left(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for why in self.left.values():
                counts[why] = counts.get(why, 0) + 1
            return counts


def read_cluster() -> ClusterView:
    """The connected Ray cluster's alive nodes and, where an autoscaler is found, its worker node types."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for source, read in (("Ray cluster config", _from_gcs_cluster_config), ("KubeRay", _from_kuberay),
                         ("autoscaler config", _from_monitor_config)):
        try:
            found = read()
        except Exception as exc:  # a source that cannot be read is skipped, and said why
            found = None
            _warn(f"could not read the autoscaler's node types from {source} ({type(exc).__name__}: {exc})")
        if found is not None:
            label, node_types = found
            return ClusterView(nodes, node_types, f"{source} {label}".strip())
    return ClusterView(nodes)


def node_types_from_autoscaling_config(config: dict) -> list[NodeType]:
    """Worker node types of a Ray autoscaling config (the `ray up` / KubeRay format)."""
    head = config.get("head_node_type")
    return [NodeType(name, {k: float(v) for k, v in spec.get("resources", {}).items()},
                     int(spec.get("min_workers", 0)), int(spec.get("max_workers", config.get("max_workers", 0))))
            for name, spec in config.get("available_node_types", {}).items() if name != head]


def _from_gcs_cluster_config() -> tuple[str, list[NodeType]] | None:
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    types = [NodeType(g.name, dict(g.resources), g.min_count, g.max_count if g.max_count >= 0 else 10**6)
             for g in config.node_group_configs]
    return "", [t for t in types if t.max_workers > 0]


def _from_kuberay() -> tuple[str, list[NodeType]] | None:
    name = os.environ.get("RAY_CLUSTER_NAME")
    if not name:
        return None
    namespace = os.environ.get("RAY_CLUSTER_NAMESPACE")
    if not namespace and os.path.exists(KUBERAY_SA_NAMESPACE):
        with open(KUBERAY_SA_NAMESPACE) as f:
            namespace = f.read().strip()
    if not namespace:
        return None
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

    return f"RayCluster {namespace}/{name}", node_types_from_autoscaling_config(
        AutoscalingConfigProducer(name, namespace)())


def _from_monitor_config() -> tuple[str, list[NodeType]] | None:
    path = _monitor_config_path()
    if path is None:
        return None
    import yaml

    with open(path) as f:
        return "", node_types_from_autoscaling_config(yaml.safe_load(f))


def _monitor_config_path() -> str | None:
    """The --autoscaling-config of this cluster's autoscaler, if it runs on this machine (the head)."""
    import ray

    gcs = ray.get_runtime_context().gcs_address
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.endswith("monitor.py") and "autoscaler" in a for a in args) and f"--gcs-address={gcs}" in args:
            for a in args:
                if a.startswith("--autoscaling-config="):
                    return os.path.expanduser(a.split("=", 1)[1])
    return None


def _offer(resources: dict[str, float]) -> str:
    parts = [f"{_num(resources.get('GPU', 0))} GPU", f"{_num(resources.get('CPU', 0))} CPU"]
    if "memory" in resources:
        parts.append(f"{_num(resources['memory'] / GIB)} GiB")
    return ", ".join(parts)


def _num(x: float) -> str:
    return f"{x:g}" if x < 10 else f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _warn(message: str) -> None:
    import sys

    print(f"  note: {message}", file=sys.stderr, flush=True)

