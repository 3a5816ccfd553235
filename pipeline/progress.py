"""Counting what the job has done, and telling the user while it runs and when it ends."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import JobStopped


class Tally:
    """Counts of finished rows, updated by the driver loop, read by the progress printer."""

    def __init__(self):
        self.started = time.monotonic()
        self.done = 0  # inputs
        self.rows = 0  # one per input, or per frame of a multi-frame DICOM
        self.failed = 0  # error rows (a failed input is one row)
        self.errors_by_type: Counter[str] = Counter()
        self.detections: int | None = None  # a detection job's boxes, and the images with any
        self.images_with_detections = 0
        self._lock = threading.Lock()

    def add(self, batch: pa.Table) -> tuple[int, int]:
        """Counts the batch; returns its (inputs, failed rows)."""
        types = batch["error_type"].drop_null().to_pylist()
        inputs = pc.count_distinct(batch["uri"]).as_py() if "rows_of_input" in batch.column_names else batch.num_rows
        with self._lock:
            self.done += inputs
            self.rows += batch.num_rows
            self.failed += len(types)
            self.errors_by_type.update(types)
            if "num_detections" in batch.column_names:
                counts = pc.fill_null(batch["num_detections"].cast("float64"), 0)
                counts = pc.if_else(pc.is_nan(counts), 0, counts)  # numpy's NaN for a failed row
                self.detections = (self.detections or 0) + int(pc.sum(counts).as_py() or 0)
                self.images_with_detections += int(pc.sum(pc.greater(counts, 0)).as_py() or 0)
        return inputs, len(types)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    def check_error_rate(self, max_error_rate: float, min_inputs: int) -> None:
        """Raise JobStopped once enough rows are in and too many of them failed."""
        if self.done < min_inputs or self.failed <= max_error_rate * self.done:
            return
        common = ", ".join(f"{kind} ({n})" for kind, n in self.errors_by_type.most_common(3))
        raise JobStopped(f"stopped: {self.failed:,} of {self.done:,} inputs failed "
                         f"({self.failed / self.done:.0%}), over errors.max_error_rate={max_error_rate}; most "
                         f"common: {common}. Fix the inputs, or raise errors.max_error_rate in the job spec")


class ListingCounts:
    """How many inputs the listing has produced, skipped and found already done, and whether it has finished.
    Kept in a small actor on the driver's node (runner.BatchLedger, which keeps the model's counts too)."""

    def __init__(self):
        self.listed = 0
        self.skipped = 0
        self.already_done = 0
        self.listing_done = False

    def listing_add(self, listed: int, skipped: int, already_done: int = 0) -> None:
        self.listed += listed
        self.skipped += skipped
        self.already_done += already_done

    def listing_finished(self) -> None:
        self.listing_done = True

    def listing_get(self) -> dict:
        return {"listed": self.listed, "skipped": self.skipped, "already_done": self.already_done,
                "done": self.listing_done}


class ProgressPrinter:
    """Prints a line of counts every `interval` seconds from a background thread."""

    def __init__(self, tally: Tally, listing, out: TextIO, interval: float, waiting=None, finished=None):
        self.tally = tally
        self.listing = listing  # callable -> {"listed", "skipped", "done"} or None
        self.waiting = waiting  # callable -> what the job waits for (nodes), or None while it is not waiting
        self.finished = finished  # callable -> inputs the model has finished, ahead of the rows the driver has
        self.out = out
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), file=self.out, flush=True)

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
        return f"  [{t.elapsed:6.1f}s] {done:,} done, {t.failed:,} failed, {remaining}, {rate:.1f} images/s"

    def done(self, listing: dict | None) -> int:
        """Inputs done so far: the model's count when it is ahead of the driver's, never more than were listed
        (a batch Ray ran again after a lost node ends twice)."""
        done = self.tally.done
        if self.finished is not None:
            ahead = self.finished()
            done = max(done, min(ahead, listing["listed"]) if listing is not None else ahead)
        return done


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

