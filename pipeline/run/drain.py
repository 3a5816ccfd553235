"""The driver's loop: every prediction row into the sink, once, counted, with the progress line running."""

from __future__ import annotations

from typing import Callable, TextIO

import pyarrow as pa

from pipeline.job.config import ErrorPolicy
from pipeline.job.errors import JobStopped
from pipeline.output.lease import OutputLease
from pipeline.output.sink import StagingSink
from pipeline.run.counts import Tally
from pipeline.run.executor import Rows
from pipeline.run.reuse import ReuseFiller
from pipeline.run.progress import ProgressPrinter, ProgressSamples, Timeline

Prepare = Callable[[pa.Table], pa.Table]


def stream_rows(rows: Rows, sink: StagingSink, lease: OutputLease, errors: ErrorPolicy, out: TextIO,
                interval: float, prepare: Prepare | None = None, timeline: Timeline | None = None,
                samples: ProgressSamples | None = None,
                reuse: ReuseFiller | None = None) -> tuple[Tally, str, str | None]:
    """Every row into the sink, once, counted under the progress line; (tally, status, message) once the last
    rows are staged, or at the error-rate stop. `prepare` turns each batch into what is written (pseudonymised)
    before anything stages or counts it; `reuse` fills copies of exact duplicates first (it may hold some back)."""
    tally, status, message = Tally(), "completed", None
    reuse = reuse or ReuseFiller(None, None, "", [])
    tally.reuse = reuse.counts

    def stage(batch: pa.Table) -> None:
        inputs, failed = tally.add(sink.add(prepare(batch) if prepare is not None else batch))
        if samples is not None:
            samples.observe(tally.elapsed, tally.rows)
        rows.progress(inputs, failed, tally.rate)
        tally.check_error_rate(errors.max_error_rate, errors.min_inputs)

    # The line counts rows the driver has: a batch a model process finished can still be lost with it.
    with ProgressPrinter(tally, rows.listing, out, interval, rows.waiting):
        try:
            for batch in rows:
                lease.check()
                rows.received(batch.column("uri").unique().to_pylist())  # only the driver's receipt settles it
                if timeline is not None:
                    timeline.mark("first_row")
                for ready in reuse(batch):
                    stage(ready)
            for ready in reuse.release():
                stage(ready)
        except JobStopped as exc:
            status, message = "stopped", f"{exc} (rows so far stay staged; rerunning the job resumes after them)"
        leftover = sink.release_partial()
        if leftover is not None:
            tally.add(leftover)
        sink.flush()
    return tally, status, message
