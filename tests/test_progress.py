"""The progress line: counts a person can trust while a job runs (no Ray; pipeline/run/ feeds it, from Ray or inline)."""

from __future__ import annotations

import io

import pyarrow as pa

from pipeline.run.isolation import LedgerBook
from pipeline.run.counts import Tally
from pipeline.run.progress import ProgressPrinter


def printer(tally: Tally, listing: dict | None) -> ProgressPrinter:
    return ProgressPrinter(tally, lambda: listing, io.StringIO(), interval=60)


def rows(n: int, failed: int = 0) -> pa.Table:
    return pa.table({"uri": [f"u{i}" for i in range(n)],
                     "error_type": ["decode.truncated"] * failed + [None] * (n - failed)})


def test_the_line_counts_only_rows_the_driver_has():
    """A batch a model actor finished is not done: its process can die before Ray hands its rows on."""
    tally = Tally()
    line = printer(tally, {"listed": 100, "done": True}).line
    assert " 0 done, 0 failed, 100 remaining" in line()
    tally.add(rows(64, failed=2))
    assert " 64 done, 2 failed, 36 remaining" in line()


def test_before_the_listing_reports_the_line_has_no_total():
    tally = Tally()
    tally.add(rows(5, failed=1))
    assert " 5 done, 1 failed, remaining ?" in printer(tally, None).line()


def test_the_ledger_says_how_busy_the_workers_were():
    now = [0.0]
    book = LedgerBook(clock=lambda: now[0])
    assert book.busy_fraction() is None
    for t, call in ((0, "start w1"), (0, "start w2"), (4, "finish w1"), (6, "start w1"), (10, "finish w1"),
                    (10, "finish w2")):
        now[0] = float(t)
        action, worker = call.split()
        getattr(book, action)(worker, [f"{worker}-{t}"])
    assert book.busy_fraction() == round((4 + 4 + 10) / (2 * 10), 3)  # w1 waited 2 s of the 10 between batches
