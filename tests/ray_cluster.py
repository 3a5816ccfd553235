"""A real two-node Ray cluster on this one machine, for tests that kill a node mid-job.

    with TwoNodeCluster(head_cpus=1, worker_cpus=2, env={"PYTHONPATH": ...}) as cluster:
        # a driver (best in a subprocess: the test process may already hold a local Ray) joins
        # with ray.init(address=cluster.address)
        ...
        cluster.kill_worker()           # SIGKILL the second node: its raylet, workers and `ray start`
        cluster.wait_worker_dead()      # until the head's GCS has marked it dead (~3 s with FAST_HEALTH_CHECK)

Each node is a `ray start --block` subprocess in its own session (start_new_session=True) and its own
--temp-dir. Every process a node spawns (raylet, agents, log monitor, and the raylet's worker processes,
which each get their own process group but keep the session) carries that session id, so a node is
killed by killing its session, found through /proc, without touching any other Ray on the machine.
Ray binds to the machine's own interface address (not 127.0.0.1) even when joined through 127.0.0.1;
that is fine, everything stays on this machine.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

# The head's GCS marks a node dead after `failure_threshold` failed health checks `period_ms` apart
# (Ray's defaults, 3000 ms x 5, take ~15 s). A SIGKILLed raylet refuses connections at once, so the
# timeout hardly matters for it; it is kept generous so that a busy 2-core machine never fails a live node.
FAST_HEALTH_CHECK = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 5000,
    "health_check_failure_threshold": 3,
}

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


class TwoNodeCluster:
    """Head (custom resource `head_node`) plus a second node (custom resource `second_node`)."""

    def __init__(self, head_cpus: float = 1, worker_cpus: float = 2, env: dict[str, str] | None = None,
                 head_resources: dict[str, float] | None = None, worker_resources: dict[str, float] | None = None,
                 object_store_bytes: int = 256 * 2**20, system_config: dict | None = None,
                 startup_timeout: float = 240.0):
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.head_resources = {"head_node": 1, **(head_resources or {})}
        self.worker_resources = {"second_node": 1, **(worker_resources or {})}
        self.object_store_bytes = object_store_bytes
        self.system_config = FAST_HEALTH_CHECK if system_config is None else system_config
        # A `ray start` is up in a few seconds on an idle machine, but it is a dozen processes to start; beside other
        # test runs (load 30 on two cores) a minute leaves no margin, and a cluster that fails to start fails its
        # whole module. A deadline, not a wait: a node that is up is seen at once.
        self.startup_timeout = startup_timeout
        self.env = dict(os.environ)
        for name in ("RAY_ADDRESS", "RAY_NAMESPACE"):  # would redirect `ray start` or the drivers elsewhere
            self.env.pop(name, None)
        self.env.setdefault("RAY_AUTH_MODE", "disabled")
        # On SIGTERM `ray start` first drains its node for up to 30 s, and a head holding Ray Data's detached
        # actors (_StatsActor, ...) never drains: without this every teardown after a Dataset took ~30 s.
        self.env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        self.env.update(env or {})
        self.port: int | None = None
        self.address: str | None = None
        self.head_node_id: str | None = None
        self.worker_node_id: str | None = None
        self.root: str | None = None
        self._head: subprocess.Popen | None = None
        self._worker: subprocess.Popen | None = None
        self._gcs = None
        self.timings: dict[str, float] = {}  # seconds: head_start, worker_start, worker_stop, head_stop

    # ---- lifecycle ----

    def __enter__(self) -> "TwoNodeCluster":
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self) -> None:
        # A short root: Ray's unix socket paths under it must stay below ~107 characters.
        self.root = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
        atexit.register(self.shutdown)  # a test process that dies of an exception still leaves nothing running
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        head_args = ["--head", f"--port={self.port}", "--include-dashboard=false"]
        if self.system_config:
            head_args.append("--system-config=" + json.dumps(self.system_config))
        start = time.monotonic()
        self._head = self._start_node("head", head_args, self.head_cpus, self.head_resources)
        self.head_node_id = self._wait_for_node("head_node", self._head, "head")
        self.timings["head_start"] = time.monotonic() - start
        start = time.monotonic()
        self._worker = self._start_node("worker", [f"--address={self.address}"], self.worker_cpus,
                                        self.worker_resources)
        self.worker_node_id = self._wait_for_node("second_node", self._worker, "worker")
        self.timings["worker_start"] = time.monotonic() - start

    def shutdown(self) -> None:
        """Second node, then head: SIGTERM each `ray start` (it stops its own children), then SIGKILL leftovers."""
        for name, proc in (("worker", self._worker), ("head", self._head)):
            if proc is not None:
                start = time.monotonic()
                _stop_session(proc)
                self.timings[f"{name}_stop"] = time.monotonic() - start
        self._gcs = None
        self._head = self._worker = None
        atexit.unregister(self.shutdown)
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # ---- the second node ----

    def kill_worker(self) -> list[int]:
        """SIGKILL every process of the second node at once (no graceful exit); returns the PIDs killed.

        The `ray start` is reaped only after the sweep, so its pid (the session id) cannot be reused meanwhile.
        """
        if self._worker is None:
            return []
        killed = _kill_session(self._worker.pid, signal.SIGKILL)
        self._worker.wait(timeout=10)
        self._worker = None
        return killed

    def worker_processes(self) -> list[int]:
        """PIDs of the second node's processes still running (none once killed)."""
        return _session_pids(self._worker.pid) if self._worker is not None else []

    def worker_node_alive(self) -> bool:
        """What the head's GCS believes (it lags a SIGKILL by the health check time)."""
        return self.node_states().get(self.worker_node_id) == "ALIVE"

    def wait_worker_dead(self, timeout: float = 60.0) -> float:
        """Seconds until the GCS marked the second node dead."""
        start = time.monotonic()
        while self.worker_node_alive():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"second node still ALIVE in the GCS after {timeout} s")
            time.sleep(0.1)
        return time.monotonic() - start

    def node_states(self) -> dict[str, str]:
        """node id (hex) -> 'ALIVE' / 'DEAD', straight from the head's GCS (no driver needed)."""
        from ray.core.generated import gcs_pb2

        if self._head is None or _exited(self._head):
            return {}
        return {node_id.hex(): gcs_pb2.GcsNodeInfo.GcsNodeState.Name(info.state)
                for node_id, info in self._gcs_client().get_all_node_info(timeout=10).items()}

    # ---- internals ----

    def _start_node(self, name: str, args: list[str], cpus: float, resources: dict) -> subprocess.Popen:
        temp_dir = os.path.join(self.root, name)
        os.makedirs(temp_dir)
        log = open(os.path.join(self.root, f"{name}.log"), "wb")
        cmd = [RAY, "start", *args, f"--num-cpus={cpus}", "--resources=" + json.dumps(resources),
               f"--object-store-memory={self.object_store_bytes}", f"--temp-dir={temp_dir}",
               "--disable-usage-stats", "--block"]
        try:
            return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        finally:
            log.close()

    def _gcs_client(self):
        if self._gcs is None:
            from ray._raylet import GcsClient

            self._gcs = GcsClient(address=self.address)
        return self._gcs

    def _wait_for_node(self, resource: str, proc: subprocess.Popen, name: str) -> str:
        from ray.core.generated import gcs_pb2

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if _exited(proc):
                _kill_session(proc.pid, signal.SIGKILL)  # whatever it left behind, before the pid is reaped
                raise RuntimeError(f"ray {name} node exited with {proc.wait()}:\n{self.log(name)[-3000:]}")
            if not _exited(self._head) and os.path.exists(os.path.join(self.root, "head", "ray_current_cluster")):
                try:
                    for node_id, info in self._gcs_client().get_all_node_info(timeout=2).items():
                        if info.state == gcs_pb2.GcsNodeInfo.ALIVE and resource in info.resources_total:
                            return node_id.hex()
                except Exception:  # GCS not answering yet
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"ray {name} node not alive after {self.startup_timeout} s:\n{self.log(name)[-3000:]}")

    def log(self, name: str) -> str:
        """Output of the `ray start` for 'head' or 'worker' (Ray's own logs are under root/<name>/session_*)."""
        try:
            with open(os.path.join(self.root, f"{name}.log"), errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # the GCS listens on all interfaces
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Processes in session `sid` (a start_new_session child's pid) plus any descendants that left it."""
    parents, in_session = {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp session ...
        if fields[0] == "Z":
            continue
        pid, ppid, session = int(entry), int(fields[1]), int(fields[3])
        parents[pid] = ppid
        if session == sid:
            in_session.add(pid)
    found = set(in_session)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if pid not in found and ppid in found:
                found.add(pid)
                changed = True
    return sorted(found)


def _kill_session(sid: int, sig: int) -> list[int]:
    killed: list[int] = []
    for _ in range(50):  # until nothing is left (a dying raylet may have just forked a worker)
        pids = _session_pids(sid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return sorted(set(killed))


def _stop_session(proc: subprocess.Popen, grace: float = 10.0) -> None:
    # os.kill, not proc.send_signal/poll: those reap, and a reaped leader's pid (our session id) may be reused.
    if not _exited(proc):
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (not _exited(proc) or _session_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    _kill_session(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class DashboardHead(TwoNodeCluster):
    """One `ray start --head` node with the dashboard (the job-submission API) and the metrics export port,
    as an existing cluster's head is: `dashboard_url` for `pipeline submit`, `metrics_url` for Prometheus."""

    def __init__(self, cpus: float = 2, env: dict[str, str] | None = None, metrics_interval_ms: int = 1000):
        super().__init__(head_cpus=cpus, env=env, system_config={"metrics_report_interval_ms": metrics_interval_ms})
        self.dashboard_port: int | None = None
        self.metrics_port: int | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        import urllib.request

        self.root = tempfile.mkdtemp(prefix="ray1h-", dir="/tmp")
        atexit.register(self.shutdown)
        self.port, self.dashboard_port, self.metrics_port = _free_port(), _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # The agents' ports too: their defaults (52365, ...) are taken by any other Ray on this machine (the test
        # session's own), and a head whose agent cannot bind accepts no job ("No available agent").
        args = ["--head", f"--port={self.port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--metrics-export-port={self.metrics_port}",
                f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}", "--system-config=" + json.dumps(self.system_config)]
        self._head = self._start_node("head", args, self.head_cpus, self.head_resources)
        self.head_node_id = self._wait_for_node("head_node", self._head, "head")
        deadline = time.monotonic() + self.startup_timeout
        while True:  # the job API answers a little after the node is alive
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dashboard not answering after {self.startup_timeout} s:\n{self.log('head')[-3000:]}")
            time.sleep(0.3)


class AutoscalingHead(TwoNodeCluster):
    """A `ray start --head` with Ray's real autoscaler over its fake multi-node provider: worker nodes of the
    given types are started on this machine (raylets in the head's session) when work asks for them, and removed
    when idle. GPUs there are declared resources, no CUDA. Two gaps of the provider are filled here, not in the
    product: the wheel lacks the provider's example.yaml (the whole config is written out, with the `external`
    provider type, which needs no defaults file), and it cannot give a node `memory`
    (tests/fake_node_provider.py does).

        with AutoscalingHead(head_cpus=0, node_types={"gpu-group": {"resources": {"CPU": 2, "GPU": 1,
                             "memory": 4 * 2**30}, "min_workers": 0, "max_workers": 2}}) as cluster:
            ... pipeline run --ray-address cluster.address ...
            cluster.worker_nodes()          # {node id: node type} of the alive workers
    """

    def __init__(self, node_types: dict[str, dict], head_cpus: float = 0, env: dict[str, str] | None = None,
                 idle_timeout_s: float = 6.0, worker_object_store_bytes: int = 256 * 2**20):
        super().__init__(head_cpus=head_cpus, env=env)
        self.node_types = node_types
        self.idle_timeout_s = idle_timeout_s
        self.worker_object_store_bytes = worker_object_store_bytes

    def start(self) -> None:
        self.root = tempfile.mkdtemp(prefix="rayas-", dir="/tmp")
        atexit.register(self.shutdown)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        config_path = os.path.join(self.root, "autoscaler.json")
        with open(config_path, "w") as f:
            json.dump(self.autoscaling_config(), f)
        tests = os.path.dirname(os.path.abspath(__file__))
        self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                         "PYTHONPATH": os.pathsep.join(p for p in (tests, self.env.get("PYTHONPATH")) if p)})
        args = ["--head", f"--port={self.port}", "--include-dashboard=false", f"--autoscaling-config={config_path}",
                "--system-config=" + json.dumps(self.system_config)]
        start = time.monotonic()
        self._head = self._start_node("head", args, self.head_cpus, self.head_resources)
        self.head_node_id = self._wait_for_node("head_node", self._head, "head")
        self.timings["head_start"] = time.monotonic() - start

    def autoscaling_config(self) -> dict:
        types = {name: {"node_config": {}, "min_workers": 0, **spec,
                        "resources": {"object_store_memory": self.worker_object_store_bytes, **spec["resources"]}}
                 for name, spec in self.node_types.items()}
        types["ray.head.default"] = {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": "pipeline-test",
            "max_workers": sum(t.get("max_workers", 0) for t in self.node_types.values()),
            "provider": {"type": "external", "module": "fake_node_provider.MemoryFakeProvider",
                         "gcs_address": f"{_node_ip()}:{self.port}", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": types, "head_node_type": "ray.head.default",
            "idle_timeout_minutes": self.idle_timeout_s / 60, "upscaling_speed": 1000.0,
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def worker_nodes(self) -> dict[str, dict]:
        """Alive worker nodes: node id (hex) -> their total resources (the head excluded)."""
        from ray.core.generated import gcs_pb2

        if self._head is None or _exited(self._head):
            return {}
        return {node_id.hex(): dict(info.resources_total)
                for node_id, info in self._gcs_client().get_all_node_info(timeout=10).items()
                if info.state == gcs_pb2.GcsNodeInfo.ALIVE and node_id.hex() != self.head_node_id}

    def drain(self, node_id: str, deadline_s: float = 5.0) -> None:
        """`ray drain-node` as a preemption notice does it: no new work there, the node goes at the deadline."""
        subprocess.run([RAY, "drain-node", f"--address={self.address}", f"--node-id={node_id}",
                        "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (test)",
                        f"--deadline-remaining-seconds={int(deadline_s)}"],
                       env=self.env, check=True, capture_output=True, timeout=60)

    def kill_node(self, node_id: str) -> list[int]:
        """SIGKILL every process of one fake worker node (the provider starts them with the node's id in their
        environment), as a cloud does to a reclaimed machine.

        Only this cluster's processes (the head's session and its descendants) are looked at: the fake provider
        numbers its nodes the same way in every cluster (fff...00001, fff...00002), so another autoscaling cluster
        on the machine (another pytest worker's, another checkout's suite) has nodes with these very ids."""
        if self._head is None:
            return []
        pids = []
        for pid in _session_pids(self._head.pid):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() in f.read().split(b"\0"):
                        pids.append(pid)
            except OSError:
                continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def log(self, name: str) -> str:
        text = super().log(name)
        if name == "head" and self.root:  # the autoscaler's own log says why a node did not come
            for path in sorted(glob.glob(os.path.join(self.root, "head", "session_*", "logs", "monitor.*"))):
                with open(path, errors="replace") as f:
                    text += f"\n--- {os.path.basename(path)}\n" + f.read()[-4000:]
        return text


def _node_ip() -> str:
    """The address Ray binds to on this machine (not 127.0.0.1, whatever it is asked), which the provider's
    worker nodes dial to reach the head's GCS."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()
