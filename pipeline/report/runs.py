"""`pipeline runs OUTPUT`: an output's history at a glance, without Ray: its committed runs, a run in progress
or interrupted (what is staged, who holds the lease), and what the next run of its latest job would do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

import numpy as np

from pipeline.io.manifest import is_manifest, read_manifest
from pipeline.io.storage import extension
from pipeline.output.formats import OutputFormat
from pipeline.output.history import KEY_DTYPE, History, KeySet, object_keys, table_keys
from pipeline.output.lease import lease_status
from pipeline.output.staging import Staging
from pipeline.report.outputs import run_rows
from pipeline.spec.config import InputConfig

COLUMNS = [("run id", 25), ("committed (UTC)", 19), ("mode", 9), ("model", 20), ("weights", 18),
           ("rows", 9), ("errors", 7), ("fmt", 3)]


def print_runs(table: OutputFormat, out: TextIO, next_run: bool = True) -> None:
    committed, live = table.committed(), {r["run_id"] for r in table.live()}
    print(f"Output {table.uri} ({table.name}): {len(committed)} committed run(s)", file=out)
    if committed:
        print("  " + "  ".join(name.ljust(width) for name, width in COLUMNS), file=out)
        for record in committed:
            print("  " + run_line(record, record["run_id"] in live), file=out)
    print_staged(table, out)
    if next_run and committed:
        print_next_run(table, table.live()[-1] if table.live() else committed[-1], out)


def run_line(record: dict, live: bool) -> str:
    values = [record["run_id"], str(record.get("committed_at", ""))[:19].replace("T", " "),
              record.get("mode", "append") + ("" if live else "*"), _short(str(record.get("model", "?")), 20),
              _short(str(record.get("weights", "?")), 18), f"{record.get('rows', 0):,}",
              f"{record.get('errors', 0):,}", str(record.get("format", 1))]
    return "  ".join(v.ljust(width) for v, (_, width) in zip(values, COLUMNS)).rstrip() + (
        "" if live else "   (* replaced by a later overwrite)")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_staged(table: OutputFormat, out: TextIO) -> None:
    staging = Staging(table.storage, table.uri)
    runs = [r for r in staging.scan().values() if r.info is not None]
    lease = lease_status(table.storage, table.uri)
    if not runs:
        print(f"In progress: nothing staged; lease {lease}", file=out)
        return
    for run in runs:
        stats = staging.count(run)
        attempts = len(run.info.attempts)
        print(f"In progress or interrupted: run {run.run_id} (started {run.info.started_at[:19]}, {attempts} "
              f"attempt(s)): {stats.rows:,} rows staged in {len(run.chunks)} chunk(s), {stats.errors:,} of them "
              f"errors; lease {lease}", file=out)
    if lease == "free" or lease.startswith("expired"):
        print("  nothing runs now: rerunning the same job resumes after the staged rows", file=out)


@dataclass
class NextRun:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    other_extension: int = 0


def print_next_run(table: OutputFormat, latest: dict, out: TextIO) -> None:
    """What an incremental run of the latest run's job would predict: inputs new or changed since the runs of
    its model; the rest are skipped. Lists the input (a manifest is read), as the run itself would."""
    if latest.get("pseudonyms"):
        print("Next run: not estimated: the output is pseudonymised, so its rows hold tokens the listing can only "
              "be compared with under the job's key (the job's own summary says what it skipped)", file=out)
        return
    try:
        plan = next_run(table, latest)
    except Exception as exc:  # noqa: BLE001 - an input gone or denied since: say so, the history stands
        print(f"Next run: cannot list {latest['input']} ({type(exc).__name__}: {str(exc)[:200]}); check the "
              "input and credentials, or pass --no-listing", file=out)
        return
    print(f"Next run of {latest['input']} (incremental, model {latest.get('model')}): {plan.new:,} new, "
          f"{plan.changed:,} changed or to retry, {plan.unchanged:,} unchanged and skipped"
          + (f"; {plan.other_extension:,} other files not listed" if plan.other_extension else ""), file=out)


def next_run(table: OutputFormat, latest: dict) -> NextRun:
    runs = sorted(r["run_id"] for r in table.live() if r.get("model_key") == latest.get("model_key"))
    done = History(committed=table.rows(runs), committed_runs=runs).load(table.storage)
    seen = KeySet(np.concatenate([table_keys(t, "uri") for rid in runs
                                  for t in run_rows(table, rid, ["uri"])] or [np.array([], KEY_DTYPE)]))
    extensions = latest.get("extensions", InputConfig(uri=latest["input"]).extensions)
    source = latest["input"]
    pages = read_manifest(source, table.storage) if is_manifest(source) else table.storage.list_pages(source)
    plan = NextRun()
    own = table.uri.rstrip("/") + "/"
    for page in pages:
        listed = [o for o in page if not o.uri.startswith(own)]
        wanted = [o for o in listed if is_manifest(source) or extensions is None or extension(o.uri) in extensions]
        plan.other_extension += len(listed) - len(wanted)
        todo = done.todo(wanted)
        plan.unchanged += len(wanted) - len(todo)
        if todo:
            known = seen.contains(np.array([object_keys(o)[0] for o in todo], dtype=KEY_DTYPE))
            plan.changed += int(known.sum())
            plan.new += int((~known).sum())
    return plan
