"""Where an object lives: local paths and s3:// URIs, and the object as a listing sees it."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from datetime import datetime


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
