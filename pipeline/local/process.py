"""The local executor's model process, as the driver holds it: started, spoken to over a socket, stopped. Light to
import (the standard library only), so that the CLI starts it before it imports anything heavy: the model process
imports torch while the driver imports the rest (pipeline/cli/commands.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection

from pipeline.job.errors import JobFailed, UserError


def new_log_dir() -> str:
    return tempfile.mkdtemp(prefix="pipeline-local-")


def start_model_process(source: str = "torchvision") -> "WorkerProcess":
    """A model process for a local run, started as early as the CLI knows the job runs here; it imports what the
    model `source` needs at once."""
    return WorkerProcess(new_log_dir(), source)


class WorkerDied(Exception):
    pass


class WorkerProcess:
    """The model process and its socket; its output goes to a log file, not the console."""

    def __init__(self, log_dir: str, source: str = "torchvision"):
        self.log_dir = log_dir
        self.log_path = os.path.join(log_dir, f"worker-{time.strftime('%H%M%S')}-{os.getpid()}.log")
        ours, theirs = socket.socketpair()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline.local.worker", str(theirs.fileno()), source],
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, env={**os.environ, "PYTHONPATH": driver_path()})
        theirs.close()
        self.conn = Connection(ours.detach())

    def send(self, *message) -> None:
        """A process that died is not noticed here: the next `receive` raises WorkerDied."""
        try:
            self.conn.send(message)
        except OSError:
            pass

    def receive(self) -> tuple:
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            raise WorkerDied() from None
        if message[0] == "error":
            _, kind, text = message
            if kind == "user":
                raise UserError(text)
            raise JobFailed(f"the model process failed: {text} (its log: {self.log_path})")
        return message

    def stop(self) -> None:
        self.conn.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def driver_path() -> str:
    """This process's import path, so that the model process imports what it does (a custom `module:build_fn`
    beside the job spec, on a path the caller added)."""
    return os.pathsep.join(p or os.getcwd() for p in sys.path)
