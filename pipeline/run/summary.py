"""What a run did, as the `pipeline` command prints it and `_summary.json` keeps it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TextIO

from pipeline.io.storage import join
from pipeline.job.config import JobConfig
from pipeline.privacy.identifying import identifying_note, written_tags

if TYPE_CHECKING:
    from pipeline.output import RunOutput
    from pipeline.run.counts import Tally
    from pipeline.run.executor import Rows
    from pipeline.run.progress import Timeline


@dataclass
class RunSummary:
    run_id: str
    status: str  # completed | stopped
    input: str
    output: str
    model: str
    weights: str
    inputs: int  # processed by this attempt
    rows: int  # written by this attempt: one per input, or per frame of a multi-frame DICOM
    predicted: int  # rows without an error; for a committed run, all of its rows (resumed ones too)
    errors: int  # rows with one; likewise
    errors_by_type: dict[str, int]
    resumed: int  # inputs an interrupted earlier attempt of this run had staged
    already_done: int  # inputs skipped: unchanged since an earlier committed run
    skipped_by_extension: int
    duplicates: int  # a manifest's entries dropped as repeats of an earlier entry (each input is one row)
    committed_rows: int  # rows the run's commit holds (resumed + this attempt); 0 until it commits
    model_actors: str  # the pool as decided at the start, and why
    elapsed_s: float
    images_per_s: float
    started_at: str
    finished_at: str
    files: list[dict] = field(default_factory=list)
    message: str | None = None
    detections: int | None = None  # detection jobs: boxes written by this attempt
    images_with_detections: int | None = None
    dicom_tags_written: list[str] | None = None  # DICOM jobs: every tag the rows carry, keys included
    nodes_left: dict[str, int] = field(default_factory=dict)  # Ray nodes that left mid-run, by why
    redone: int = 0  # inputs the model took again because a node or an actor was lost with them
    pseudonyms: str | None = None  # privacy.pseudonymize: the key's id (the key itself is never written)
    output_format: str = "parquet"
    committed: str | None = None  # what the commit wrote, in the format's words ("3 Parquet file(s)", "version 4")
    table_version: int | None = None  # delta: the table version of this run; iceberg: its snapshot id
    metadata_location: str | None = None  # iceberg: the metadata file of that snapshot (DuckDB's iceberg_scan)
    timeline_s: dict[str, float] = field(default_factory=dict)  # seconds from the process's start to each step
    model_busy: float | None = None  # share of their time the model actors spent in batches (below 1: waiting)
    reused: int = 0  # inputs whose prediction was copied from an exact duplicate's (no model call)
    model_seconds_saved: float = 0.0  # their estimated model time: mean model seconds per predicted input x reused

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def summarise(cfg: JobConfig, model: str, weights: str, output: RunOutput, tally: Tally, record: dict | None,
              rows: Rows, pool: str, timeline: Timeline, status: str, message: str | None) -> RunSummary:
    """The run's summary from the driver's counts, the commit's record and what the engine saw."""
    facts, listing, run = rows.facts(), rows.listing(), output.run
    if facts.first_model_batch_at is not None:
        timeline.mark("first_model_batch", at=facts.first_model_batch_at)
    return RunSummary(
        run_id=run.run_id, status=status, input=cfg.input.uri, output=cfg.output.uri, model=model,
        weights=weights, inputs=tally.done, rows=tally.rows,
        # A committed run counts every row it holds, the ones an interrupted attempt staged included.
        predicted=record["predicted"] if record else tally.rows - tally.errors,
        errors=record["errors"] if record else tally.errors,
        errors_by_type=record["errors_by_type"] if record else dict(tally.errors_by_type.most_common()),
        resumed=run.resumed_inputs, already_done=max(0, listing["already_done"] - run.resumed_inputs),
        skipped_by_extension=listing["skipped"], duplicates=listing.get("duplicates", 0),
        committed_rows=record["rows"] if record else 0, model_actors=pool, nodes_left=facts.nodes_left,
        redone=max(0, facts.inputs_started - tally.done) if status == "completed" else 0,
        elapsed_s=round(tally.elapsed, 3), images_per_s=round(tally.rate, 2),
        started_at=run.info.attempts[-1], finished_at=now(),
        files=[{"uri": file_uri(cfg.output.uri, f["path"]), "rows": f["rows"]} for f in record.get("files", [])]
        if record else [], message=message, detections=tally.detections,
        images_with_detections=tally.images_with_detections if tally.detections is not None else None,
        dicom_tags_written=written_tags(cfg.dicom), pseudonyms=run.info.pseudonyms, output_format=cfg.output.format,
        committed=output.table.describe(record) if record else None,
        table_version=(record.get("version", record.get("snapshot_id")) if record else None),
        metadata_location=record.get("metadata_location") if record else None,
        timeline_s=dict(sorted(timeline.marks.items(), key=lambda item: item[1])), model_busy=facts.model_busy,
        reused=tally.reuse.reused if tally.reuse else 0,
        model_seconds_saved=round(tally.reuse.seconds_saved, 3) if tally.reuse else 0.0)


def print_summary(s: RunSummary, out: TextIO) -> None:
    errors = ", ".join(f"{kind} {n:,}" for kind, n in s.errors_by_type.items())
    lines = [
        f"Run {s.run_id} {s.status} in {s.elapsed_s:.1f}s",
        f"  inputs      {s.inputs:,}" + (f"  ({s.skipped_by_extension:,} other files skipped by "
                                         f"input.extensions)" if s.skipped_by_extension else ""),
        *([f"  duplicates  {s.duplicates:,}  (manifest entries naming an input listed before; one row each)"]
          if s.duplicates else []),
        *([f"  resumed     {s.resumed:,}  (staged by the interrupted attempt, not redone)"] if s.resumed else []),
        *([f"  unchanged   {s.already_done:,}  (done by earlier runs; --full redoes them)"] if s.already_done
          else []),
        f"  predicted   {s.predicted:,}",
        *([f"  reused      {s.reused:,}  (exact duplicates: a prediction copied, no model call; ~"
           f"{s.model_seconds_saved:,.1f} s of model time saved)"] if s.reused else []),
        f"  errors      {s.errors:,}" + (f"  ({errors})" if errors else ""),
        *([f"  rows        {s.rows:,}  (a row per frame of multi-frame DICOM files)"] if s.rows != s.inputs
          else []),
        *([f"  detections  {s.detections:,} in {s.images_with_detections:,} images"] if s.detections is not None
          else []),
        *([f"  DICOM tags  {', '.join(s.dicom_tags_written)}" + identifying_note(s.dicom_tags_written)]
          if s.dicom_tags_written is not None else []),
        *([f"  privacy     uri and DICOM UIDs written as keyed tokens (hmac:…; key id {s.pseudonyms})"]
          if s.pseudonyms else []),
        *([f"  nodes left  {', '.join(f'{n} {why}' for why, n in s.nodes_left.items())}"] if s.nodes_left else []),
        *([f"  redone      {s.redone:,} inputs, lost with a node or a crashed worker process (output complete, "
           "once)"] if s.redone else []),
        f"  images/s    {s.images_per_s:,.1f}",
        f"  output      {s.output}  ({s.committed}, {s.committed_rows:,} rows committed"
        + (f"; record in _commits/{s.run_id}.json)" if s.output_format == "parquet" else ")")
        if s.status == "completed" else
        f"  output      {s.output}  (nothing committed; rows so far are staged for the rerun)",
        *([f"  metadata    {s.metadata_location}  (DuckDB: iceberg_scan('<it>', snapshot_from_id => "
           f"{s.table_version}))"] if s.metadata_location and s.status == "completed" else []),
    ]
    if s.inputs == 0 and not s.resumed and not s.already_done:
        lines.append(f"  note: nothing to do under {s.input}; check the URI and input.extensions")
    print("\n".join(lines), file=out, flush=True)


def file_uri(output_uri: str, path: str) -> str:
    """A committed file's URI: formats record paths relative to the output (folder, Delta) or absolute (Iceberg)."""
    return path if "://" in path or path.startswith("/") else join(output_uri, path)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
