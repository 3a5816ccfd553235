"""What a person running `pipeline run` sees: our own lines from the start, none of Ray's, and no Ray process left
behind when the driver is killed. Real `pipeline` processes on a folder of small photos (tests/counting_model.py)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import encode, photo
from pipeline.run.counts import Tally
from pipeline.run.progress import ProgressPrinter

TESTS = Path(__file__).parent

# What Ray itself prints into its driver's streams: its C++ log lines ("[2026-12-06 03:15:24,413 E 7522 7522]
# core_worker.cc:2465: …"), the lines it forwards from its workers and daemons ("(raylet) …", "(gcs_server) E …",
# "(MapWorker(…) pid=123) …", "(autoscaler +12s) …", "Resized to 0 CPUs."), and its Python warnings.
RAY_LINES = [
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]",
    r"\b\w+\.cc:\d+:",
    r"\((raylet|gcs_server|autoscaler|monitor|dashboard\w*|log_monitor)\b",
    r"\([^()]*\bpid=\d+",
    r"\bResized to\b",
    r"ray status",
    r"RayDeprecationWarning|site-packages/ray/",
]


def put_photos(folder: Path, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        (folder / f"photo{i:02d}.jpg").write_bytes(encode(photo(seed=i), "JPEG"))


def pipeline_run(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "--input", str(tmp_path / "in"), "--output",
            str(tmp_path / "out"), "--model", "counting_model:build", "--batch-size", "4"]


def env_with(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PIPELINE_TEST_CALLS": str(tmp_path / "calls.txt"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra}
    env.pop("PIPELINE_FAILPOINTS", None)
    env.pop("RAY_ADDRESS", None)
    return env


def ray_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(re.search(p, line) for p in RAY_LINES)]


STEPS = {"ray": ("starting Ray and checking the model", "Ray ready: a new local Ray"),
         "local": ("starting the local executor and checking the model", "the local executor ready: this machine")}


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_run_prints_our_lines_from_the_start_and_none_of_rays(executor, tmp_path, s3_server):
    """A model process dies mid-batch (its batch is redone): what Ray or the dead process say goes to logs, not to
    the console."""
    put_photos(tmp_path / "in", 8)
    env = env_with(tmp_path, PIPELINE_TEST_DIE_ONCE=str(tmp_path / "died"))
    run = subprocess.run([*pipeline_run(tmp_path), "--executor", executor], env=env, capture_output=True, text=True,
                         timeout=300)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "died").exists()  # a model process did die
    assert ray_lines(run.stdout + run.stderr) == [] and run.stderr == ""
    lines = run.stdout.splitlines()
    first_count = next(i for i, line in enumerate(lines) if re.match(r"  \[ *\d+\.\ds\]|Run \S+ completed", line))
    before = "\n".join(lines[:first_count])
    for step in ("Job: ", "checking the input and the output", *STEPS[executor], "model counting_model:build ready"):
        assert step in before, run.stdout
    assert "redone" in run.stdout
    # What Ray (or the model process) said went to logs, where the console's line points.
    logs = Path(re.search(r"(?:its logs|the model process's log) in (\S+)", run.stdout).group(1))
    assert [p.name for p in logs.glob("pipeline-driver-*.log" if executor == "ray" else "worker-*.log")]


def test_before_the_first_input_is_done_the_live_line_says_what_the_job_does():
    listing = {"listed": 1_234, "skipped": 0, "already_done": 0, "done": False}
    printer = ProgressPrinter(Tally(), lambda: listing, io.StringIO(), interval=60)
    assert printer.render(80) == "listing: 1,234 found …"
    listing["done"] = True
    assert printer.render(80).startswith("listing: 1,234 found; waiting for the model's first batch")
    assert len(printer.render(30)) <= 30


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, or None once it is gone (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process under `root` now."""
    stats = {pid: stat for pid in pids() if (stat := proc_stat(pid)) is not None}
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, started) in stats.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def session_of(family: dict[int, int]) -> str:
    """The Ray session's folder, from the command line of the GCS the driver started (--log_dir=<session>/logs)."""
    for pid in family:
        match = re.search(r"--log_dir=(\S+)/logs\b", cmdline(pid))
        if match:
            return match.group(1)
    raise AssertionError(f"no GCS under the driver: {[cmdline(pid)[:60] for pid in family]}")


def alive(pid: int, started: int | None = None) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z" and (started is None or stat[2] == started)


def holds_file_under(pid: int, folder: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder + "/"):
                return True
        except OSError:
            continue
    return False


def session_processes(session_dir: str, family: dict[int, int]) -> list[str]:
    """Alive (zombies aside): the driver's descendants seen before the kill, and any process naming the session's
    folder on its command line or holding a file open under it."""
    left = {pid for pid, started in family.items() if alive(pid, started)}
    left |= {pid for pid in pids() if pid != os.getpid() and alive(pid)
             and (session_dir in cmdline(pid) or holds_file_under(pid, session_dir))}
    return sorted(f"{pid} {cmdline(pid)[:80]}" for pid in left)


def test_after_a_kill_9_of_the_driver_no_process_of_its_ray_session_stays(tmp_path, s3_server):
    put_photos(tmp_path / "in", 8)
    env = env_with(tmp_path, PIPELINE_TEST_DELAY_S="5")  # a slow model: the kill falls while it runs
    calls = tmp_path / "calls.txt"
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([*pipeline_run(tmp_path), "--executor", "ray"], env=env, stdout=out, stderr=err)
    family: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 300
        while not (calls.exists() and calls.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        family = descendants(proc.pid)
        session_dir = session_of(family)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        deadline = time.monotonic() + 10
        left = session_processes(session_dir, family)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = session_processes(session_dir, family)
        assert left == [], f"alive 10 s after the driver's SIGKILL: {left}"
    finally:
        proc.kill()
        for pid, started in family.items():  # what a failure left behind is not left to the next tests
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)


CONSOLE_SCRIPT = """
import os, sys
import ray.exceptions
from pipeline.ray.console import Console

console = Console.of_this_process()
print("ours, before", file=console.out)
console.divert(sys.argv[1])
os.write(2, b"native chatter\\n")
print("printed by Ray to sys.stdout")
print("ours, after", file=console.out)
print("a warning", file=sys.stderr)
try:
    with console.ray_failures():
        raise ray.exceptions.RaySystemError("the raylet went away")
except Exception as exc:
    print(f"error: {exc}", file=sys.stderr)
"""


def test_once_diverted_the_process_streams_go_to_the_session_log_and_a_ray_failure_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "ours, before\nours, after\n"
    log = next(tmp_path.glob("pipeline-driver-*.log"))
    warning, error = run.stderr.splitlines()
    assert warning == "a warning"
    assert error.startswith("error: Ray failed the job (RaySystemError: ") and "the raylet went away" in error
    assert error.endswith(f"its traceback is in {log}, Ray's logs beside it")
    held = log.read_text()
    assert "native chatter" in held and "printed by Ray to sys.stdout" in held
    assert "Traceback" in held and "the raylet went away" in held
