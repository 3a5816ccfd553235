"""Bytes in and out of a store: local paths, s3://, gs:// and az:// (abfs://) URIs alike.

S3 data goes through fsspec (s3fs: concurrent batched reads, and writes that work on every S3-compatible server);
a single S3 PUT goes through boto3 (see `write_atomic`). gs:// and az:// go through their clouds' own libraries
(`gcs.GcsStore`, `azure.AzureStore`), which `Storage` hands each call to. The clients are `StoreClients'`;
listing S3 and local folders is walk.py's.
"""

from __future__ import annotations

import io
import os
import posixpath
import random
import shutil
import time
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import fsspec

from pipeline.io.clients import StoreClients
from pipeline.io.uris import ObjectInfo, absolute, is_remote, is_s3, split_s3
from pipeline.io.uris import extension, join  # noqa: F401 - callers take a URI's helpers from here with Storage
from pipeline.io.walk import list_local, list_s3

BODY_READ_ATTEMPTS = 4


class Storage(StoreClients):
    """Picklable handle: built on the driver, used inside Ray tasks and actors."""

    # --- reading --------------------------------------------------------------------------------------
    def read_many(self, uris: list[str]) -> list[bytes | Exception]:
        """Fetch many objects concurrently (s3fs runs the GETs together); a failure is returned, not raised.

        botocore retries a request that fails with a status, but not a body cut short (a reset or a short read
        mid-transfer), and s3fs's own retries are off (see `s3fs`): such reads are tried again here, with
        backoff, `BODY_READ_ATTEMPTS` times in all. A missing object or a refusal is not retried.
        cat_ranges, unlike cat, never expands glob characters: a key may contain '*', '?' or '['.
        """
        results: list[bytes | Exception] = [b""] * len(uris)
        pending = list(range(len(uris)))
        for attempt in range(BODY_READ_ATTEMPTS):
            if attempt:
                time.sleep(min(2.0, 0.1 * 2 ** attempt) * (0.5 + random.random()))
            for i, result in zip(pending, _fetch_once(self, [uris[i] for i in pending])):
                results[i] = result
            pending = [i for i in pending if is_transient(results[i])]
            if not pending:
                break
        return results

    def read_bytes(self, uri: str) -> bytes:
        if (cloud := self.cloud(uri)) is not None:
            return cloud.read(uri)
        fs, path = self.fs(uri)
        return fs.cat_file(path)

    def exists(self, uri: str) -> bool:
        if (cloud := self.cloud(uri)) is not None:
            return cloud.exists(uri)
        fs, path = self.fs(uri)
        return fs.exists(path)

    # --- writing --------------------------------------------------------------------------------------
    def write_atomic(self, uri: str, write, if_absent: bool = False, if_match: str | None = None) -> str:
        """Call write(file) so that readers see the whole file at `uri` or nothing; returns its ETag (`stat`).

        On S3 an object only appears when its upload completes, so we write in place. Locally we write a
        dot-prefixed temporary name, which dataset readers and `*.parquet` globs skip, then rename it.
        `if_absent`: only if nothing is there yet (S3's If-None-Match: *, a local hard link); `if_match`: only if
        its ETag is still that one (S3's If-Match; locally a check, then a rename: the output's flock keeps other
        writers out). A condition that does not hold raises FileExistsError; conditional_writes: false drops both.
        gs:// and az:// write in place too, with their own preconditions (`GcsStore.put`, `AzureStore.put`).
        """
        if (cloud := self.cloud(uri)) is not None:
            buffer = io.BytesIO()
            write(buffer)
            if not self.conditional_writes:
                if_absent, if_match = False, None
            return cloud.put(uri, buffer.getvalue(), if_absent, if_match)
        fs, path = self.fs(uri)
        if is_s3(uri):
            # Buffer, then one PUT through boto3: its read timeout covers a stalled upload, where s3fs (aiohttp
            # waiting on "100 Continue") has no timer running and would wait forever.
            buffer = io.BytesIO()
            write(buffer)
            bucket, key = split_s3(uri)
            condition = s3_condition(if_absent, if_match) if self.conditional_writes else {}
            try:
                reply = self.s3_client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue(), **condition)
            except Exception as exc:
                if condition and (precondition_failed(exc) or error_code(exc) in ("NoSuchKey", "404")):
                    raise FileExistsError(f"{uri} changed meanwhile") from None
                raise
            fs.invalidate_cache(path)
            return reply["ETag"]
        if if_match is not None and self.conditional_writes and _local_etag_or_none(path) != if_match:
            raise FileExistsError(f"{uri} changed meanwhile")
        write_local_atomic(fs, path, write, if_absent and self.conditional_writes)
        return local_etag(path)

    def write_bytes(self, uri: str, data: bytes) -> None:
        self.write_atomic(uri, lambda f: f.write(data))

    def delete(self, uris: list[str]) -> None:
        """Idempotent: what is already gone is fine. S3 keys go 1,000 per request."""
        by_bucket: dict[str, list[str]] = {}
        clouds: dict[int, tuple[object, list[str]]] = {}
        for uri in uris:
            if (cloud := self.cloud(uri)) is not None:
                clouds.setdefault(id(cloud), (cloud, []))[1].append(uri)
                continue
            if is_s3(uri):
                bucket, key = split_s3(uri)
                by_bucket.setdefault(bucket, []).append(key)
                continue
            try:
                self.localfs.rm_file(absolute(uri))  # not rm: it would glob-expand '[', '*' and '?'
            except FileNotFoundError:
                pass
        for bucket, keys in by_bucket.items():
            _delete_s3(self.s3_client, bucket, keys)
            self.s3fs.invalidate_cache()
        for cloud, cloud_uris in clouds.values():
            cloud.delete(cloud_uris)

    def remove_folder(self, uri: str) -> None:
        """Drop a local folder and what is left in it (a killed write's hidden temp file); stores have no folders."""
        if not is_remote(uri):
            shutil.rmtree(absolute(uri), ignore_errors=True)

    # --- listing --------------------------------------------------------------------------------------
    def list_pages(self, folder: str, quote_paths: bool = True) -> Iterator[list[ObjectInfo]]:
        """Every object under `folder` (recursively), a page at a time, in key order for S3.

        s3://b/images and s3://b/images/ both mean the folder, as a local path would: s3://b/images2/x is not
        in it. `quote_paths=False`: a warning never names a folder (a pseudonymised job's folders may name people).
        """
        if is_s3(folder):
            yield from list_s3(self.s3_client, folder)
        elif (cloud := self.cloud(folder)) is not None:
            yield from cloud.list_pages(folder)
        else:
            yield from list_local(absolute(folder), quote_paths)


@contextmanager
def open_read(storage: Storage, uri: str) -> Iterator[IO[bytes]]:
    """A seekable file to read `uri` through, whichever store holds it (pyarrow's GCS and Azure filesystems open
    with `open_input_file`, fsspec's with `open`)."""
    fs, path = storage.fs(uri)
    with (fs.open(path, "rb") if isinstance(fs, fsspec.AbstractFileSystem) else fs.open_input_file(path)) as f:
        yield f


def _fetch_once(storage: Storage, uris: list[str]) -> list[bytes | Exception]:
    """One try at each object: grouped by filesystem (or cloud store), each group fetched concurrently."""
    results: list[bytes | Exception] = [b""] * len(uris)
    groups: dict[int, tuple[object, list[int], list[str]]] = {}
    for i, uri in enumerate(uris):
        cloud = storage.cloud(uri)
        fs, path = (cloud, uri) if cloud is not None else storage.fs(uri)
        _, indexes, paths = groups.setdefault(id(fs), (fs, [], []))
        indexes.append(i)
        paths.append(path)
    for fs, indexes, paths in groups.values():
        fetched = (fs.read_many(paths) if not isinstance(fs, fsspec.AbstractFileSystem)
                   else fs.cat_ranges(paths, None, None, on_error="return"))
        for i, result in zip(indexes, fetched):
            results[i] = result
    return results


def _delete_s3(client, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = keys[start:start + 1000]
        reply = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        if reply.get("Errors"):
            first = reply["Errors"][0]
            raise OSError(f"cannot delete s3://{bucket}/{first['Key']}: {first.get('Code')} {first.get('Message', '')}")


def write_local_atomic(fs: fsspec.AbstractFileSystem, path: str, write, if_absent: bool) -> None:
    """A dot-prefixed temporary name (skipped by dataset readers and `*.parquet` globs), then a rename, or a hard
    link when the file must not exist yet."""
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        if if_absent:
            os.link(tmp, path)  # fails if `path` exists, as a rename would not
        else:
            os.replace(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def stat(storage: Storage, uri: str) -> tuple[str, int] | None:
    """(ETag, size) of the object or file at `uri`, or None if there is none."""
    if (cloud := storage.cloud(uri)) is not None:
        return cloud.stat(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            reply = storage.s3_client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return reply["ETag"], reply["ContentLength"]
    path = absolute(uri)
    etag = _local_etag_or_none(path)
    return (etag, os.path.getsize(path)) if etag is not None else None


def read_versioned(storage: Storage, uri: str) -> tuple[bytes, str] | None:
    """The bytes at `uri` and the ETag they had (for a write `if_match` it), or None if there is none."""
    if (cloud := storage.cloud(uri)) is not None:
        return cloud.read_versioned(uri)
    if is_s3(uri):
        reply = s3_get_or_none(storage.s3_client, uri)
        return (reply["Body"].read(), reply["ETag"]) if reply is not None else None
    path = absolute(uri)
    try:
        etag = local_etag(path)
        return storage.localfs.cat_file(path), etag
    except FileNotFoundError:
        return None


def s3_get_or_none(client, uri: str) -> dict | None:
    """boto3's GetObject reply for `uri`, or None if there is no such key."""
    bucket, key = split_s3(uri)
    try:
        return client.get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise


def local_etag(path: str) -> str:
    """A local file's stand-in for an ETag: it changes whenever the file is replaced (a new inode) or rewritten."""
    st = os.stat(path)
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _local_etag_or_none(path: str) -> str | None:
    try:
        return local_etag(path)
    except FileNotFoundError:
        return None


def s3_condition(if_absent: bool, if_match: str | None) -> dict:
    if if_match is not None:
        return {"IfMatch": if_match}
    return {"IfNoneMatch": "*"} if if_absent else {}


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def precondition_failed(exc: BaseException) -> bool:
    """S3's answer to a conditional write whose condition does not hold (or that lost a race to another)."""
    return error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def is_transient(result: bytes | Exception) -> bool:
    """A read that may succeed if tried again: any failure but a missing object, a refusal or a folder."""
    return isinstance(result, Exception) and not isinstance(
        result, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
