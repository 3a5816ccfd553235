"""Manifests: a Parquet or CSV file of inputs (`uri`; optional `size`, `etag`, `last_modified`), read a record
batch at a time, so that one of 100M rows streams like a listing. Columns are cast to SOURCE_SCHEMA leniently (as
pandas, Spark or a spreadsheet write them); a value that still cannot be read is a `BadValue`, refused in the
first batch (`check_first_batch`) and null with a warning later; entries are normalised so that one input is one
entry. What is accepted: the README's "Input". An S3 Inventory's manifest.json is read by `pipeline.io.inventory`."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.io.distinct import SeenKeys
from pipeline.io.inventory import is_inventory, read_inventory
from pipeline.io.storage import ObjectInfo, Storage, is_remote, open_read
from pipeline.job.rows import SOURCE_SCHEMA

logger = logging.getLogger(__name__)

BATCH_ROWS = 1000
TIMESTAMP = SOURCE_SCHEMA.field("last_modified").type


def is_manifest(uri: str) -> bool:
    """A list of inputs: a Parquet or CSV manifest, or an S3 Inventory's manifest.json."""
    return uri.lower().endswith((".parquet", ".csv")) or is_inventory(uri)


@dataclass(frozen=True)
class BadValue:
    """A cell that cannot be read as its column's type; `row` counts data rows from 1."""
    column: str
    row: int
    value: object

    def describe(self, quote: bool = True) -> str:
        """`quote=False`: without the value (a misplaced comma may have put part of a path in it)."""
        shown = repr(self.value)
        shown = (shown if len(shown) <= 40 else shown[:37] + "...") if quote else "the value"
        return f"column '{self.column}', row {self.row}: {shown} {_FIXES[self.column]}"


_FIXES = {
    "size": "is not a whole number of bytes; write the size in bytes, or leave the cell empty",
    "last_modified": "is not a timestamp; write ISO 8601 such as 2024-05-01 10:00:00 (UTC unless it ends in Z or "
                     "an offset such as +02:00), or leave the cell empty (spreadsheet dates such as 5/1/2024 "
                     "leave day and month unknown: format the column as yyyy-mm-dd hh:mm:ss before saving)",
    "uri": "is not text; write each input's URI or path as text",
}


class BadManifest(Exception):
    def __init__(self, bad: BadValue, quote: bool = True):
        super().__init__(bad.describe(quote))
        self.bad = bad


def read_manifest(uri: str, storage: Storage, quote: bool = True, duplicates: Callable[[int], None] | None = None,
                  prefix: str | None = None) -> Iterator[list[ObjectInfo]]:
    """The manifest's entries, a record batch at a time, each input once (its first entry); `duplicates` is told
    how many entries each batch dropped as repeats. Relative entries are relative to the manifest's folder.
    `quote=False`: a log line never quotes a manifest line (it may hold a path the job pseudonymises).
    An inventory's manifest.json: its current objects whose key starts with `prefix` (each is listed once)."""
    if is_inventory(uri):
        yield from read_inventory(uri, storage, prefix)
        return
    base = posixpath.dirname(uri)
    row = 1
    skipped = SkippedLines(uri, quote)
    seen = SeenKeys()
    for raw in raw_batches(uri, storage, skipped):
        batch, bad = cast_batch(raw)
        if bad:
            logger.warning("manifest %s: %d value(s) unreadable, kept as null; the first: %s", uri, len(bad),
                           _offset(bad[0], row).describe(quote))
        row += raw.num_rows
        listed = entries(batch, base)
        first = [o for o, new in zip(listed, seen.first_seen([o.uri for o in listed])) if new]
        if duplicates is not None:
            duplicates(len(listed) - len(first))
        yield first
    skipped.report()


def check_first_batch(uri: str, storage: Storage, quote: bool = True) -> None:
    """Raise BadManifest for the first unreadable value of the manifest's first batch (`quote=False`: without it)."""
    for raw in raw_batches(uri, storage, SkippedLines(uri, quote=False, quiet=True)):
        _, bad = cast_batch(raw)
        if bad:
            raise BadManifest(_offset(bad[0], 1), quote)
        return


def manifest_columns(uri: str, storage: Storage) -> list[str]:
    """Column names of a manifest, read from its header only (for up-front validation)."""
    with open_read(storage, uri) as f:
        if uri.lower().endswith(".parquet"):
            return pq.ParquetFile(f).schema_arrow.names
        skip = SkippedLines(uri, quote=False, quiet=True)  # a bad line in the first block is the listing's to tell
        return pacsv.open_csv(f, parse_options=pacsv.ParseOptions(invalid_row_handler=skip)).schema.names


def raw_batches(uri: str, storage: Storage, skipped: "SkippedLines | None" = None) -> Iterator[pa.RecordBatch]:
    """The manifest's own columns of interest as stored (CSV: all text), before any cast."""
    with open_read(storage, uri) as f:
        if uri.lower().endswith(".parquet"):
            yield from _parquet_batches(f)
        else:
            yield from _csv_batches(f, skipped or SkippedLines(uri))


def _parquet_batches(f) -> Iterator[pa.RecordBatch]:
    parquet = pq.ParquetFile(f)
    # Only ours: pandas' `__index_level_0__` and any other column are never read.
    columns = [name for name in SOURCE_SCHEMA.names if name in parquet.schema_arrow.names]
    yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)


def _csv_batches(f, skipped: "SkippedLines") -> Iterator[pa.RecordBatch]:
    # Every column as text: type inference from the first block would fail on a later block that differs.
    convert = pacsv.ConvertOptions(include_columns=SOURCE_SCHEMA.names, include_missing_columns=True,
                                   column_types={name: pa.string() for name in SOURCE_SCHEMA.names},
                                   strings_can_be_null=True)
    parse = pacsv.ParseOptions(invalid_row_handler=skipped)
    yield from pacsv.open_csv(f, convert_options=convert, parse_options=parse)


class SkippedLines:
    """pyarrow's handler of a CSV line with the wrong number of fields: skipped, wherever it is in the file.

    The first few are logged by line number (and text, unless `quote` is off: a line may hold a path the job
    pseudonymises); `report()` logs how many there were in all."""
    SHOWN = 5

    def __init__(self, uri: str, quote: bool = True, quiet: bool = False):
        self.uri, self.quote, self.quiet = uri, quote, quiet
        self.count = 0

    def __call__(self, row) -> str:
        self.count += 1
        if not self.quiet and self.count <= self.SHOWN:
            shown = f": {row.text}" if self.quote else ""
            logger.warning("manifest line %s skipped, it has the wrong number of fields%s (quote values that "
                           "contain commas)", row.number, shown)
        return "skip"

    def report(self) -> None:
        if self.count and not self.quiet:
            logger.warning("manifest %s: %d line(s) skipped in all, each with the wrong number of fields (quote "
                           "values that contain commas)", self.uri if self.quote else "<input manifest>", self.count)


def cast_batch(raw: pa.RecordBatch) -> tuple[pa.RecordBatch, list[BadValue]]:
    """`raw` as SOURCE_SCHEMA; unreadable values become null and are returned (rows counted from 0)."""
    arrays, bad = [], []
    for name in SOURCE_SCHEMA.names:
        column = raw.column(name) if name in raw.schema.names else pa.nulls(raw.num_rows)
        array, bad_rows = _CASTS[name](column)
        arrays.append(array)
        bad += [BadValue(name, i, column[i].as_py()) for i in bad_rows]
    return pa.RecordBatch.from_arrays(arrays, schema=SOURCE_SCHEMA), sorted(bad, key=lambda b: b.row)


def _offset(bad: BadValue, first_row: int) -> BadValue:
    return BadValue(bad.column, bad.row + first_row, bad.value)


def entries(batch: pa.RecordBatch, base: str) -> list[ObjectInfo]:
    columns = [batch.column(name).to_pylist() for name in ("uri", "size", "etag", "last_modified")]
    return [ObjectInfo(uri=_resolve(u.strip(), base), size=size, etag=etag, last_modified=mtime)
            for u, size, etag, mtime in zip(*columns) if u is not None and u.strip()]


# --- lenient casts: (array of the schema's type, indexes of values that could not be read) -----------------
Cast = Callable[[pa.Array], tuple[pa.Array, list[int]]]


def _cast_uri(column: pa.Array) -> tuple[pa.Array, list[int]]:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
        return column.cast(pa.string()), []
    return _each(column, _text_uri, pa.string())


def _cast_size(column: pa.Array) -> tuple[pa.Array, list[int]]:
    if pa.types.is_integer(column.type) or pa.types.is_null(column.type):
        try:
            return column.cast(pa.int64()), []
        except pa.ArrowInvalid:  # a uint64 beyond int64: reported per value below
            pass
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:  # a CSV's digits, the common case, in one cast; anything else value by value
            sizes = _blank_to_null(pc.utf8_trim_whitespace(column.cast(pa.string()))).cast(pa.int64())
            if not pc.any(pc.less(sizes, 0)).as_py():
                return sizes, []
        except pa.ArrowInvalid:
            pass
    return _each(column, _size, pa.int64())


def _cast_etag(column: pa.Array) -> tuple[pa.Array, list[int]]:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
        return _blank_to_null(column.cast(pa.string())), []
    return _each(column, _etag, pa.string())


def _cast_timestamp(column: pa.Array) -> tuple[pa.Array, list[int]]:
    kind = column.type
    if pa.types.is_timestamp(kind):
        if kind.tz is None:  # naive: UTC (the stored values are read as UTC, not shifted)
            column = column.cast(pa.timestamp(kind.unit, "UTC"))
        return column.cast(TIMESTAMP, safe=False), []  # safe=False: nanoseconds truncated, not refused
    if pa.types.is_date(kind) or pa.types.is_null(kind):
        return column.cast(TIMESTAMP), []
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        parsed = _parse_iso_vectorised(_blank_to_null(pc.utf8_trim_whitespace(column.cast(pa.string()))))
        if parsed is not None:
            return parsed, []
    return _each(column, _timestamp, TIMESTAMP)


def _parse_iso_vectorised(text: pa.Array) -> pa.Array | None:
    """Arrow's own parse, when every value is one ISO form (all naive, or all with offsets); else None."""
    for parsed_type in (pa.timestamp("ns"), pa.timestamp("ns", "UTC")):
        try:
            parsed = text.cast(parsed_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        return _cast_timestamp(parsed)[0]
    return None


def _blank_to_null(text: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(pc.utf8_trim_whitespace(text), ""), pa.scalar(None, pa.string()), text)


def _each(column: pa.Array, read: Callable[[object], object], to: pa.DataType) -> tuple[pa.Array, list[int]]:
    values, bad = [], []
    for i, value in enumerate(column.to_pylist()):
        try:
            values.append(None if value is None else read(value))
        except (ValueError, TypeError, OverflowError):
            values.append(None)
            bad.append(i)
    return pa.array(values, type=to), bad


def _text_uri(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    raise TypeError(type(value).__name__)


def _size(value: object) -> int | None:
    if isinstance(value, bool):
        raise TypeError("bool")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        value = int(value) if value.lstrip("+-").isdigit() else float(value)
    if isinstance(value, float):
        if value != value:  # NaN: pandas' missing value
            return None
        if not value.is_integer():
            raise ValueError(value)
    size = int(value)
    if size < 0:
        raise ValueError(value)
    return size


def _etag(value: object) -> str | None:
    if isinstance(value, float):
        if value != value:
            return None
        if value.is_integer():  # a numeric etag that pandas turned into float around a missing value
            return str(int(value))
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8").strip() or None
        except UnicodeDecodeError:
            return value.hex()
    return str(value).strip() or None


def _timestamp(value: object) -> datetime | None:
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        value = datetime.fromisoformat(value)  # Python 3.11+: T or space, Z, offsets, any fraction
    if not isinstance(value, datetime):
        raise TypeError(type(value).__name__)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


_CASTS: dict[str, Cast] = {"uri": _cast_uri, "size": _cast_size, "etag": _cast_etag, "last_modified": _cast_timestamp}


def _resolve(entry: str, base: str) -> str:
    """An entry as one spelling of its input: object-store keys as written, local paths absolute and normalised."""
    if is_remote(entry):
        return entry
    entry = entry.removeprefix("file://")
    if entry.startswith("/"):
        return posixpath.normpath(entry)
    if is_remote(base):
        return f"{base}/{posixpath.normpath(entry)}"
    return posixpath.normpath(posixpath.join(base, entry))
