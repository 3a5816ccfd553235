"""S3 Inventory deliveries as AWS writes them (docs: "Locating your inventory list", "Inventory manifest"), through
`Storage` to a local folder or the test S3 server: data files under `<prefix>/<source>/<config>/data/`, then
`<YYYY-MM-DDTHH-MMZ>/manifest.json` and its `manifest.checksum`, and `hive/dt=.../symlink.txt`.

CSV: gzip, no header, every field quoted, keys URL-encoded (a space as `+`, or as `%20` with `space="%20"`; a `+`
as `%2B`). ORC and Parquet: the snake_case columns of AWS's schema, keys as they are, Parquet's last-modified in
TIMESTAMP_MILLIS."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote, quote_plus

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.storage import Storage

FIELDS = ["Bucket", "Key", "VersionId", "IsLatest", "IsDeleteMarker", "Size", "LastModifiedDate", "ETag",
          "StorageClass"]
ORC_SCHEMA = ("struct<bucket:string,key:string,version_id:string,is_latest:boolean,is_delete_marker:boolean,"
              "size:bigint,last_modified_date:timestamp,e_tag:string,storage_class:string>")
PARQUET_SCHEMA = ("message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); optional binary "
                  "version_id (UTF8); optional boolean is_latest; optional boolean is_delete_marker; optional int64 "
                  "size; optional int64 last_modified_date (TIMESTAMP_MILLIS); optional binary e_tag (UTF8); "
                  "optional binary storage_class (UTF8);}")
EXTENSIONS = {"CSV": "csv.gz", "ORC": "orc", "Parquet": "parquet"}


@dataclass(frozen=True)
class Entry:
    """One inventory row: an object version (or a delete marker)."""
    key: str
    size: int | None = 1
    etag: str | None = "0" * 32
    last_modified: datetime = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)
    version_id: str | None = None
    is_latest: bool = True
    is_delete_marker: bool = False


def entry_of(storage: Storage, bucket: str, key: str, **versions) -> Entry:
    """The inventory row of an object that exists: its ETag, size and last-modified as S3 reports them."""
    head = storage.s3_client.head_object(Bucket=bucket, Key=key)
    return Entry(key, head["ContentLength"], head["ETag"].strip('"'), head["LastModified"], **versions)


def write_inventory(storage: Storage, root: str, source: str, entries: list[Entry], fmt: str,
                    delivered: str = "2024-05-01T00-00Z", config: str = "daily", prefix: str = "inventories",
                    files: int = 2, space: str = "+") -> str:
    """A delivery under `root` (s3://destination-bucket or a local folder); returns its manifest.json's URI."""
    base = f"{prefix}/{source}/{config}"
    files = max(1, min(files, len(entries)))
    chunks = [entries[i::files] for i in range(files)]
    listed = []
    for chunk in chunks:
        key = f"{base}/data/{uuid.uuid4()}.{EXTENSIONS[fmt]}"
        body = _data_file(fmt, source, chunk, space)
        storage.write_bytes(f"{root}/{key}", body)
        listed.append({"key": key, "size": len(body), "MD5checksum": hashlib.md5(body).hexdigest()})
    schema = {"CSV": ", ".join(FIELDS), "ORC": ORC_SCHEMA, "Parquet": PARQUET_SCHEMA}[fmt]
    destination = root.removeprefix("s3://").split("/")[0]
    manifest = json.dumps({"sourceBucket": source, "destinationBucket": f"arn:aws:s3:::{destination}",
                           "version": "2016-11-30", "creationTimestamp": "1714521600000", "fileFormat": fmt,
                           "fileSchema": schema, "files": listed}, indent=2).encode()
    storage.write_bytes(f"{root}/{base}/{delivered}/manifest.json", manifest)
    storage.write_bytes(f"{root}/{base}/{delivered}/manifest.checksum", hashlib.md5(manifest).hexdigest().encode())
    dt = delivered.replace("T", "-").removesuffix("Z")
    symlink = "\n".join(f"s3://{destination}/{f['key']}" for f in listed).encode()
    storage.write_bytes(f"{root}/{base}/hive/dt={dt}/symlink.txt", symlink)
    return f"{root}/{base}/{delivered}/manifest.json"


def _data_file(fmt: str, source: str, entries: list[Entry], space: str) -> bytes:
    if fmt == "CSV":
        return _csv(source, entries, space)
    table = _table(source, entries, fmt)
    buffer = io.BytesIO()
    if fmt == "ORC":
        from pyarrow import orc

        orc.write_table(table, buffer, compression="zlib")
    else:
        pq.write_table(table, buffer, compression="snappy")
    return buffer.getvalue()


def _csv(source: str, entries: list[Entry], space: str) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for e in entries:
        key = quote_plus(e.key, safe="/") if space == "+" else quote(e.key, safe="/")
        size = "" if e.size is None else str(e.size)
        when = e.last_modified.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        writer.writerow([source, key, e.version_id or "", str(e.is_latest).lower(), str(e.is_delete_marker).lower(),
                         size, when, e.etag or "", "" if e.is_delete_marker else "STANDARD"])
    return gzip.compress(text.getvalue().encode())


def _table(source: str, entries: list[Entry], fmt: str) -> pa.Table:
    return pa.table({
        "bucket": [source] * len(entries),
        "key": [e.key for e in entries],
        "version_id": pa.array([e.version_id for e in entries], pa.string()),
        "is_latest": [e.is_latest for e in entries],
        "is_delete_marker": [e.is_delete_marker for e in entries],
        "size": pa.array([e.size for e in entries], pa.int64()),
        # ORC's `timestamp` has no zone (UTC values); Parquet's TIMESTAMP_MILLIS is adjusted to UTC
        "last_modified_date": pa.array([e.last_modified for e in entries], pa.timestamp("ms", "UTC")).cast(
            pa.timestamp("ms") if fmt == "ORC" else pa.timestamp("ms", "UTC")),
        "e_tag": [e.etag for e in entries],
        "storage_class": pa.array([None if e.is_delete_marker else "STANDARD" for e in entries], pa.string()),
    })
