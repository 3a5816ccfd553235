"""`pipeline runs OUTPUT`: an output's history at a glance, without Ray: its committed runs, a run in progress
or interrupted (what is staged, who holds the lease), and what the next run of its latest job would do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

import numpy as np

from pipeline.io.listing import InputListing
from pipeline.output.formats import OutputFormat
from pipeline.output.history import KEY_DTYPE, History, KeySet, object_keys, table_keys
from pipeline.output.lease import lease_status
from pipeline.output.identity import interrupted
from pipeline.output.staging import StagedRun, Staging
from pipeline.report.outputs import run_rows
from pipeline.job.config import InputConfig

COLUMNS = [("run id", 25), ("committed (UTC)", 19), ("mode", 9), ("model", 20), ("weights", 18),
           ("rows", 9), ("errors", 7), ("fmt", 3)]
# A table's runs are versions a reader can travel to: the column that names each one, and the record key holding it.
VERSION_COLUMN = {"delta": (("version", 7), "version"), "iceberg": (("snapshot id", 19), "snapshot_id")}


def print_runs(table: OutputFormat, out: TextIO, next_run: bool = True) -> None:
    committed, live = table.committed(), {r["run_id"] for r in table.live()}
    print(f"Output {table.uri} ({table.name}): {len(committed)} committed run(s)", file=out)
    if committed:
        columns = COLUMNS + ([VERSION_COLUMN[table.name][0]] if table.name in VERSION_COLUMN else [])
        print("  " + "  ".join(name.ljust(width) for name, width in columns).rstrip(), file=out)
        for record in committed:
            print("  " + run_line(record, record["run_id"] in live, table.name), file=out)
        print_time_travel(table, committed, out)
    resuming = print_staged(table, out)
    if not next_run:
        return
    if resuming is not None:
        print_resume(table, resuming, out)
    latest = (table.live() or committed or [None])[-1]
    if latest is not None and (resuming is None or resuming.info.job_key != latest.get("job_key")):
        print_next_run(table, latest, out)


def run_line(record: dict, live: bool, output_format: str = "parquet") -> str:
    values = [record["run_id"], str(record.get("committed_at", ""))[:19].replace("T", " "),
              record.get("mode", "append") + ("" if live else "*"), _short(str(record.get("model", "?")), 20),
              _short(str(record.get("weights", "?")), 18), f"{record.get('rows', 0):,}",
              f"{record.get('errors', 0):,}", str(record.get("format", 1))]
    columns = list(COLUMNS)
    if output_format in VERSION_COLUMN:
        column, key = VERSION_COLUMN[output_format]
        columns.append(column)
        values.append(str(record.get(key, "?")))
    return "  ".join(v.ljust(width) for v, (_, width) in zip(values, columns)).rstrip() + (
        "" if live else "   (* replaced by a later overwrite)")


def print_time_travel(table: OutputFormat, committed: list[dict], out: TextIO) -> None:
    """How a reader opens a run's version: the README's time-travel SQL needs the version or snapshot id and,
    for Iceberg, the current metadata file (its history holds the snapshots not expired yet)."""
    last = committed[-1]
    if table.name == "delta":
        print(f"  time travel: delta_scan('{table.uri}', version => {last.get('version')}) reads the table as that "
              "run left it (any version above)", file=out)
    elif table.name == "iceberg":
        location = getattr(table, "metadata_location", None)
        print(f"  metadata file: {location}", file=out)
        print(f"  time travel: iceberg_scan('<metadata file>', snapshot_from_id => {last.get('snapshot_id')}) reads "
              "the table as that run left it (any snapshot above that is not expired)", file=out)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_staged(table: OutputFormat, out: TextIO) -> StagedRun | None:
    """The runs in progress or interrupted; returns the one the next run of its job resumes, when nothing runs
    now and no run has committed since it last ran (else its job drops it and redoes its inputs)."""
    staging = Staging(table.storage, table.uri)
    staged = {r.run_id: r for r in staging.scan().values() if r.info is not None}
    lease = lease_status(table.storage, table.uri)
    if not staged:
        print(f"In progress: nothing staged; lease {lease}", file=out)
        return None
    for run in staged.values():
        stats = staging.count(run)
        attempts = len(run.info.attempts)
        print(f"In progress or interrupted: run {run.run_id} (started {run.info.started_at[:19]}, {attempts} "
              f"attempt(s)): {stats.rows:,} rows of {run.resumed_inputs:,} inputs staged in {len(run.chunks)} "
              f"chunk(s), {stats.errors:,} of them errors; lease {lease}", file=out)
    if not (lease == "free" or lease.startswith("expired")):
        return None
    committed = table.committed()
    latest = max(staged.values(), key=lambda r: (r.info.attempts or [""])[-1])
    resume, _ = interrupted(staged, committed, latest.info.job_key)
    if resume is None:
        print(f"  nothing runs now: runs have committed since run {latest.run_id} was interrupted, so rerunning its "
              "job drops its staged rows and redoes those inputs", file=out)
        return None
    print(f"  nothing runs now: rerunning the job of run {resume.run_id} resumes after the staged rows", file=out)
    return resume


@dataclass
class NextRun:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    staged: int = 0  # resuming: inputs the interrupted attempts staged, not redone
    other_extension: int = 0

    @property
    def pending(self) -> int:
        return self.new + self.changed


def print_resume(table: OutputFormat, run: StagedRun, out: TextIO) -> None:
    """What resuming the interrupted run would do: its inputs not staged yet (nor done by earlier runs of its model,
    for an incremental job) are pending; the staged ones are not redone."""
    info = run.info
    if info.pseudonyms:
        print("Rerunning its job: not estimated: the output is pseudonymised (its rows hold tokens, not paths)",
              file=out)
        return
    listing = info.listing or {}  # absent from runs staged by earlier versions: the defaults then
    extensions = listing.get("extensions", InputConfig(uri=info.input).extensions)
    try:
        plan = next_run(table, info.input, info.model_key, extensions, listing.get("skips_done", True), run.chunks,
                        listing.get("prefix"))
    except Exception as exc:  # noqa: BLE001 - an input gone or denied since: say so, the history stands
        print(f"Rerunning its job: cannot list {info.input} ({type(exc).__name__}: {str(exc)[:200]}); check the "
              "input and credentials, or pass --no-listing", file=out)
        return
    print(f"Rerunning the job of run {run.run_id} ({info.input}, model {info.model}) resumes it: {plan.pending:,} "
          f"inputs pending ({plan.new:,} new, {plan.changed:,} changed or to retry), {plan.staged:,} staged and not "
          f"redone, {plan.unchanged:,} unchanged and skipped"
          + (f"; {plan.other_extension:,} other files not listed" if plan.other_extension else ""), file=out)


def print_next_run(table: OutputFormat, latest: dict, out: TextIO) -> None:
    """What an incremental run of the latest run's job would predict: inputs new or changed since the runs of
    its model; the rest are skipped. Lists the input (a manifest is read), as the run itself would."""
    if latest.get("pseudonyms"):
        print("Next run: not estimated: the output is pseudonymised, so its rows hold tokens the listing can only "
              "be compared with under the job's key (the job's own summary says what it skipped)", file=out)
        return
    try:
        plan = next_run(table, latest["input"], latest.get("model_key"),
                        latest.get("extensions", InputConfig(uri=latest["input"]).extensions),
                        prefix=latest.get("prefix"))
    except Exception as exc:  # noqa: BLE001 - an input gone or denied since: say so, the history stands
        print(f"Next run: cannot list {latest['input']} ({type(exc).__name__}: {str(exc)[:200]}); check the "
              "input and credentials, or pass --no-listing", file=out)
        return
    print(f"Next run of the job of run {latest['run_id']} ({latest['input']}, incremental, model "
          f"{latest.get('model')}): {plan.new:,} new, "
          f"{plan.changed:,} changed or to retry, {plan.unchanged:,} unchanged and skipped"
          + (f"; {plan.other_extension:,} other files not listed" if plan.other_extension else ""), file=out)


def next_run(table: OutputFormat, source: str, model_key: str | None, extensions: list[str] | None,
             skips_done: bool = True, staged: list[str] | None = None, prefix: str | None = None) -> NextRun:
    """Lists `source` as a run of that job would (an inventory's newest delivery, its keys under `prefix`): inputs
    done by the live runs of `model_key` are unchanged (when the job skips them), those in `staged` chunks are
    resumed, the rest are new or changed (a row of them exists)."""
    runs = sorted(r["run_id"] for r in table.live() if r.get("model_key") == model_key)
    done = History(committed=table.rows(runs) if runs and skips_done else None,
                   committed_runs=runs, keys_at=table.uri).load(table.storage)
    resumed = History(staged_files=staged or []).load(table.storage)
    seen = KeySet(np.concatenate([table_keys(t, "uri") for rid in runs
                                  for t in run_rows(table, rid, ["uri"])] or [np.array([], KEY_DTYPE)]))
    listing = InputListing(source, table.storage, extensions, exclude=table.uri, prefix=prefix)
    plan = NextRun()
    for page in listing.pages():
        listed, wanted = listing.select(page)
        plan.other_extension += len(listed) - len(wanted)
        todo = done.todo(wanted)
        plan.unchanged += len(wanted) - len(todo)
        pending = resumed.todo(todo)
        plan.staged += len(todo) - len(pending)
        if pending:
            known = seen.contains(np.array([object_keys(o)[0] for o in pending], dtype=KEY_DTYPE))
            plan.changed += int(known.sum())
            plan.new += int((~known).sum())
    return plan
