"""An output read as its readers see it, without Ray and without its lease: which format it is, its committed
runs, and one run's rows a record batch at a time. Nothing here writes."""

from __future__ import annotations

import os
from typing import Iterator

import pyarrow as pa

from pipeline.io.storage import Storage, absolute, is_remote, join
from pipeline.output.formats import OutputFormat
from pipeline.output.staging import STAGING
from pipeline.job.errors import UserError


def open_output_for_reading(storage: Storage, uri: str, catalog: dict[str, str] | None = None,
                            table: str = "default.predictions") -> OutputFormat:
    """The format that wrote `uri`, told by what it left there; one line if nothing of this pipeline is there."""
    uri = absolute(uri)
    if catalog is not None or _has(storage, join(uri, "_catalog")):
        from pipeline.output.iceberg import IcebergFormat

        return IcebergFormat(storage, uri, catalog, table)
    if _has(storage, join(uri, "metadata")):
        raise UserError(f"{uri} looks like an Iceberg table with its catalog elsewhere: name the catalog with "
                        "--catalog type=sql --catalog uri=... (the job's output.catalog) and --table NAMESPACE.NAME")
    if _has(storage, join(uri, "_delta_log")):
        from pipeline.output.delta import DeltaFormat

        return DeltaFormat(storage, uri)
    if _has(storage, join(uri, "_commits")) or _has(storage, join(uri, STAGING)):
        from pipeline.output.folder import ParquetFolder

        return ParquetFolder(storage, uri)
    raise UserError(f"{uri} is not an output of this pipeline (no _commits/, _staging/, _delta_log/ or Iceberg "
                    "catalog there); give the output.uri of a job that has run")


def _has(storage: Storage, folder: str) -> bool:
    """Whether anything lies under `folder`: one listing page in a store, never a walk of the whole output."""
    if not is_remote(folder):
        return os.path.isdir(folder)
    try:
        return bool(next(iter(storage.list_pages(folder)), []))
    except Exception as exc:  # noqa: BLE001 - a missing bucket or denied listing, in one line
        raise UserError(f"cannot list {folder} ({type(exc).__name__}: {exc}); check the URI, the store's endpoint "
                        "and credentials") from None


def find_run(table: OutputFormat, run_id: str | None, flag: str = "--run") -> dict:
    """The record of a committed run whose rows the output still holds; the latest when `run_id` is None."""
    live = table.live()
    if run_id is None:
        if not live:
            raise UserError(f"{table.uri} has no committed run yet; `pipeline runs {table.uri}` shows what is "
                            "staged")
        return live[-1]
    for record in live:
        if record["run_id"] == run_id:
            return record
    known = [r["run_id"] for r in table.committed()]
    if run_id in known:
        raise UserError(f"{flag} {run_id}: its rows were replaced by a later overwrite; report one of the live "
                        f"runs: {', '.join(r['run_id'] for r in live[-5:])}")
    hint = f"; recent runs: {', '.join(known[-5:])}" if known else ""
    raise UserError(f"{flag} {run_id}: no such committed run in {table.uri}{hint} (`pipeline runs` lists them)")


def run_rows(table: OutputFormat, run_id: str, columns: list[str]) -> Iterator[pa.Table]:
    """The run's rows as the format's readers see them (partition columns, other engines' deletes applied),
    `columns` only (those the table has), a batch at a time: memory stays bounded."""
    for batch in table.rows([run_id]).batches(table.storage, columns):
        yield pa.Table.from_batches([batch])
