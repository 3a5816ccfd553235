"""The one filesystem layer: local paths and s3:// URIs, for listing, reading and writing.

Data goes through fsspec (s3fs for S3: concurrent batched reads, and writes that work on every
S3-compatible server). Listing goes through boto3's paginator, which streams pages with each object's
ETag, size and last-modified time. Both honour AWS_ENDPOINT_URL and the standard credential chain;
an explicit `storage.endpoint_url` in the job spec wins.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Iterator

import fsspec

logger = logging.getLogger(__name__)

PAGE_SIZE = 1000
BODY_READ_ATTEMPTS = 4


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int | None
    etag: str | None
    last_modified: datetime | None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def absolute(uri: str) -> str:
    """Local paths become absolute on the driver: Ray workers do not share its working directory."""
    if is_s3(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def extension(uri: str) -> str:
    return posixpath.splitext(uri)[1].lower().lstrip(".")


@dataclass(frozen=True)
class Storage:
    """Picklable handle: built on the driver, used inside Ray tasks and actors."""
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 10
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    # Create-only-if-absent writes (If-None-Match: *) for chunks, commit records and the lease; off only for a
    # store that cannot do them, by the user's choice (output.conditional_writes: off).
    conditional_writes: bool = True

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None, **retry) -> "Storage":
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(endpoint_url=endpoint, region=region, **retry)

    # --- clients, built lazily once per process and never pickled -------------------------------------
    _SETTINGS = ("endpoint_url", "region", "max_attempts", "connect_timeout_s", "read_timeout_s", "conditional_writes")

    def __getstate__(self) -> dict:
        return {name: getattr(self, name) for name in self._SETTINGS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def _retry_config(self) -> dict:
        # botocore's "standard" mode retries throttling, 5xx, connection resets and timeouts with jittered
        # exponential backoff; the timeouts turn a stalled connection into one of those retries.
        return {"retries": {"mode": "standard", "total_max_attempts": self.max_attempts},
                "connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s}

    @cached_property
    def s3_client(self):
        return self._client(**self._retry_config, max_pool_connections=64)

    @cached_property
    def s3_probe_client(self):
        """For up-front checks: a wrong endpoint should fail in seconds, not after a minute of retries."""
        return self._client(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=3, read_timeout=10)

    def _client(self, **config):
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()  # not the default session: it caches credentials process-wide
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                              config=Config(**config))

    @cached_property
    def s3fs(self) -> fsspec.AbstractFileSystem:
        # retries=1 turns off s3fs's own retry loops (two nested, of 5 each, around botocore's): one bounded
        # loop, botocore's, decides how long a failing request may take.
        fs = fsspec.filesystem("s3", endpoint_url=self.endpoint_url, client_kwargs={"region_name": self.region},
                               config_kwargs=self._retry_config)
        fs.retries = 1
        return fs

    @cached_property
    def localfs(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem("file")

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        if is_s3(uri):
            return self.s3fs, uri.removeprefix("s3://")
        return self.localfs, absolute(uri)

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
            for i, result in zip(pending, self._cat_many([uris[i] for i in pending])):
                results[i] = result
            pending = [i for i in pending if is_transient(results[i])]
            if not pending:
                break
        return results

    def _cat_many(self, uris: list[str]) -> list[bytes | Exception]:
        results: list[bytes | Exception] = [b""] * len(uris)
        groups: dict[int, tuple[fsspec.AbstractFileSystem, list[int], list[str]]] = {}
        for i, uri in enumerate(uris):
            fs, path = self.fs(uri)
            _, indexes, paths = groups.setdefault(id(fs), (fs, [], []))
            indexes.append(i)
            paths.append(path)
        for fs, indexes, paths in groups.values():
            for i, result in zip(indexes, fs.cat_ranges(paths, None, None, on_error="return")):
                results[i] = result
        return results

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs(uri)
        return fs.cat_file(path)

    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return fs.exists(path)

    # --- writing --------------------------------------------------------------------------------------
    def write_atomic(self, uri: str, write, if_absent: bool = False) -> None:
        """Call write(file) so that readers see the whole file at `uri` or nothing.

        On S3 an object only appears when its upload completes, so we write in place. Locally we write a
        dot-prefixed temporary name, which dataset readers and `*.parquet` globs skip, then rename it.
        `if_absent`: create it only if nothing is there yet (S3's If-None-Match: *, a local hard link), else
        raise FileExistsError.
        """
        fs, path = self.fs(uri)
        if is_s3(uri):
            # Buffer, then one PUT through boto3: its read timeout covers a stalled upload, where s3fs (aiohttp
            # waiting on "100 Continue") has no timer running and would wait forever.
            buffer = io.BytesIO()
            write(buffer)
            bucket, key = split_s3(uri)
            condition = {"IfNoneMatch": "*"} if if_absent and self.conditional_writes else {}
            try:
                self.s3_client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue(), **condition)
            except Exception as exc:
                if condition and precondition_failed(exc):
                    raise FileExistsError(f"{uri} already exists") from None
                raise
            fs.invalidate_cache(path)
            return
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

    def write_bytes(self, uri: str, data: bytes) -> None:
        self.write_atomic(uri, lambda f: f.write(data))

    def delete(self, uris: list[str]) -> None:
        """Idempotent: what is already gone is fine. S3 keys go 1,000 per request."""
        by_bucket: dict[str, list[str]] = {}
        for uri in uris:
            if is_s3(uri):
                bucket, key = split_s3(uri)
                by_bucket.setdefault(bucket, []).append(key)
                continue
            try:
                self.localfs.rm_file(absolute(uri))  # not rm: it would glob-expand '[', '*' and '?'
            except FileNotFoundError:
                pass
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):
                batch = keys[start:start + 1000]
                reply = self.s3_client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                if reply.get("Errors"):
                    first = reply["Errors"][0]
                    raise OSError(f"cannot delete s3://{bucket}/{first['Key']}: {first.get('Code')} "
                                  f"{first.get('Message', '')}")
            self.s3fs.invalidate_cache()

    def remove_folder(self, uri: str) -> None:
        """Drop a local folder and what is left in it (a killed write's hidden temp file); S3 has no folders."""
        if not is_s3(uri):
            shutil.rmtree(absolute(uri), ignore_errors=True)

    # --- listing --------------------------------------------------------------------------------------
    def list_pages(self, folder: str, quote_paths: bool = True) -> Iterator[list[ObjectInfo]]:
        """Every object under `folder` (recursively), a page at a time, in key order for S3.

        s3://b/images and s3://b/images/ both mean the folder, as a local path would: s3://b/images2/x is not
        in it. `quote_paths=False`: a warning never names a folder (a pseudonymised job's folders may name people).
        """
        if is_s3(folder):
            yield from self._list_s3(folder)
        else:
            yield from self._list_local(absolute(folder), quote_paths)

    def _list_s3(self, folder: str) -> Iterator[list[ObjectInfo]]:
        bucket, key_prefix = split_s3(folder)
        if key_prefix and not key_prefix.endswith("/"):
            key_prefix += "/"
        paginator = self.s3_client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix, PaginationConfig={"PageSize": PAGE_SIZE}):
            yield [ObjectInfo(uri=f"s3://{bucket}/{obj['Key']}", size=obj["Size"],
                              etag=obj.get("ETag", "").strip('"') or None, last_modified=obj.get("LastModified"))
                   for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]

    def _list_local(self, root: str, quote_paths: bool = True) -> Iterator[list[ObjectInfo]]:
        page: list[ObjectInfo] = []
        for entry in _walk_files(root, quote_paths=quote_paths):
            try:
                stat = entry.stat()
                size, mtime = stat.st_size, datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc)
            except OSError:  # gone since the folder was read: the read stage will say so in its row
                size, mtime = None, None
            page.append(ObjectInfo(uri=printable(entry.path), size=size, etag=None, last_modified=mtime))
            if len(page) >= PAGE_SIZE:
                yield page
                page = []
        if page:
            yield page


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


def printable(path: str) -> str:
    """A file name that is not valid UTF-8 keeps its place as a row (its read then fails and says so)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _walk_files(root: str, seen: set[str] | None = None, quote_paths: bool = True) -> Iterator[os.DirEntry]:
    """Files under root in sorted order, streamed folder by folder; hidden names skipped.

    Symlinked folders are followed once each, so a link loop cannot make the walk endless.
    """
    seen = seen if seen is not None else set()
    real = os.path.realpath(root)
    if real in seen:
        return
    seen.add(real)
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except FileNotFoundError:  # not there (an output's _staging/ before its first run), or gone since its parent
        return
    except OSError as exc:
        logger.warning("skipping unreadable folder %s (%s)", printable(root) if quote_paths else "<input folder>",
                       exc.strerror)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=True):
            yield from _walk_files(entry.path, seen, quote_paths)
        elif entry.is_file(follow_symlinks=True):
            yield entry

