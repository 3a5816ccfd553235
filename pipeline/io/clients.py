"""How a process reaches the stores: boto3 and fsspec clients for S3 (any S3-compatible endpoint), local disk,
and each cloud's own library for gs:// (`gcs.GcsStore`) and az:// / abfs:// (`azure.AzureStore`).

Built lazily once per process from a few settings, and never pickled: the settings travel into Ray tasks and
actors, each process makes its own clients. Each honours its cloud's standard credential chain and emulator
variables (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST, AZURE_STORAGE_CONNECTION_STRING); an explicit
`storage.endpoint_url` in the job spec wins for S3.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache, cached_property

import fsspec

from pipeline.io.uris import absolute, is_s3, store_of


@dataclass(frozen=True)
class StoreClients:
    """Picklable settings, and the clients they make in each process."""
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 10
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    # Create-only-if-absent writes (If-None-Match: *) for chunks, commit records and the lease; off only for a
    # store that cannot do them, by the user's choice (output.conditional_writes: off).
    conditional_writes: bool = True

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None, **retry):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(endpoint_url=endpoint, region=region, **retry)

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
        fs = literal_key_s3fs()(endpoint_url=self.endpoint_url, client_kwargs={"region_name": self.region},
                                config_kwargs=self._retry_config)
        fs.retries = 1
        return fs

    @cached_property
    def localfs(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem("file")

    @cached_property
    def gcs(self):
        from pipeline.io.gcs import GcsStore

        return GcsStore(self.connect_timeout_s, self.read_timeout_s,
                        retry_deadline_s=self.max_attempts * self.connect_timeout_s)

    @cached_property
    def azure(self):
        from pipeline.io.azure import AzureStore

        return AzureStore(self.connect_timeout_s, self.read_timeout_s, self.max_attempts)

    def cloud(self, uri: str):
        """The gs:// or az:// store of `uri` (`GcsStore`, `AzureStore`), or None for S3 and local paths."""
        kind = store_of(uri)
        return self.gcs if kind == "gcs" else self.azure if kind == "azure" else None

    def fs(self, uri: str) -> tuple[object, str]:
        """A filesystem pyarrow's datasets read `uri` through, and its path there: fsspec for S3 and local disk,
        pyarrow's own for GCS and Azure."""
        if is_s3(uri):
            return self.s3fs, uri.removeprefix("s3://")
        kind = store_of(uri)
        if kind in ("gcs", "azure"):
            module = importlib.import_module(f"pipeline.io.{kind}")
            return module.arrow_fs(uri), module.arrow_path(uri)
        return self.localfs, absolute(uri)


@cache
def literal_key_s3fs() -> type:
    """s3fs, taking every key as written.

    s3fs reads `key?versionId=v` as version v of `key` (even with version_aware off, it cuts the key there), so
    an object whose key holds that text would read as "not found". Our URIs name keys, never versions.
    """
    from s3fs import S3FileSystem

    class LiteralKeyS3FileSystem(S3FileSystem):
        def split_path(self, path) -> tuple[str, str, None]:
            trail = path[len(path.rstrip("/")):]
            path = self._strip_protocol(path).lstrip("/")
            if "/" not in path:
                return path, "", None
            bucket, key = self._find_bucket_key(path)
            return bucket, key + trail, None

    return LiteralKeyS3FileSystem
