"""`pipeline truth import OUTPUT FILE`: reviewers' answers (Label Studio's JSON export, COCO, CVAT for images 1.1,
or a CSV of uri,label; the format told from the content unless named) appended to the truth table beside the
output (`<output>_truth`, in the output's format: pipeline/review/tables.py). `read_truth` gives each input's
latest answer, for `pipeline report --truth`."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.storage import Storage, is_remote, is_s3, s3_get_or_none
from pipeline.job.errors import UserError
from pipeline.report.outputs import open_output_for_reading
from pipeline.review.tables import SiblingTable
from pipeline.review.truth import coco, cvat, label_studio, sheet
from pipeline.review.truth.answers import SOURCES, FileFacts, Parsed, latest, to_table

PARSERS = {"label-studio": label_studio.parse, "coco": coco.parse, "cvat": cvat.parse, "csv": sheet.parse}


@dataclass(frozen=True)
class Imported:
    """What one import did: answers appended, items without an answer, answers naming inputs the output lacks."""
    source: str
    answers: int
    unanswered: int
    unknown: int
    import_id: str
    table_uri: str


def import_truth(storage: Storage, output: str, file: str, source: str | None = None, reviewer: str | None = None,
                 catalog: dict | None = None, table: str = "default.predictions") -> Imported:
    predictions = open_output_for_reading(storage, output, catalog, table)
    data, file_time = read_file(storage, file)
    source = source or detect(data, file)
    parsed = parse(source, data, file, FileFacts(reviewer, file_time or datetime.now(timezone.utc)))
    if not parsed.answers:
        raise UserError(f"{file}: no answers in it ({parsed.unanswered} item(s) without a label or box)")
    import_id, now = uuid.uuid4().hex, datetime.now(timezone.utc)
    truth = SiblingTable.for_output(storage, output, "truth", catalog, table)
    truth.append(to_table(parsed.answers, source, import_id, now))
    known = known_uris(predictions, {a.uri for a in parsed.answers})
    unknown = sum(a.uri not in known for a in parsed.answers)
    return Imported(source, len(parsed.answers), parsed.unanswered, unknown, import_id, truth.uri)


def read_truth(storage: Storage, output: str, catalog: dict | None = None,
               table: str = "default.predictions") -> pa.Table:
    """Each reviewed input's latest answer; one line if nothing was imported yet."""
    truth = SiblingTable.for_output(storage, output, "truth", catalog, table)
    rows = truth.read()
    if rows is None or rows.num_rows == 0:
        raise UserError(f"no reviewed answers at {truth.uri}: import them first with `pipeline truth import "
                        f"{output} FILE`")
    return latest(rows)


def read_file(storage: Storage, file: str) -> tuple[bytes, datetime | None]:
    """The file's bytes and when it was last written (None where the store does not say)."""
    try:
        if is_s3(file):
            reply = s3_get_or_none(storage.s3_client, file)
            if reply is None:
                raise FileNotFoundError(file)
            return reply["Body"].read(), reply.get("LastModified")
        data = storage.read_bytes(file)
        return data, None if is_remote(file) else datetime.fromtimestamp(os.path.getmtime(file), timezone.utc)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{file}: no such file") from None
    except OSError as exc:
        raise UserError(f"{file}: cannot read it ({exc})") from None


def detect(data: bytes, file: str) -> str:
    """The file's format, from its content."""
    head = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        return "cvat"
    if head.startswith(b"{"):
        return "coco"
    if head.startswith(b"["):
        return "label-studio"
    if not head:
        raise UserError(f"{file}: the file is empty")
    return "csv"


def parse(source: str, data: bytes, file: str, facts: FileFacts) -> Parsed:
    if source not in PARSERS:
        raise UserError(f"--from {source}: give one of {', '.join(SOURCES)}")
    try:
        content = data if source in ("cvat", "csv") else json.loads(data.decode("utf-8-sig"))
        return PARSERS[source](content, facts)
    except UserError as exc:
        raise UserError(f"{file}: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        what = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else f"{type(exc).__name__}: {exc}"
        raise UserError(f"{file}: not a {source} file as expected ({what})") from None


def known_uris(predictions, uris: set[str]) -> set[str]:
    """Those of `uris` that some live run of the output predicted: the output's uri column, streamed."""
    wanted, found = pa.array(sorted(uris), pa.string()), set()
    for batch in predictions.rows().batches(predictions.storage, ["uri"]):
        column = batch.column("uri")
        found.update(column.filter(pc.is_in(column, value_set=wanted)).to_pylist())
    return found
