"""What a row is, from source to sink, and how a failure is written into one.

A row that failed keeps flowing with `error` ("decode: image file is truncated") and `error_type`
("decode.truncated", for counting); later stages leave it untouched. Every input leaves exactly one row.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

import pyarrow as pa

# The columns every row has, whatever the model: what was read, and by which model and run.
_IDENTITY = [pa.field("uri", pa.string(), nullable=False), pa.field("error", pa.string()),
             pa.field("error_type", pa.string())]
_PROVENANCE = [
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
    pa.field("size", pa.int64()),
    pa.field("etag", pa.string()),
    pa.field("last_modified", pa.timestamp("us", tz="UTC")),
    pa.field("model", pa.string(), nullable=False),
    pa.field("weights", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
]
# What identifies the input's content (decode/hashes.py), and where a copied prediction came from. Added after
# outputs existed: a table written before them takes them on its next append (ADDED_COLUMNS).
CONTENT_COLUMNS = [
    pa.field("content_hash", pa.string()),  # BLAKE2b-128 hex of the bytes (a DICOM frame: of its pixels)
    pa.field("phash", pa.int64()),  # imagehash's 64-bit pHash as signed int64; null where nothing was decoded
    pa.field("reused_from", pa.string()),  # the uri whose prediction of the same bytes this row copies
    pa.field("reused_run", pa.string()),  # that row's run_id
]
ADDED_COLUMNS = tuple(field.name for field in CONTENT_COLUMNS)
CLASSIFICATION_COLUMNS = [
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("topk_labels", pa.list_(pa.string())),
    pa.field("topk_scores", pa.list_(pa.float32())),
]
TAGS = pa.field("tags", pa.list_(pa.string()))  # zero-shot: every label scoring at least the threshold, best first
DETECTION = pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float32()),
                       *(pa.field(name, pa.float32()) for name in ("x1", "y1", "x2", "y2"))])
DETECTION_COLUMNS = [pa.field("detections", pa.list_(DETECTION)), pa.field("num_detections", pa.int32())]


# What a model writes into a row: a copy of an exact duplicate copies these.
PREDICTION_COLUMNS = tuple(f.name for f in CLASSIFICATION_COLUMNS + [TAGS] + DETECTION_COLUMNS) + ("embedding",)


# A DICOM job's keys: with `uri`, (uri, frame) is unique; the UIDs tie rows to studies and series.
DICOM_COLUMNS = [pa.field("frame", pa.int32()), pa.field("study_instance_uid", pa.string()),
                 pa.field("series_instance_uid", pa.string()), pa.field("sop_instance_uid", pa.string()),
                 pa.field("modality", pa.string())]


def output_schema(task: str = "classification", predictions: bool = True, embedding_dim: int | None = None,
                  dicom_tags: list[str] | None = None) -> pa.Schema:
    """The Parquet schema of a row: identity (and DICOM keys), the model's columns, the embedding if any,
    provenance and content hashes, then the DICOM tags a job allow-lists (`dicom_tags` column names; None: not a
    DICOM job)."""
    model_columns = {"detection": DETECTION_COLUMNS, "zero_shot": CLASSIFICATION_COLUMNS + [TAGS]}.get(
        task, CLASSIFICATION_COLUMNS) if predictions else []
    embedding = [pa.field("embedding", pa.list_(pa.float32(), embedding_dim))] if embedding_dim else []
    dicom = DICOM_COLUMNS if dicom_tags is not None else []
    tags = [pa.field(name, pa.string()) for name in dicom_tags or []]
    return pa.schema(_IDENTITY + dicom + model_columns + embedding + _PROVENANCE + CONTENT_COLUMNS + tags)


# A classification row, the default job's schema.
OUTPUT_SCHEMA = output_schema()

# Columns the listing produces; every later stage adds to these.
SOURCE_SCHEMA = pa.schema([OUTPUT_SCHEMA.field(name) for name in ("uri", "size", "etag", "last_modified")])


class StageFailure(Exception):
    """A failure with a short, stable kind for counting, and a message for people."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


Describer = Callable[[Exception], tuple[str, str]]


def fail(stage: str, exc: Exception, describe: Describer) -> tuple[str, str]:
    """(error, error_type) for a row that failed in `stage`."""
    kind, message = (exc.kind, str(exc)) if isinstance(exc, StageFailure) else describe(exc)
    return f"{stage}: {message}", f"{stage}.{kind}"


def error_columns(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Writable copies of `error` and `error_type`, None where the row is fine.

    A column that is None in every row crosses Ray's object store as Arrow's null type and comes back as
    float NaN, so "no error" is anything that is not a string.
    """
    def clean(name: str) -> np.ndarray:
        if name not in batch:  # no stage has run yet
            return np.full(len(batch["uri"]), None, dtype=object)
        return np.array([v if isinstance(v, str) else None for v in batch[name]], dtype=object)

    return clean("error"), clean("error_type")


class RowCounts:
    """Rows and error rows by type: counted once, the same way, for the progress line, the summary and the run's
    commit record (run/counts.py's `Tally`, output/staging.py's `RunStats`)."""

    def __init__(self):
        self.rows = 0
        self.errors = 0
        self.errors_by_type: Counter[str] = Counter()

    def add(self, table: pa.Table) -> int:
        """Counts the table's rows; returns how many are errors."""
        types = table["error_type"].drop_null().to_pylist()
        self.rows += table.num_rows
        self.errors += len(types)
        self.errors_by_type.update(types)
        return len(types)
