"""S3 Inventory as input: a `manifest.json` and the CSV (gzip), ORC or Parquet data files it names, read a record
batch at a time as a listing of `s3://<sourceBucket>/<key>` with size, ETag and last-modified.

AWS's layout: `<destination-prefix>/<source-bucket>/<config-id>/<YYYY-MM-DDTHH-MMZ>/manifest.json` (+ its
`manifest.checksum`), data files under `<config-id>/data/`, and `<config-id>/hive/dt=YYYY-MM-DD-HH-MM/symlink.txt`,
one per delivery. A config folder's latest delivery is found from `hive/` (a key a day), never by listing `data/`.
Non-latest versions and delete markers are not inputs: reading the key reads its latest version. CSV keys are
URL-encoded (a space as `+` or `%20`, a `+` as `%2B`); ORC and Parquet keys are not. Every read goes through
`Storage`, so an inventory copied to another store reads the same.

A data file the manifest gives an `MD5checksum` for is fetched once into a local spool, hashed as it streams, and
parsed only once its bytes match (the checksum is of the file as stored: a CSV's gzip bytes); none of its rows is
listed before. A data file that cannot be read or does not match raises InventoryError naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import re
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Iterator
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.io.storage import Storage, open_read
from pipeline.io.uris import ObjectInfo, join
from pipeline.job.rows import SOURCE_SCHEMA

MANIFEST = "manifest.json"
PAGE_ROWS = 1000
TIMESTAMP = SOURCE_SCHEMA.field("last_modified").type
DELIVERY = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}Z")
HIVE_DT = re.compile(r"/dt=(\d{4}-\d{2}-\d{2})-(\d{2})-(\d{2})/")
# The CSV fileSchema's names of the fields read here, as ORC and Parquet inventories name their columns.
CSV_FIELDS = {"Bucket": "bucket", "Key": "key", "VersionId": "version_id", "IsLatest": "is_latest",
              "IsDeleteMarker": "is_delete_marker", "Size": "size", "LastModifiedDate": "last_modified_date",
              "ETag": "e_tag"}
COLUMNS = list(CSV_FIELDS.values())
FORMATS = ("CSV", "ORC", "Parquet")
READ_BYTES = 8 << 20  # a data file is fetched in reads of this size
SPOOL_BYTES = 64 << 20  # a fetched data file beyond this waits in a temporary file on local disk, not in memory
# What reading a data file that is gone, refused, cut short or corrupt raises (a truncated gzip: EOFError).
UNREADABLE = (OSError, EOFError, zlib.error, pa.ArrowException)


class InventoryError(Exception):
    """An inventory that cannot be read as one: the message is one line, naming the object and the fix."""


@dataclass(frozen=True)
class DataFile:
    """One of a delivery's data files, as its manifest lists it."""
    uri: str
    size: int | None = None  # bytes as stored
    md5: str | None = None  # hex MD5 of the bytes as stored; None: the manifest gives none, nothing is verified


@dataclass(frozen=True)
class Inventory:
    """What a manifest.json says: whose objects, in which format and columns, in which data files."""
    manifest: str
    source_bucket: str
    file_format: str  # CSV, ORC or Parquet
    csv_columns: list[str]  # CSV: the data files' columns in order, as ORC/Parquet name them
    files: list[DataFile]


def is_inventory(uri: str) -> bool:
    """Whether `uri` names an inventory's manifest.json (a dated or config folder is found by `find_manifest`)."""
    return posixpath.basename(uri.rstrip("/")) == MANIFEST


def find_manifest(uri: str, storage: Storage) -> str | None:
    """The manifest.json that `uri` means: itself, a dated delivery folder's, or a config folder's latest
    delivery (from `hive/`); None when `uri` is no inventory (a folder of images)."""
    folder = uri.rstrip("/")
    if is_inventory(folder):
        return folder
    if DELIVERY.fullmatch(posixpath.basename(folder)):
        return join(folder, MANIFEST)
    try:
        if not storage.exists(join(folder, "hive")):
            return None
    except OSError:  # denied by a policy scoped to the images' keys: no inventory the job may read lies there
        return None
    deliveries = sorted({_delivery(o.uri) for page in storage.list_pages(join(folder, "hive")) for o in page} - {None})
    for name in reversed(deliveries):  # the newest whose manifest is written: a delivery may be under way
        if storage.exists(join(folder, f"{name}/{MANIFEST}")):
            return join(folder, f"{name}/{MANIFEST}")
    if deliveries:
        raise InventoryError(f"inventory {folder}: no {MANIFEST} under any of its {len(deliveries)} deliveries "
                             "in hive/; give a delivery's manifest.json")
    return None


def _delivery(hive_uri: str) -> str | None:
    """hive/dt=2024-05-01-00-00/symlink.txt -> the delivery folder's name, 2024-05-01T00-00Z."""
    found = HIVE_DT.search(hive_uri)
    return f"{found[1]}T{found[2]}-{found[3]}Z" if found else None


def load_inventory(manifest: str, storage: Storage) -> Inventory:
    """manifest.json parsed; InventoryError when it is missing, not JSON or not an inventory's."""
    try:
        data = json.loads(storage.read_bytes(manifest))
    except FileNotFoundError:
        raise InventoryError(f"inventory manifest {manifest} does not exist; check the path") from None
    except OSError as exc:  # denied, or the store unreachable
        raise InventoryError(f"cannot read inventory manifest {manifest} ({type(exc).__name__}); check the "
                             "credentials' read access to the inventory's bucket") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InventoryError(f"inventory manifest {manifest} is not JSON ({type(exc).__name__}); give the "
                             "manifest.json S3 Inventory delivered") from None
    return parse_manifest(manifest, data, data_file_root(manifest, data))


def parse_manifest(manifest: str, data: object, root: str) -> Inventory:
    """The fields read from a manifest.json's content; data files are `root`/key."""
    if not isinstance(data, dict) or not all(k in data for k in ("sourceBucket", "fileFormat", "files")):
        raise InventoryError(f"inventory manifest {manifest} lacks sourceBucket, fileFormat or files; give the "
                             "manifest.json S3 Inventory delivered")
    fmt = next((f for f in FORMATS if f.lower() == str(data["fileFormat"]).lower()), None)
    if fmt is None:
        raise InventoryError(f"inventory manifest {manifest}: fileFormat {data['fileFormat']!r} is not one of "
                             f"{', '.join(FORMATS)}")
    columns = [CSV_FIELDS.get(c.strip(), c.strip()) for c in str(data.get("fileSchema", "")).split(",")]
    if fmt == "CSV" and "key" not in columns:
        raise InventoryError(f"inventory manifest {manifest}: its fileSchema has no Key field")
    try:
        files = [data_file(f"{root}/{f['key']}", f) for f in data["files"]]
    except (KeyError, TypeError):
        raise InventoryError(f"inventory manifest {manifest}: an entry of its files has no key") from None
    return Inventory(manifest, data["sourceBucket"], fmt, columns, files)


def data_file(uri: str, entry: dict) -> DataFile:
    """A manifest's entry of files: its size and MD5checksum when it gives them (tools other than S3 may not)."""
    size, md5 = entry.get("size"), entry.get("MD5checksum")
    return DataFile(uri, size if isinstance(size, int) and not isinstance(size, bool) else None,
                    md5.strip().lower() if isinstance(md5, str) and md5.strip() else None)


def data_file_root(manifest: str, data: object) -> str:
    """Where the data files' keys start: the store root that holds the manifest's config folder (data file keys
    are `<destination-prefix>/<source-bucket>/<config-id>/data/...`), so a copied inventory reads where it lies."""
    config = posixpath.dirname(posixpath.dirname(manifest))
    files = data.get("files") if isinstance(data, dict) else None
    key = files[0].get("key", "") if isinstance(files, list) and files and isinstance(files[0], dict) else ""
    parts = key.split("/")[:-1]
    for n in range(len(parts), 0, -1):  # the longest start of the key that ends the config folder's path
        tail = "/" + "/".join(parts[:n])
        if config.endswith(tail):
            return config[:-len(tail)]
    scheme, _, rest = manifest.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if rest else config


def check_inventory(manifest: str, storage: Storage) -> Inventory:
    """The manifest is readable and every data file it names exists (checked concurrently)."""
    inventory = load_inventory(manifest, storage)
    uris = [f.uri for f in inventory.files]
    with ThreadPoolExecutor(16) as pool:
        present = list(pool.map(storage.exists, uris))
    missing = [uri for uri, there in zip(uris, present) if not there]
    if missing:
        raise InventoryError(f"inventory manifest {manifest} names {len(missing)} data file(s) that do not exist, "
                             f"the first {missing[0]}; give a complete delivery's manifest.json")
    return inventory


def read_inventory(manifest: str, storage: Storage, prefix: str | None = None) -> Iterator[list[ObjectInfo]]:
    """The inventory's current objects under `prefix`, a page of up to PAGE_ROWS at a time, data file by data
    file and record batch by record batch."""
    inventory = load_inventory(manifest, storage)
    for file in inventory.files:
        for batch in data_batches(inventory, file, storage):
            for start in range(0, batch.num_rows, PAGE_ROWS):
                page = entries(batch.slice(start, PAGE_ROWS), inventory, prefix)
                if page:
                    yield page


def data_batches(inventory: Inventory, file: DataFile, storage: Storage) -> Iterator[pa.RecordBatch]:
    """One data file's record batches, with the columns of COLUMNS it has (CSV: as text); InventoryError when it
    cannot be read or does not match its manifest."""
    try:
        with verified(file, storage) as f:
            yield from _batches(inventory, f)
    except FileNotFoundError:
        raise InventoryError(f"inventory data file {file.uri} no longer exists (expired or deleted since its "
                             "delivery); run on a newer delivery") from None
    except UNREADABLE as exc:
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InventoryError(f"inventory data file {file.uri} cannot be read ({type(exc).__name__}: {why}); check "
                             "the credentials' read access to it and its storage class, or run on a newer "
                             "delivery") from None


@contextmanager
def verified(file: DataFile, storage: Storage) -> Iterator[IO[bytes]]:
    """The data file to parse: as stored when its manifest gives no MD5checksum; else fetched once into a local
    spool while it is hashed, and handed on only once it matches the manifest's size and checksum."""
    with open_read(storage, file.uri) as f:
        if file.md5 is None:
            yield f
            return
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
            digest, size = hashlib.md5(usedforsecurity=False), 0
            while chunk := f.read(READ_BYTES):
                digest.update(chunk)
                spool.write(chunk)
                size += len(chunk)
            check_checksum(file, size, digest.hexdigest())
            spool.seek(0)
            yield spool


def check_checksum(file: DataFile, size: int, md5: str) -> None:
    """InventoryError when the bytes read are not those the manifest describes."""
    if md5 == file.md5 and (file.size is None or size == file.size):
        return
    said = f"{file.size:,} bytes" if file.size is not None else "bytes"
    raise InventoryError(f"inventory data file {file.uri} does not match its manifest ({size:,} bytes with MD5 "
                         f"{md5}, the manifest lists {said} with MD5checksum {file.md5}): it was cut short or replaced "
                         "since its delivery; restore it, or run on another delivery")


def _batches(inventory: Inventory, f: IO[bytes]) -> Iterator[pa.RecordBatch]:
    if inventory.file_format == "Parquet":
        parquet = pq.ParquetFile(f)
        yield from parquet.iter_batches(columns=[c for c in COLUMNS if c in parquet.schema_arrow.names])
    elif inventory.file_format == "ORC":
        yield from _orc_batches(f)
    else:
        yield from _csv_batches(gzip.GzipFile(fileobj=f, mode="rb"), inventory.csv_columns)


def _orc_batches(f) -> Iterator[pa.RecordBatch]:
    from pyarrow import orc

    file = orc.ORCFile(f)
    columns = [c for c in COLUMNS if c in file.schema.names]
    for stripe in range(file.nstripes):
        yield file.read_stripe(stripe, columns=columns)  # a stripe at a time (64 MiB at most by default)


def _csv_batches(f, columns: list[str]) -> Iterator[pa.RecordBatch]:
    read = pacsv.ReadOptions(column_names=columns)
    convert = pacsv.ConvertOptions(include_columns=[c for c in COLUMNS if c in columns],
                                   column_types={c: pa.string() for c in columns}, strings_can_be_null=True)
    yield from pacsv.open_csv(f, read_options=read, convert_options=convert)


def entries(batch: pa.RecordBatch, inventory: Inventory, prefix: str | None) -> list[ObjectInfo]:
    """The batch's current objects (neither a delete marker nor an older version) whose key starts with `prefix`."""
    table = pa.Table.from_batches([batch])
    table = table.filter(pc.invert(pc.or_(_is(table, "is_delete_marker", True), _is(table, "is_latest", False))))
    keys = table["key"].to_pylist()
    if inventory.file_format == "CSV":
        keys = [unquote_plus(k) if k is not None and ("%" in k or "+" in k) else k for k in keys]
    sizes = _column(table, "size", pa.int64())
    mtimes = _column(table, "last_modified_date", TIMESTAMP)
    etags = _column(table, "e_tag", pa.string())
    bucket = inventory.source_bucket
    return [ObjectInfo(f"s3://{bucket}/{k}", size, etag.strip('"') if etag else None, mtime)
            for k, size, etag, mtime in zip(keys, sizes, etags, mtimes)
            if k and (prefix is None or k.startswith(prefix)) and not k.endswith("/")]


def _column(table: pa.Table, name: str, kind: pa.DataType) -> list:
    if name not in table.column_names:
        return [None] * table.num_rows
    column = table[name]
    if pa.types.is_string(column.type):  # CSV text: blank is missing
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
    if pa.types.is_timestamp(column.type) and column.type.tz is None:
        column = column.cast(pa.timestamp(column.type.unit, "UTC"))
    return column.cast(kind, safe=False).to_pylist()


def _is(table: pa.Table, name: str, value: bool) -> pa.Array:
    """Where the flag column `name` holds `value` (CSV: "true"/"false"); False where it is missing or absent."""
    if name not in table.column_names:
        return pa.array([False] * table.num_rows)
    column = table[name].combine_chunks()
    flag = pc.equal(pc.utf8_lower(column), "true") if pa.types.is_string(column.type) else column.cast(pa.bool_())
    return pc.fill_null(flag if value else pc.invert(flag), False)
