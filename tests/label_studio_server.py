"""A real Label Studio server for the tests: `label-studio` from PyPI in its own venv (it pins pyarrow < 25, the
pipeline needs 26), built once per machine under ~/.cache/pipeline-tests/, on SQLite, offline, no browser.

Building the venv took 51-103 s on a fresh machine and the first start on an empty database (its migrations, the
test user) 35 s more (280 s at load average 13); a start on a copy of that database takes 5-11 s. So a thread
makes both, the venv and the template database (`TEMPLATE`), as soon as the session knows a test will need the
server (`start_building`, from conftest's collection hook), overlapping the tests that run before. The settings
it starts with: Label Studio in the project's shared FACTS.md.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

VERSION = "1.23.2"
VENV = Path.home() / ".cache" / "pipeline-tests" / f"label-studio-{VERSION}"
TEMPLATE = VENV.parent / f"label-studio-{VERSION}-data"  # a migrated database with the test user
USER, PASSWORD, TOKEN = "reviewer@example.com", "review-pass-123", "pipeline-tests-token-0123456789abcdef"
START_TIMEOUT_S = 420  # a first start took 280 s at load average 13 on 2 cores

_build: Future | None = None
_lock = threading.Lock()
_running: set[subprocess.Popen] = set()  # servers to end if the session ends first (the template's, mid-make)
atexit.register(lambda: [process.kill() for process in list(_running)])


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen
    data_dir: str
    prepare_s: float  # seconds this session spent on the venv and the template database (0: they were there)
    start_s: float

    def api(self, path: str, body=None, method: str | None = None):
        request = urllib.request.Request(self.url + path, method=method or ("POST" if body is not None else "GET"),
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Token {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def stop(self, keep: bool = False) -> None:
        _running.discard(self.process)
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if not keep:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def prepare() -> float:
    """The venv and the template database, each made unless complete; seconds spent. A file lock keeps two test
    processes (pytest-xdist workers) from making them at once."""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / f"{VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seconds = build_venv()
        if not (TEMPLATE / ".complete").exists():
            started = time.monotonic()
            shutil.rmtree(TEMPLATE, ignore_errors=True)
            TEMPLATE.mkdir()
            start_server(TEMPLATE).stop(keep=True)
            (TEMPLATE / ".complete").write_text(f"made in {time.monotonic() - started:.0f} s\n")
            seconds += time.monotonic() - started
        return seconds


def build_venv() -> float:
    if (VENV / ".complete").exists():
        return 0.0
    started = time.monotonic()
    shutil.rmtree(VENV, ignore_errors=True)
    python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    subprocess.run([python, "-m", "venv", str(VENV)], check=True, capture_output=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    f"label-studio=={VERSION}"], check=True, capture_output=True)
    seconds = time.monotonic() - started
    (VENV / ".complete").write_text(f"built in {seconds:.0f} s\n")
    return seconds


def start_server(data_dir: Path, prepare_s: float = 0.0) -> Server:
    """label-studio on `data_dir` and a free port, waited for until its API answers the test user's token."""
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()),
           "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "LABEL_STUDIO_USERNAME": USER,
           "LABEL_STUDIO_PASSWORD": PASSWORD,
           "LABEL_STUDIO_USER_TOKEN": TOKEN, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "DJANGO_DB": "sqlite"}
    started = time.monotonic()
    log = open(data_dir / "server.log", "wb")
    process = subprocess.Popen([str(VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host",
                                "127.0.0.1", "--port", str(port), "--enable-legacy-api-token"],
                               env=env, cwd=data_dir, stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the server holds its own copy
    _running.add(process)
    server = Server(f"http://127.0.0.1:{port}", TOKEN, process, str(data_dir), prepare_s, 0.0)
    while time.monotonic() - started < START_TIMEOUT_S:
        if process.poll() is not None:
            break
        try:
            server.api("/api/projects")
            server.start_s = time.monotonic() - started
            return server
        except OSError:
            time.sleep(1)
    tail = (data_dir / "server.log").read_text(errors="replace")[-2000:]
    server.stop()
    raise RuntimeError(f"Label Studio did not answer on port {port} within {START_TIMEOUT_S} s "
                       f"(a busy port makes it pick another silently):\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_building() -> None:
    """Begins making the venv and template database in a thread, once per process: a test process that will need
    the server calls this at collection. (The session's own server starts in its fixture: under pytest-xdist every
    worker collects every test, and only one will run them.)"""
    global _build
    with _lock:
        if _build is None:
            _build = Future()
            threading.Thread(target=_build_into, args=(_build,), name="label-studio-venv", daemon=True).start()


def _build_into(future: Future) -> None:
    try:
        future.set_result(prepare())
    except BaseException as exc:  # noqa: BLE001 - handed to the test that waits
        future.set_exception(exc)


def server() -> Server:
    """A server for the session on a copy of the template database, once the thread has made it."""
    start_building()
    prepare_s = _build.result()
    data_dir = Path(tempfile.mkdtemp(prefix="label-studio-"))
    shutil.copytree(TEMPLATE, data_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.log", ".complete"))
    return start_server(data_dir, prepare_s)


if __name__ == "__main__":  # .ci/run makes both beside the project's own install, before the tests start
    print(f"Label Studio venv and template database ready ({prepare():.0f} s)")
