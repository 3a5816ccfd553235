"""The package's shape, as ARCHITECTURE.md describes it: folders by stage, Ray only in pipeline/ray/, no import
cycles, stages that declare what they need, classes of one job (none over 120 lines), functions of one step (none
over 50)."""

import ast
import signal
import subprocess
import sys

from pipeline.dev.import_graph import PACKAGE, cycles, graph
from pipeline.dev.local_s3 import LocalS3Server

MAX_CLASS_LINES = 120
MAX_FUNCTION_LINES = 50


# Each folder imports only the folders before it: the flow's stages, then what runs them, then what people type.
LAYERS = ["privacy", "job", "io", "decode", "models", "output", "report", "review", "run", "local", "ray", "dev", "cli"]


def test_the_import_graph_has_no_cycles_and_ray_stays_in_its_adapter():
    edges, external = graph()
    assert cycles(edges) == []
    assert sorted(m for m, names in external.items() if "ray" in names and not m.startswith("pipeline.ray")) == []
    folder = lambda module: module.split(".")[1] if module.count(".") else None
    upward = [f"{m} -> {i}" for m, imported in edges.items() for i in imported
              if folder(m) in LAYERS and folder(i) in LAYERS and LAYERS.index(folder(i)) > LAYERS.index(folder(m))]
    assert upward == []


def test_the_run_s_story_and_the_stages_import_no_engine():
    """Only pipeline/ray/ imports Ray, and nothing outside it imports pipeline/ray/ but the command line and the demo."""
    edges, external = graph()
    users = sorted(m for m, imported in edges.items() if not m.startswith(("pipeline.ray", "pipeline.cli", "pipeline.dev"))
                   and any(i.startswith("pipeline.ray") for i in imported))
    assert users == []
    assert [m for m in edges if m.startswith("pipeline.run") and "ray" in external.get(m, ())] == []


def test_every_stage_declares_what_it_needs():
    """Each Stage or Source of the package says its name and its resources (in its class or its __init__), and the
    Ray adapter builds the dataset from those declarations alone: it imports no stage's module."""
    stages = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and {getattr(b, "id", None) for b in node.bases} & {"Stage", "Source"}:
                stages[f"{path.relative_to(PACKAGE.parent)}:{node.name}"] = declared(node)
    assert len(stages) >= 4, stages  # the listing, reading, decoding and the model
    assert {where: said for where, said in stages.items() if said != {"name", "resources"}} == {}
    edges, _ = graph()
    assert [i for i in edges["pipeline.ray.adapter"] if i.split(".")[1] in ("io", "decode", "models", "output")] == []


def declared(cls: ast.ClassDef) -> set[str]:
    """The names among `name` and `resources` that a class assigns in its body or on self in its methods."""
    names = set()
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        for target in targets:
            if isinstance(target, ast.Name) or (isinstance(target, ast.Attribute) and
                                                getattr(target.value, "id", None) == "self"):
                names.add(target.id if isinstance(target, ast.Name) else target.attr)
    return names & {"name", "resources"}


def test_no_function_is_over_50_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_import_graph_command_prints_the_graph_and_passes():
    result = subprocess.run([sys.executable, "-m", "pipeline.dev.import_graph"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "pipeline.ray.executor -> " in result.stdout and "cycles (modules, then folders): 0" in result.stdout


def test_no_class_is_over_120_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]
    assert long == []


def test_the_local_s3_server_command_runs_and_stops_cleanly():
    """`python -m pipeline.dev.local_s3` (infra/README.md) starts a server and, on Ctrl-C, the moto server it started."""
    server = subprocess.Popen([sys.executable, "-m", "pipeline.dev.local_s3"], stdout=subprocess.PIPE, text=True)
    try:
        lines = [server.stdout.readline() for _ in range(1 + len(LocalS3Server().environ()))]
    finally:
        # Ctrl-C, as its user stops it: SIGTERM would end it before it stops the moto server it started, left
        # running under PID 1 after the suite.
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert lines[0].startswith("S3-compatible server running")
    assert any(line.strip().startswith("export AWS_ENDPOINT_URL=http://127.0.0.1:") for line in lines)


STARTS_A_SERVER_THEN_SLEEPS = """
import sys, time
from pipeline.dev.local_s3 import LocalS3Server
print(LocalS3Server().start()._process.pid, flush=True)
time.sleep(600)
"""


def test_a_local_s3_server_ends_with_the_process_that_started_it_even_when_that_is_sigkilled():
    """`pipeline demo` (or a test's worker) SIGKILLed by a timeout cannot stop its moto server: the server goes
    by itself instead of running on under PID 1 after the suite."""
    import os
    import time

    starter = subprocess.Popen([sys.executable, "-c", STARTS_A_SERVER_THEN_SLEEPS], stdout=subprocess.PIPE, text=True)
    try:
        moto_pid = int(starter.stdout.readline())
    finally:
        starter.kill()
        starter.wait(timeout=30)
    def running() -> bool:
        try:
            with open(f"/proc/{moto_pid}/cmdline", "rb") as f:
                return b"moto.server" in f.read()  # empty once it is a zombie
        except OSError:
            return False

    deadline = time.monotonic() + 60  # it looks every 0.5 s; a busy machine may take a while to run it
    while running():
        assert time.monotonic() < deadline, f"moto server {moto_pid} still running 60 s after its starter's SIGKILL"
        time.sleep(0.2)
