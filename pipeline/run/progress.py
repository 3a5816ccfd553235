"""Telling the user how the job goes while it runs: the terminal bar or a log line every few seconds, and the
run's own timeline and throughput samples for its record."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from typing import TextIO

from pipeline.run.counts import Tally


class ProgressPrinter:
    """Tells the user how the job goes from a background thread, every `interval` seconds: on a terminal, one bar
    rewritten in place; elsewhere (a log), a new line of counts each time."""

    def __init__(self, tally: Tally, listing, out: TextIO, interval: float, waiting=None):
        self.tally = tally
        self.listing = listing  # callable -> {"listed", "skipped", "done"} or None
        self.waiting = waiting  # callable -> what the job waits for (nodes), or None while it is not waiting
        self.out = out
        self.interval = interval
        self.live = is_terminal(out)
        self.ascii_only = not can_encode(out, BLOCKS)
        self.recent = RecentRate(started=tally.started)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.live:  # the last counts stay on screen, and what follows starts on a line of its own
            self._redraw()
            print(file=self.out, flush=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.live:
                self._redraw()
            else:
                print(self.line(), file=self.out, flush=True)

    def _redraw(self) -> None:
        self.out.write("\r" + self.render(terminal_width(self.out)) + CLEAR_TO_END)
        self.out.flush()

    def render(self, width: int) -> str:
        """The live bar, or what the job waits for, in at most `width` characters."""
        listing = self.listing()
        done = self.done(listing)
        rate = self.recent.rate(time.monotonic(), done)
        waiting = self.waiting() if self.waiting is not None else None
        if waiting is not None:
            return f"{done:,} done, {waiting}"[:width]
        if done == 0 and self.tally.errors == 0 and listing is not None:
            return before_first_input(listing)[:width]  # an empty bar at 0 % would say nothing more
        return bar_line(width, done=done, total=listing["listed"] if listing is not None else None,
                        total_final=listing is not None and listing["done"], failed=self.tally.errors, rate=rate,
                        ascii_only=self.ascii_only)

    def line(self) -> str:
        t = self.tally
        listing = self.listing()
        done = self.done(listing)
        waiting = self.waiting() if self.waiting is not None else None
        if waiting is not None:
            return f"  [{t.elapsed:6.1f}s] {done:,} done, {waiting}"
        if listing is None:
            remaining = "remaining ?"
        elif listing["done"]:
            remaining = f"{max(listing['listed'] - done, 0):,} remaining"
        else:
            remaining = f"{max(listing['listed'] - done, 0):,}+ remaining (still listing)"
        rate = done / t.elapsed if t.elapsed > 0 else 0.0
        return f"  [{t.elapsed:6.1f}s] {done:,} done, {t.errors:,} failed, {remaining}, {rate:.1f} images/s"

    def done(self, listing: dict | None) -> int:
        """Inputs done: rows the driver has. A batch a model actor finished can still be lost with its process."""
        return self.tally.done


def before_first_input(listing: dict) -> str:
    """What the live line says until the first input is done: the listing as it grows, then the wait for the
    model (its actors load it: seconds, or minutes on a cluster that adds nodes)."""
    if not listing["done"]:
        return f"listing: {listing['listed']:,} found …"
    return f"listing: {listing['listed']:,} found; waiting for the model's first batch …"


BLOCKS = " ▏▎▍▌▋▊▉█"  # a cell filled by eighths
ASCII_BLOCKS = " #"
CLEAR_TO_END = "\x1b[K"
MIN_BAR = 10  # cells; narrower than this, the counts keep the room and the bar goes


def bar_line(width: int, *, done: int, total: int | None, total_final: bool, failed: int, rate: float,
             ascii_only: bool = False) -> str:
    """One render of the live bar in at most `width` characters, e.g.
    ` 24% |███▍          | 1,234/5,000  5 failed  3,766 left  97.0 images/s  ETA 0:39`.
    `total`: inputs listed so far, or None while unknown (no bar then); until the listing is final it carries a `+`
    and the ETA is `?`. The counts that matter least give way first when the width is short."""
    if total is None:
        return f"{done:,} done  {failed:,} failed  {rate:.1f} images/s  ETA ?"[:width]
    plus = "" if total_final else "+"
    left = max(total - done, 0)
    eta = format_eta(left / rate) if total_final and rate > 0 else "?"
    counts = {"count": f"{done:,}/{total:,}{plus}", "failed": f"{failed:,} failed", "left": f"{left:,}{plus} left",
              "rate": f"{rate:.1f} images/s", "eta": f"ETA {eta}"}
    fraction = min(done / total, 1.0) if total else float(total_final)
    whole_percent = min(100 * done // total, 100) if total else 100 * total_final  # rounded down: 100% once all done
    percent = f"{whole_percent:3d}% "
    for gone in ((), ("left",), ("left", "rate"), ("left", "rate", "failed")):
        text = "  ".join(value for name, value in counts.items() if name not in gone)
        cells = width - len(percent) - len("|| ") - len(text)
        if cells >= MIN_BAR:
            return f"{percent}|{bar(fraction, cells, ASCII_BLOCKS if ascii_only else BLOCKS)}| {text}"
    return f"{percent}{text}"[:width]


def bar(fraction: float, cells: int, blocks: str) -> str:
    """`fraction` of `cells` filled, the last cell in steps of the partial blocks."""
    steps = len(blocks) - 1
    full, part = divmod(int(fraction * cells * steps), steps)
    return (blocks[-1] * full + (blocks[part] if part else "")).ljust(cells)


def format_eta(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RecentRate:
    """Inputs per second over the last `window` seconds (over the run so far during its first `window` seconds):
    the rate a person at a terminal expects, that follows the job as it speeds up or slows down."""

    def __init__(self, started: float, window: float = 10.0):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque([(started, 0)])

    def rate(self, now: float, done: int) -> float:
        self.samples.append((now, done))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        then, done_then = self.samples[0]
        return (done - done_then) / (now - then) if now > then else 0.0


def is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # not a file, or a closed one
        return False


def can_encode(out: TextIO, text: str) -> bool:
    encoding = getattr(out, "encoding", None)
    if encoding is None:  # a stream of str (StringIO) holds any text
        return True
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def terminal_width(out: TextIO) -> int:
    """Columns of the terminal `out` writes to, less one: a line that fills the last column wraps on some
    terminals, and the next carriage return would then rewrite only its second half."""
    try:
        columns = os.get_terminal_size(out.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return (columns or shutil.get_terminal_size((80, 24)).columns or 80) - 1


class Timeline:
    """When each step of a run was reached, in seconds since its process started: where a short job's time goes
    (imports, Ray's start, the model check, the first batch, the commit). Written to the run's _summary.json."""

    def __init__(self):
        self.origin = process_started_at()
        self.marks: dict[str, float] = {}

    def mark(self, step: str, at: float | None = None) -> None:
        """`at`: a wall-clock time (time.time()) taken elsewhere, such as in a model actor."""
        self.marks.setdefault(step, round((at if at is not None else time.time()) - self.origin, 3))


def process_started_at() -> float:
    """This process's start as a wall-clock time (Linux /proc); elsewhere, now."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class ProgressSamples:
    """(seconds, rows) as a run goes, for its record and the report's chart of rows over time: in each slot of
    `every_s` seconds, the latest observation (rows reach the driver a block at a time; each sample is when they
    did), at most `limit` slots (when full, the slots double and each keeps its later sample), so a night-long
    run's record stays small and its whole span, the end included, is covered alike."""

    def __init__(self, limit: int = 60, every_s: float = 1.0):
        self.limit = limit
        self.every_s = every_s
        self.samples: list[list[float]] = []  # after the origin, (0, 0)

    def observe(self, seconds: float, rows: int) -> None:
        point = [round(seconds, 1), rows]
        if self.samples and self._slot(self.samples[-1][0]) == self._slot(point[0]):
            self.samples[-1] = point
        else:
            self.samples.append(point)
        while len(self.samples) > self.limit:
            self.every_s *= 2
            self.samples = list({self._slot(p[0]): p for p in self.samples}.values())

    def _slot(self, seconds: float) -> int:
        return int(seconds // self.every_s)

    def record(self, seconds: float, rows: int) -> dict:
        """What the run's record keeps: the samples from (0, 0) to the run's end, elapsed and the mean rate."""
        end = [round(seconds, 1), rows]
        kept = [s for s in self.samples if self._slot(s[0]) < self._slot(end[0])]  # the end is its slot's sample
        return {"elapsed_s": round(seconds, 3), "images_per_s": round(rows / seconds, 2) if seconds > 0 else 0.0,
                "progress": [[0.0, 0], *kept, end]}
