"""What the driver counts while a job runs: the rows it has (`Tally`) and what the listing produced (`ListingCounts`).
The progress line, the error-rate stop and the summary read these; the staged run's own counts, kept for its
commit record, are output/staging.py's `RunStats`."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.job.errors import JobStopped
from pipeline.job.rows import RowCounts


class Tally(RowCounts):
    """The rows the driver has (one per input, or per frame of a multi-frame DICOM) and the inputs they make,
    updated by the driver loop, read by the progress printer."""

    def __init__(self):
        super().__init__()
        self.started = time.monotonic()
        self.done = 0  # inputs
        self.detections: int | None = None  # a detection job's boxes, and the images with any
        self.images_with_detections = 0
        self.reuse = None  # run/reuse.ReuseCounts: copies of exact duplicates, and the model time they saved
        self._lock = threading.Lock()

    def add(self, batch: pa.Table) -> tuple[int, int]:
        """Counts the batch; returns its (inputs, failed rows)."""
        inputs = pc.count_distinct(batch["uri"]).as_py() if "rows_of_input" in batch.column_names else batch.num_rows
        with self._lock:
            self.done += inputs
            errors = super().add(batch)
            if "num_detections" in batch.column_names:
                counts = pc.fill_null(batch["num_detections"].cast("float64"), 0)
                counts = pc.if_else(pc.is_nan(counts), 0, counts)  # numpy's NaN for a failed row
                self.detections = (self.detections or 0) + int(pc.sum(counts).as_py() or 0)
                self.images_with_detections += int(pc.sum(pc.greater(counts, 0)).as_py() or 0)
        return inputs, errors

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    def check_error_rate(self, max_error_rate: float, min_inputs: int) -> None:
        """Raise JobStopped once enough rows are in and too many of them failed."""
        if self.done < min_inputs or self.errors <= max_error_rate * self.done:
            return
        common = ", ".join(f"{kind} ({n})" for kind, n in self.errors_by_type.most_common(3))
        raise JobStopped(f"stopped: {self.errors:,} of {self.done:,} inputs failed "
                         f"({self.errors / self.done:.0%}), over errors.max_error_rate={max_error_rate}; most "
                         f"common: {common}. Fix the inputs, or raise errors.max_error_rate in the job spec")


class ListingCounts:
    """How many inputs the listing has produced, skipped and found already done, and whether it has finished.
    Kept in a small actor on the driver's node (ray/ledger.BatchLedger, which keeps the model's counts too)."""

    def __init__(self):
        self.listed = 0
        self.skipped = 0
        self.already_done = 0
        self.duplicates = 0  # a manifest's entries dropped as repeats of an earlier entry
        self.listing_done = False

    def listing_add(self, listed: int, skipped: int, already_done: int = 0, duplicates: int = 0) -> None:
        self.listed += listed
        self.skipped += skipped
        self.already_done += already_done
        self.duplicates += duplicates

    def listing_finished(self) -> None:
        self.listing_done = True

    def listing_get(self) -> dict:
        return {"listed": self.listed, "skipped": self.skipped, "already_done": self.already_done,
                "duplicates": self.duplicates, "done": self.listing_done}
