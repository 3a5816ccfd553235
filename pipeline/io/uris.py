"""Where an object lives: local paths and object-store URIs (s3://, gs://, az:// and abfs://), and the object as a
listing sees it."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from datetime import datetime

# The object stores a URI may name, by scheme; abfs(s):// is Azure's Data Lake spelling of a blob container.
STORE_SCHEMES = {"s3": "s3", "gs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int | None
    etag: str | None  # the store's version marker: S3's and Azure's ETag, GCS's generation
    last_modified: datetime | None


def scheme(uri: str) -> str:
    return uri.partition("://")[0].lower() if "://" in uri else ""


def store_of(uri: str) -> str:
    """'s3', 'gcs' or 'azure' for an object-store URI; 'local' for a path or file:// URI."""
    return STORE_SCHEMES.get(scheme(uri), "local")


def is_remote(uri: str) -> bool:
    return store_of(uri) != "local"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@dataclass(frozen=True)
class Location:
    """An object-store URI taken apart: bucket (or container), key, and Azure's account where the URI names it
    (abfs://container@account.dfs.core.windows.net/key)."""
    scheme: str
    bucket: str
    key: str
    account: str | None = None

    @classmethod
    def of(cls, uri: str) -> "Location":
        name, _, rest = uri.partition("://")
        bucket, _, key = rest.partition("/")
        account = None
        if "@" in bucket:
            bucket, _, host = bucket.partition("@")
            account = host.split(".", 1)[0] or None
        return cls(name.lower(), bucket, key, account)

    def uri(self, key: str) -> str:
        """The URI of another key in the same bucket, spelled as this one is."""
        host = self.bucket + (f"@{self.account}.dfs.core.windows.net" if self.account else "")
        return f"{self.scheme}://{host}/{key}"


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def absolute(uri: str) -> str:
    """Local paths become absolute on the driver: Ray workers do not share its working directory."""
    if is_remote(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def extension(uri: str) -> str:
    return posixpath.splitext(uri)[1].lower().lstrip(".")
