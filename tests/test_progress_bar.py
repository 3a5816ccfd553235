"""The live progress bar a person at a terminal sees, and the plain lines a log keeps (no Ray)."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import termios
import time

import pyarrow as pa
import pytest

from pipeline.run.counts import Tally
from pipeline.run.progress import ProgressPrinter, RecentRate, bar_line

STATES = {
    "starting": dict(done=0, total=0, total_final=False, failed=0, rate=0.0),
    "listing": dict(done=1_234, total=5_000, total_final=False, failed=5, rate=97.0),
    "partway": dict(done=1_234, total=5_000, total_final=True, failed=5, rate=97.0),
    "finished": dict(done=5_000, total=5_000, total_final=True, failed=0, rate=120.5),
    "big": dict(done=12_345_678, total=987_654_321, total_final=True, failed=123_456, rate=12_345.6),
    "no listing": dict(done=42, total=None, total_final=False, failed=1, rate=3.0),
}


def rows(n: int, failed: int = 0) -> pa.Table:
    return pa.table({"uri": [f"u{i}" for i in range(n)],
                     "error_type": ["decode.truncated"] * failed + [None] * (n - failed)})


@pytest.mark.parametrize("width", [20, 40, 80, 200])
@pytest.mark.parametrize("state", STATES)
def test_the_bar_never_runs_past_the_width(width, state):
    assert len(bar_line(width, **STATES[state])) <= width


def test_at_80_columns_the_bar_shows_every_count():
    line = bar_line(80, **STATES["partway"])
    assert line.startswith(" 24% |█")
    for part in ("1,234/5,000", "5 failed", "3,766 left", "97.0 images/s", "ETA 0:39"):
        assert part in line
    assert len(line) == 80  # the bar takes the room the counts leave


def test_a_narrow_terminal_keeps_the_count_and_the_eta():
    line = bar_line(40, **STATES["partway"])
    assert "1,234/5,000" in line and "ETA 0:39" in line and "|" in line


def test_the_total_carries_a_plus_until_the_listing_has_finished():
    line = bar_line(80, **STATES["listing"])
    assert "1,234/5,000+" in line and "3,766+ left" in line and line.endswith("ETA ?")


@pytest.mark.parametrize("state, eta", [
    (dict(done=0, total=95, total_final=True, rate=10.0), "ETA 0:10"),
    (dict(done=0, total=36_610, total_final=True, rate=10.0), "ETA 1:01:01"),
    (dict(done=0, total=100, total_final=True, rate=0.0), "ETA ?"),  # nothing finished yet
    (dict(done=10, total=100, total_final=False, rate=5.0), "ETA ?"),  # the total may still grow
    (dict(done=10, total=None, total_final=False, rate=5.0), "ETA ?"),
])
def test_the_eta(state, eta):
    assert bar_line(120, failed=0, **state).endswith(eta)


def test_a_finished_job_fills_the_bar_and_says_100_percent():
    line = bar_line(80, **STATES["finished"])
    assert line.startswith("100% |" + "█" * 10)
    assert " " not in line.split("|")[1]


def test_the_ascii_bar_for_a_terminal_that_cannot_show_blocks():
    line = bar_line(80, ascii_only=True, **STATES["partway"])
    line.encode("ascii")
    assert "|###" in line


def test_a_printer_on_an_ascii_stream_draws_the_ascii_bar():
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    assert ProgressPrinter(Tally(), lambda: None, out, interval=60).ascii_only
    assert not ProgressPrinter(Tally(), lambda: None, io.StringIO(), interval=60).ascii_only


def test_the_rate_follows_the_last_ten_seconds():
    recent = RecentRate(started=0.0, window=10.0)
    assert recent.rate(5.0, 500) == 100.0  # the run so far, in its first ten seconds
    done = 1_000
    for t in range(11, 31):
        done += 10
        rate = recent.rate(float(t), done)
    assert rate == pytest.approx(10.0)


def test_while_waiting_for_nodes_the_render_says_so_instead_of_the_bar():
    printer = ProgressPrinter(Tally(), lambda: {"listed": 10, "done": True}, io.StringIO(), interval=60,
                              waiting=lambda: "waiting for a node with 1 GPU")
    assert printer.render(60) == "0 done, waiting for a node with 1 GPU"


def pseudo_terminal(rows_: int, cols: int) -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows_, cols, 0, 0))
    return master, slave


def read_all(fd: int) -> str:
    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8")


def read_until(fd: int, text: str, so_far: bytes = b"", timeout: float = 60.0) -> bytes:
    """What the terminal received, read until `text` is in it: the printer's thread draws every 0.05 s, and on a
    busy machine a thread can wait far longer than that for a core (a fixed sleep then saw no render)."""
    deadline = time.monotonic() + timeout
    while text.encode() not in so_far:
        assert time.monotonic() < deadline, f"{text!r} never drawn in {timeout} s: {so_far.decode()!r}"
        if select.select([fd], [], [], 0.2)[0]:
            so_far += os.read(fd, 65536)
    return so_far


def test_on_a_terminal_the_printer_rewrites_one_line_and_ends_it_on_stop():
    cols = 72
    master, slave = pseudo_terminal(24, cols)
    try:
        with open(slave, "w", encoding="utf-8", closefd=False) as out:
            assert out.isatty()
            tally = Tally()
            listing = {"listed": 10, "skipped": 0, "already_done": 0, "done": False}
            with ProgressPrinter(tally, lambda: listing, out, interval=0.05):
                tally.add(rows(4, failed=1))
                drawn = read_until(master, "4/10+")  # a render while the listing was still going
                listing["done"] = True
                tally.add(rows(6))
                drawn = read_until(master, "10/10 ", drawn)  # redrawn in place before the stop
        screen = (drawn + read_all(master).encode()).decode("utf-8")
    finally:
        os.close(master)
        os.close(slave)
    assert screen.replace("\r\n", "\n").count("\r") >= 3  # redrawn in place, a few times (the tty's \r\n aside)
    assert screen.endswith("\n")
    renders = [r.replace("\x1b[K", "") for r in re.split(r"[\r\n]+", screen) if r]
    assert all(len(r) < cols for r in renders), renders
    assert "4/10+" in screen  # a render while the listing was still going
    last = renders[-1]
    assert last.startswith("100% |") and "10/10" in last and "1 failed" in last


def test_a_log_still_gets_the_plain_lines():
    out = io.StringIO()
    tally = Tally()
    tally.add(rows(3, failed=1))
    with ProgressPrinter(tally, lambda: {"listed": 10, "done": True}, out, interval=0.05):
        deadline = time.monotonic() + 60  # a line every 0.05 s, once the printer's thread gets a core
        while not out.getvalue():
            assert time.monotonic() < deadline, "no line printed in 60 s"
            time.sleep(0.05)
    lines = out.getvalue().splitlines()
    assert lines and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    for line in lines:
        assert re.fullmatch(r"  \[ *\d+\.\ds\] 3 done, 1 failed, 7 remaining, \d+\.\d images/s", line)


def test_progress_samples_stay_few_and_spread_over_a_long_run():
    from pipeline.run.progress import ProgressSamples

    samples = ProgressSamples(limit=60)
    for second in range(1, 8 * 3600):  # a night of one batch a second, 10 rows each
        samples.observe(float(second), second * 10)
    record = samples.record(8 * 3600.0, 8 * 3600 * 10)
    points = record["progress"]
    assert len(points) <= 61 and points[0] == [0.0, 0] and points[-1] == [28800.0, 288000]
    gaps = [b[0] - a[0] for a, b in zip(points, points[1:-1])]
    assert max(gaps) <= 2 * min(gaps)  # evenly spread, not the first minute's
    assert record["images_per_s"] == 10.0 and record["elapsed_s"] == 28800.0
