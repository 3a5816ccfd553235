"""Small objects under conditions, on any object store: what a lease does (create only if absent, replace only if
unchanged, read with its age by the store's clock, delete only if unchanged). S3 goes through the probe client,
whose short timeouts keep a renewal from hanging longer than the lease lives; gs:// and az:// through their stores.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from pipeline.io.storage import Storage, error_code, precondition_failed, s3_condition, s3_get_or_none, split_s3


def ready(storage: Storage, uri: str) -> None:
    """Make the client a small write to `uri` uses (a second or so the first time), so that timing the write
    times the request alone: a lease runs from when its write was sent."""
    if (cloud := storage.cloud(uri)) is not None:
        cloud.ready(uri)
    else:
        storage.s3_probe_client  # noqa: B018 - made on first use


def put_small(storage: Storage, uri: str, data: bytes, if_absent: bool = False, if_match: str | None = None) -> str:
    """Write `data`, returning its ETag (GCS: generation); a condition that does not hold raises FileExistsError.
    Conditions are always sent: the caller decides whether to ask for them."""
    if (cloud := storage.cloud(uri)) is not None:
        return cloud.put(uri, data, if_absent, if_match)
    bucket, key = split_s3(uri)
    condition = s3_condition(if_absent, if_match)
    try:
        return storage.s3_probe_client.put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except Exception as exc:
        if condition and (precondition_failed(exc) or error_code(exc) in ("NoSuchKey", "404")):
            raise FileExistsError(f"{uri} changed meanwhile") from None
        raise


def read_with_age(storage: Storage, uri: str) -> tuple[bytes, str, float] | None:
    """(bytes, ETag, seconds since the object was written by the store's own clock), or None if absent."""
    if (cloud := storage.cloud(uri)) is not None:
        return cloud.read_with_age(uri)
    reply = s3_get_or_none(storage.s3_probe_client, uri)
    if reply is None:
        return None
    served = reply["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(served).timestamp() if served else time.time()
    return reply["Body"].read(), reply["ETag"], now - reply["LastModified"].timestamp()


def delete_if_match(storage: Storage, uri: str, etag: str) -> None:
    """Delete `uri` only while its ETag (GCS: generation) is still `etag`; gone or changed is fine."""
    if (cloud := storage.cloud(uri)) is not None:
        return cloud.delete_if_match(uri, etag)
    bucket, key = split_s3(uri)
    try:
        storage.s3_probe_client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
    except Exception as exc:  # noqa: BLE001 - changed or gone: it is no longer ours to delete
        if not (precondition_failed(exc) or error_code(exc) in ("NoSuchKey", "404")):
            raise
