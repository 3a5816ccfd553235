"""The `pipeline` command's console while a job runs, and where Ray's own output goes instead. Once Ray has
started, the process's descriptors 1 and 2 point into a file of the session's logs and the command talks to its
user through `Console.out` and `Console.err` (which sys.stderr becomes); a job that Ray fails ends with one line
naming that file. Only the `pipeline` process does this (commands.entry): a caller of run_job keeps its streams.
Why: docs/design-notes.md#pipelinerayconsolepy"""

from __future__ import annotations

import io
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator, TextIO

from pipeline.job.errors import JobFailed


class Console:
    """The command's own streams to its user, and the file its process's descriptors 1 and 2 go to once diverted."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out = out
        self.err = err
        self.log_path: str | None = None  # set by divert()

    @classmethod
    def of_this_process(cls) -> "Console":
        """Copies of descriptors 1 and 2 as they are now (a terminal, a pipe, a file), in the streams' encodings."""
        return cls(_copy_of(sys.stdout, 1), _copy_of(sys.stderr, 2))

    def divert(self, logs_dir: str) -> str:
        """Descriptors 1 and 2 (and with them what Ray prints to sys.stdout and to the old sys.stderr) into
        `logs_dir`/pipeline-driver-<pid>.log; sys.stderr becomes the console's. Returns the file's path."""
        if self.log_path is not None:
            return self.log_path
        path = os.path.join(logs_dir, f"pipeline-driver-{os.getpid()}.log")
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stderr = self.err
        self.log_path = path
        return path

    @contextmanager
    def ray_failures(self) -> Iterator[None]:
        """A failure that Ray raises, once diverted, becomes one line naming the log file with its traceback."""
        try:
            yield
        except Exception as exc:
            if self.log_path is None or not is_ray_failure(exc):
                raise
            with open(self.log_path, "a", encoding="utf-8") as log:
                traceback.print_exception(exc, file=log)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise JobFailed(f"Ray failed the job ({type(exc).__name__}: {first}); its traceback is in "
                            f"{self.log_path}, Ray's logs beside it") from None


def is_ray_failure(exc: BaseException) -> bool:
    """An error of Ray's (a task or actor that failed, a lost object, a dead node), user code's included."""
    if "ray" not in sys.modules:
        return False
    import ray.exceptions

    return isinstance(exc, ray.exceptions.RayError)


def _copy_of(stream: TextIO | None, fd: int) -> TextIO:
    """A line-buffered text stream on a duplicate of `fd`, unaffected when `fd` itself is redirected later."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    errors = getattr(stream, "errors", None) or "strict"
    return io.TextIOWrapper(io.BufferedWriter(io.FileIO(os.dup(fd), "w")), encoding=encoding, errors=errors,
                            line_buffering=True)
