"""Listing a folder a page at a time: S3's paginator (with each object's ETag, size and last-modified time),
or a local walk in sorted order."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Iterator

from pipeline.io.uris import ObjectInfo, split_s3

logger = logging.getLogger(__name__)

PAGE_SIZE = 1000


def list_s3(client, folder: str) -> Iterator[list[ObjectInfo]]:
    bucket, key_prefix = split_s3(folder)
    if key_prefix and not key_prefix.endswith("/"):
        key_prefix += "/"
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix, PaginationConfig={"PageSize": PAGE_SIZE}):
        yield [ObjectInfo(uri=f"s3://{bucket}/{obj['Key']}", size=obj["Size"],
                          etag=obj.get("ETag", "").strip('"') or None, last_modified=obj.get("LastModified"))
               for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]


def list_local(root: str, quote_paths: bool = True) -> Iterator[list[ObjectInfo]]:
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

