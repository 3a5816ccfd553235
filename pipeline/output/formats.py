"""What every output format implements: where committed runs' rows live, and how one run commits.

The run never sees a format: the front door (`output/run_output.py`) stages a run's rows in
`<output>/_staging/`, holds the lease, and at the end hands the staged rows to the job's format in one
`commit` call. A format keeps its own record of committed runs (the folder: `_commits/*.json`; Delta: its
log's commitInfo; Iceberg: snapshot summaries), so the table itself is the one source of truth for what
is done. A fourth format (Lance, say) is one new module implementing `OutputFormat`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa

from pipeline.io.storage import Storage
from pipeline.output.rows import TableRows

RECORD_KEY = "pipeline.record"  # where the table formats keep a run's record (commit metadata / snapshot summary)
RUN_ID_KEY = "pipeline.run_id"


@dataclass
class Partitioning:
    """How committed rows are laid out: by the run's date, by one string column of the rows, or not at all."""
    run_date: str | None = None  # 'YYYY-MM-DD' when output.partitioning is run_date
    column: str | None = None  # a string column of the job's schema


@dataclass
class Commit:
    """One run, ready to commit."""
    run_id: str
    # The staged rows, in order; each call reads them again. The iterator raises before its end unless they are
    # exactly the rows the record counts, so a format that commits only after the last one commits nothing.
    rows: Callable[[], Iterator[pa.Table]]
    schema: pa.Schema  # every table `rows` yields has it
    record: dict  # the run's facts (run_id, mode, model, weights, model_key, job_key, counts, fingerprint, ...)
    overwrite: bool  # replace every earlier run's rows, atomically
    partitioning: Partitioning
    rows_per_file: int
    fence: Callable[[], None]  # raises if this driver lost the output's lease: call it before every visible write


class OutputFormat(ABC):
    name: str  # output.format

    def __init__(self, storage: Storage, uri: str):
        self.storage = storage
        self.uri = uri

    @abstractmethod
    def committed(self) -> list[dict]:
        """The record of every committed run, oldest first; each has at least run_id, committed_at, model_key
        and mode ('append' or 'overwrite')."""

    def live(self) -> list[dict]:
        """Records of the runs whose rows the output holds now: those since the last overwrite, oldest first."""
        runs = self.committed()
        start = max((i for i, r in enumerate(runs) if r.get("mode") == "overwrite"), default=0)
        return runs[start:]

    @abstractmethod
    def data_files(self, run_ids: set[str] | None = None) -> list[str]:
        """URIs of the Parquet files holding the live runs' rows, or those of `run_ids` only where the format
        can tell (a table's files may hold other runs' rows too: each row carries its run_id)."""

    @abstractmethod
    def rows(self, run_ids: list[str] | None = None) -> TableRows:
        """The live rows (of `run_ids` only) as this format's readers read them: partition values, deletes by
        other engines applied. Picklable; open with `.batches(storage, columns)` (see pipeline/output/rows.py)."""

    def check_existing(self, overwrite: bool) -> None:
        """Refuse, with a UserError, an output this format must not write to (files it did not write...)."""

    def recover(self, staged_run_ids: set[str]) -> None:
        """Finish or undo what a killed commit left visible, before any new work starts."""

    @abstractmethod
    def commit(self, commit: Commit) -> dict:
        """Make the run's rows visible at once, as one version; returns its record, with what the format adds
        (files, version). Idempotent: a run already committed is not committed again (its record is returned)."""

    def describe(self, record: dict) -> str:
        """How the summary names what a committed run wrote."""
        return f"{len(record.get('files', []))} Parquet file(s)"


def record_json(record: dict) -> str:
    return json.dumps(record, sort_keys=True, default=str)
