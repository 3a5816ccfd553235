"""Reviewers' answers as the truth table holds them: one row per answer, appended, never rewritten.

The latest answer for an input (by `reviewed_at`, then `imported_at`) is its truth. A classification answer has a
`label`; a detection answer has `boxes` in the image's original pixels (an empty list: reviewed, nothing there)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

BOX = pa.struct([pa.field("label", pa.string()), *(pa.field(n, pa.float32()) for n in ("x1", "y1", "x2", "y2"))])
TRUTH_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("boxes", pa.list_(BOX)),
    pa.field("reviewer", pa.string()),
    pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),
    pa.field("source", pa.string()),
    pa.field("import_id", pa.string()),
    pa.field("imported_at", pa.timestamp("us", tz="UTC")),
])
SOURCES = ("label-studio", "coco", "cvat", "csv")

Box = tuple[str, float, float, float, float]  # (label, x1, y1, x2, y2)


@dataclass(frozen=True)
class Answer:
    """What one reviewer said about one input."""
    uri: str
    label: str | None = None
    boxes: tuple[Box, ...] | None = None
    reviewer: str | None = None
    reviewed_at: datetime | None = None


@dataclass
class Parsed:
    """A file's answers, and how many of its items carried none (skipped, cancelled, no label given)."""
    answers: list[Answer] = field(default_factory=list)
    unanswered: int = 0


@dataclass(frozen=True)
class FileFacts:
    """What a parser may fall back on where the file says nothing: --reviewer, and the file's own time."""
    reviewer: str | None
    file_time: datetime


def to_table(answers: list[Answer], source: str, import_id: str, imported_at: datetime) -> pa.Table:
    columns = {
        "uri": [a.uri for a in answers],
        "label": [a.label for a in answers],
        "boxes": [None if a.boxes is None else [dict(zip(BOX.names, b)) for b in a.boxes] for a in answers],
        "reviewer": [a.reviewer for a in answers],
        "reviewed_at": [a.reviewed_at for a in answers],
        "source": [source] * len(answers),
        "import_id": [import_id] * len(answers),
        "imported_at": [imported_at] * len(answers),
    }
    return pa.table(columns, schema=TRUTH_SCHEMA)


def latest(truth: pa.Table) -> pa.Table:
    """One row per uri: its latest answer (by reviewed_at, then imported_at; an answer without a time is oldest)."""
    if truth.num_rows == 0:
        return truth
    order = pc.sort_indices(truth, [("uri", "ascending", "at_end"), ("reviewed_at", "descending", "at_end"),
                                    ("imported_at", "descending", "at_end")])
    ordered = truth.take(order)
    uris = ordered["uri"].to_pylist()
    first = [i for i, uri in enumerate(uris) if i == 0 or uris[i - 1] != uri]
    return ordered.take(pa.array(first, pa.int64()))


def utc(value: str | None) -> datetime | None:
    """An ISO 8601 time as the tools write it (`Z`, an offset, or none: UTC), or None."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
