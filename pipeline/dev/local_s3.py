"""An S3-compatible server on 127.0.0.1 (moto's), for the demo, the tests and the benchmarks.

It runs as its own process, so the Ray workers reach it over HTTP exactly as they would reach S3.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from pipeline.io.storage import Storage

# moto accepts any credentials; these make boto3 and s3fs sign requests without touching ~/.aws.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}

# `python -m moto.server`, plus a thread that ends it once the process that started it is gone. stop() ends it on
# every path that runs Python's cleanup; this covers the rest: a demo or test process SIGKILLed (a subprocess
# timeout, pytest-timeout, CI cancelling) or SIGTERMed left its moto server running under PID 1, serving nobody.
_MOTO_WITH_PARENT = """\
import os, runpy, sys, threading, time
parent = int(sys.argv.pop(1))
def end_with_parent():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=end_with_parent, name="end-with-parent", daemon=True).start()
runpy.run_module("moto.server", run_name="__main__", alter_sys=True)
"""


class LocalS3Server:
    def __init__(self, port: int | None = None, environ: dict[str, str] | None = None):
        """`environ`: extra variables for the server process, e.g. moto's INITIAL_NO_AUTH_ACTION_COUNT, after which
        it enforces IAM users and policies."""
        self.port = port or _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.server_environ = dict(environ or {})
        self._process: subprocess.Popen | None = None

    def start(self) -> "LocalS3Server":
        self._process = subprocess.Popen(
            [sys.executable, "-c", _MOTO_WITH_PARENT, str(os.getpid()), "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, **self.server_environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self._process.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within 30 s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process = None

    def environ(self) -> dict[str, str]:
        """Variables that point boto3, s3fs and this pipeline at the server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_server(server: LocalS3Server) -> None:
    """Point this process (and Ray workers it starts afterwards) at the server."""
    os.environ.update(server.environ())


@contextmanager
def local_bucket(name: str) -> Iterator[tuple[LocalS3Server, Storage]]:
    """A server with one bucket, this process (and the Ray workers it starts afterwards) pointed at it."""
    with LocalS3Server() as server:
        use_server(server)
        storage = Storage.from_env()
        storage.s3_client.create_bucket(Bucket=name)
        yield server, storage


def serve(port: int | None = None) -> None:
    """`python -m pipeline.dev.local_s3 [PORT]`: a server to try jobs against by hand; Ctrl-C stops it."""
    with LocalS3Server(port=port) as s3:
        print("S3-compatible server running; in another shell:")
        for name, value in s3.environ().items():
            print(f"  export {name}={value}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else None)
