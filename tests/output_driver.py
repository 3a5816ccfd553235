"""Drive the output side alone, without Ray or a model: list synthetic inputs, skip what the output says is
done, stage a row per input, commit. Run in-process, or as a process to be killed at a failpoint:

    python tests/output_driver.py OUTPUT FORMAT N_INPUTS [--changed K] [--overwrite] [--catalog-db PATH]

prints one JSON line: the run id, how many inputs it processed, and the committed record's rows.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import replace
from datetime import datetime, timezone

import pyarrow as pa

from pipeline.io.storage import ObjectInfo, Storage
from pipeline.output import RunIdentity, RunPolicy, open_output
from pipeline.output.sink import StagingSink
from pipeline.job.config import load_job
from pipeline.job.rows import OUTPUT_SCHEMA

IDENTITY = RunIdentity(job_key="job-1", model_key="model-1", model="counting", weights="sha256:0")
MODIFIED = datetime(2026, 11, 1, tzinfo=timezone.utc)


def inputs(n: int, changed: int = 0) -> list[ObjectInfo]:
    """`n` listed objects; the first `changed` have a new ETag (rewritten since the first night)."""
    return [ObjectInfo(f"s3://photos/img-{i:05d}.jpg", 1000 + i, f"etag-{i}" + ("-v2" if i < changed else ""),
                       MODIFIED) for i in range(n)]


def job(output: str, fmt: str, overwrite: bool = False, catalog_db: str | None = None, **output_fields):
    spec = {"input": "s3://photos/", "output": output, "format": fmt, "overwrite": overwrite, "model": "resnet18"}
    cfg = load_job(None, spec)
    cfg.output.checkpoint_rows = 10
    cfg.output.rows_per_file = 5  # a publish writes several parts
    if catalog_db:
        cfg.output.catalog = {"type": "sql", "uri": f"sqlite:///{catalog_db}"}
    for name, value in output_fields.items():
        setattr(cfg.output, name, value)
    return cfg


def rows_for(objects: list[ObjectInfo]) -> pa.Table:
    return pa.table({"uri": [o.uri for o in objects], "etag": [o.etag for o in objects],
                     "last_modified": [o.last_modified for o in objects], "size": [o.size for o in objects],
                     "label": ["cat" if i % 2 else "dog" for i in range(len(objects))],
                     "score": [0.9] * len(objects), "error": pa.nulls(len(objects), pa.string())})


def run_once(output: str, fmt: str, n: int, changed: int = 0, overwrite: bool = False,
             catalog_db: str | None = None, storage: Storage | None = None, out=None, job_key: str = "job-1",
             **output_fields) -> dict:
    """One run of the job over `n` listed inputs; `job_key`: which job it is (another job never resumes it)."""
    cfg = job(output, fmt, overwrite, catalog_db, **output_fields)
    storage = storage or Storage.from_env()
    out = out or io.StringIO()
    identity = replace(IDENTITY, job_key=job_key + ("-overwrite" if overwrite else ""))
    with open_output(cfg.output, RunPolicy.of(cfg), storage, identity, OUTPUT_SCHEMA, out) as output_side:
        done = output_side.history().load(storage)
        todo = done.todo(inputs(n, changed))
        sink: StagingSink = output_side.sink({"model": "counting", "weights": "sha256:0", "run_id": output_side.run_id},
                                             checkpoint_rows=10)
        for start in range(0, len(todo), 5):
            sink.add(rows_for(todo[start:start + 5]))
        sink.flush()
        record = output_side.on_write_complete(sink)
    return {"run_id": record["run_id"], "processed": len(todo), "rows": record["rows"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("format")
    parser.add_argument("n", type=int)
    parser.add_argument("--changed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--catalog-db")
    args = parser.parse_args()
    result = run_once(args.output, args.format, args.n, args.changed, args.overwrite, args.catalog_db)
    print(json.dumps(result), file=sys.stdout, flush=True)
