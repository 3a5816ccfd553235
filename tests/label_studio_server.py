"""A real Label Studio server for the tests: `label-studio` from PyPI in its own venv (it pins pyarrow < 25, the
pipeline needs 26), built once per machine under ~/.cache/pipeline-tests/, on SQLite, offline, no browser.

Building the venv takes ~50 s on a fresh machine, so it begins in a thread as soon as the session knows a test
will need the server (`start_building`, from conftest's collection hook), overlapping the tests that run before;
the first start on an empty database takes ~30 s more. The settings: ../shared/FACTS.md, "Label Studio".
"""

from __future__ import annotations

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
USER, PASSWORD, TOKEN = "reviewer@example.com", "review-pass-123", "pipeline-tests-token-0123456789abcdef"
START_TIMEOUT_S = 240

_build: Future | None = None
_lock = threading.Lock()


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen
    data_dir: str
    build_s: float  # seconds spent building the venv in this session (0: it was there)
    start_s: float

    def api(self, path: str, body=None, method: str | None = None):
        request = urllib.request.Request(self.url + path, method=method or ("POST" if body is not None else "GET"),
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Token {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def build_venv() -> float:
    """The server's venv, built unless a complete one is there; seconds spent. A file lock keeps two test
    processes (pytest-xdist workers) from building it at once."""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / f"{VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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


def start_server(build_s: float) -> Server:
    """label-studio on a free port, waited for until its API answers the test user's token."""
    data_dir = tempfile.mkdtemp(prefix="label-studio-")
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()),
           "LABEL_STUDIO_BASE_DATA_DIR": data_dir, "LABEL_STUDIO_USERNAME": USER, "LABEL_STUDIO_PASSWORD": PASSWORD,
           "LABEL_STUDIO_USER_TOKEN": TOKEN, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "DJANGO_DB": "sqlite"}
    started = time.monotonic()
    log = open(os.path.join(data_dir, "server.log"), "wb")
    process = subprocess.Popen([str(VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host",
                                "127.0.0.1", "--port", str(port), "--enable-legacy-api-token"],
                               env=env, cwd=data_dir, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", TOKEN, process, data_dir, build_s, 0.0)
    while time.monotonic() - started < START_TIMEOUT_S:
        if process.poll() is not None:
            break
        try:
            server.api("/api/projects")
            server.start_s = time.monotonic() - started
            return server
        except OSError:
            time.sleep(1)
    tail = Path(data_dir, "server.log").read_text(errors="replace")[-2000:]
    server.stop()
    raise RuntimeError(f"Label Studio did not answer on port {port} within {START_TIMEOUT_S} s "
                       f"(a busy port makes it pick another silently):\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_building() -> None:
    """Begins building the venv in a thread, once per process: a test process that will need the server calls
    this at collection, so the ~50 s of pip overlap the tests before. (Not the server: under pytest-xdist every
    worker collects every test, and only one will run them.)"""
    global _build
    with _lock:
        if _build is None:
            _build = Future()
            threading.Thread(target=_build_into, args=(_build,), name="label-studio-venv", daemon=True).start()


def _build_into(future: Future) -> None:
    try:
        future.set_result(build_venv())
    except BaseException as exc:  # noqa: BLE001 - handed to the test that waits
        future.set_exception(exc)


def server() -> Server:
    """A server for the session, started once the venv is there."""
    start_building()
    return start_server(_build.result())
