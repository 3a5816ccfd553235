"""Ends what a local Ray session left running once the process that started it is gone, however it went.
The driver starts `python -m pipeline.ray.reaper SESSION_DIR` (`start_reaper`) with a pipe on its stdin; at end of
file every process holding a file open under SESSION_DIR gets SIGTERM, then SIGKILL if still there a second later.
Linux only; elsewhere nothing is started. Why: docs/design-notes.md#pipelinerayreaperpy"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 1.0
DEADLINE_S = 10.0


def start_reaper(session_dir: str) -> subprocess.Popen | None:
    """The reaper for `session_dir`, watching this process. Keep the returned Popen referenced for as long as the
    session lives: when it is collected, its pipe closes and the reaper ends the session."""
    if not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen([sys.executable, "-m", "pipeline.ray.reaper", os.path.realpath(session_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # a Ctrl-C for the driver is not for the reaper


def session_processes(session_dir: str) -> list[int]:
    """Processes (but this one) that hold a file under `session_dir` open for writing, as each of the session's
    processes does its log files (someone's `tail -f` of one only reads it)."""
    prefix = session_dir.rstrip("/") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        if any(_writes_under(entry, fd, prefix) for fd in fds):
            found.append(int(entry))
    return found


def _writes_under(pid: str, fd: str, prefix: str) -> bool:
    try:
        if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
            return False
        with open(f"/proc/{pid}/fdinfo/{fd}") as info:
            flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
    except (OSError, StopIteration, ValueError):
        return False
    return flags & (os.O_WRONLY | os.O_RDWR) != 0


def reap(session_dir: str) -> None:
    """SIGTERM to the session's processes, SIGKILL to those still there after GRACE_S, until none is left."""
    deadline = time.monotonic() + DEADLINE_S
    signalled: dict[int, float] = {}
    while time.monotonic() < deadline:
        alive = session_processes(session_dir)
        if not alive:
            return
        now = time.monotonic()
        for pid in alive:
            first = signalled.setdefault(pid, now)
            if first == now:
                _signal(pid, signal.SIGTERM)
            elif now - first >= GRACE_S:
                _signal(pid, signal.SIGKILL)
        time.sleep(0.1)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # gone meanwhile
        pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    reap(sys.argv[1])


if __name__ == "__main__":
    main()
