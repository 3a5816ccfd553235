"""Google Cloud Storage through its own library (google-cloud-storage), for gs:// URIs.

Credentials: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default
login`, the metadata server, Workload Identity); STORAGE_EMULATOR_HOST points every client at an emulator
(anonymous). An object's version marker is its generation: create-only writes send `ifGenerationMatch=0`, a
replace `ifGenerationMatch=<generation>`. Every request has a timeout and a bounded retry deadline.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from functools import cached_property
from typing import Iterator

from pipeline.io.cloud import each_concurrently, raise_first
from pipeline.io.uris import Location, ObjectInfo, join
from pipeline.job.errors import UserError

PAGE_SIZE = 1000


class GcsStore:
    """gs:// objects, made in each process from `StoreClients`' settings."""
    name = "Google Cloud Storage"

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, retry_deadline_s: float):
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.deadline_s = retry_deadline_s
        self._clock_offset: float | None = None  # local clock minus the server's, learnt from our own writes

    @cached_property
    def client(self):
        from google.cloud import storage

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))

    def ready(self, uri: str) -> None:
        self.client  # noqa: B018 - made on first use

    @cached_property
    def retry(self):
        # Google's policy (429, 5xx, resets, timeouts; jittered backoff), bounded by our deadline.
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_timeout(self.deadline_s)

    def _blob(self, uri: str):
        where = Location.of(uri)
        return self.client.bucket(where.bucket).blob(where.key)

    # --- reading --------------------------------------------------------------------------------------
    def read(self, uri: str) -> bytes:
        with _errors_as_os(uri):
            return self._blob(uri).download_as_bytes(timeout=self.timeout, retry=self.retry)

    def read_many(self, uris: list[str]) -> list[bytes | Exception]:
        return each_concurrently(self.read, uris)

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        blob = self._blob(uri)
        try:
            with _errors_as_os(uri):
                data = blob.download_as_bytes(timeout=self.timeout, retry=self.retry)
        except FileNotFoundError:
            return None
        return data, str(blob.generation)

    def read_with_age(self, uri: str) -> tuple[bytes, str, float] | None:
        """(bytes, generation, seconds since it was written by the server's clock), or None."""
        blob = self._blob(uri)
        try:
            with _errors_as_os(uri):
                blob.reload(timeout=self.timeout, retry=self.retry)
                data = blob.download_as_bytes(timeout=self.timeout, retry=self.retry,
                                              if_generation_match=blob.generation)
        except FileNotFoundError:
            return None
        return data, str(blob.generation), self._server_now(uri) - blob.updated.timestamp()

    def _server_now(self, uri: str) -> float:
        """The server's clock now: ours, corrected by what our last write's `updated` time said (a probe write
        beside `uri` if we have not written yet), so a lease's age does not depend on this host's clock."""
        if self._clock_offset is None:
            probe = uri + f".clock-{os.getpid()}-{time.monotonic_ns()}"
            self.put(probe, b"", if_absent=False, if_match=None)
            self.delete([probe])
        return time.time() - self._clock_offset

    def stat(self, uri: str) -> tuple[str, int] | None:
        where = Location.of(uri)
        with _errors_as_os(uri):
            blob = self.client.bucket(where.bucket).get_blob(where.key, timeout=self.timeout, retry=self.retry)
        return (str(blob.generation), blob.size) if blob is not None else None

    def exists(self, uri: str) -> bool:
        """An object, or a folder: anything under `uri/` (as s3fs answers for S3)."""
        return self.stat(uri) is not None or bool(next(iter(self.list_pages(uri)), []))

    def list_pages(self, folder: str) -> Iterator[list[ObjectInfo]]:
        where = Location.of(folder)
        prefix = where.key if not where.key or where.key.endswith("/") else where.key + "/"
        with _errors_as_os(folder):
            pages = self.client.list_blobs(where.bucket, prefix=prefix, page_size=PAGE_SIZE,
                                           timeout=self.timeout, retry=self.retry).pages
            for page in pages:
                yield [ObjectInfo(uri=where.uri(blob.name), size=blob.size, etag=str(blob.generation),
                                  last_modified=blob.updated) for blob in page if not blob.name.endswith("/")]

    # --- writing --------------------------------------------------------------------------------------
    def put(self, uri: str, data: bytes, if_absent: bool, if_match: str | None) -> str:
        """Write `data`; `if_absent`/`if_match` as `Storage.write_atomic`. Returns the new generation."""
        from google.api_core.exceptions import PreconditionFailed

        blob = self._blob(uri)
        condition = {"if_generation_match": int(if_match)} if if_match is not None else (
            {"if_generation_match": 0} if if_absent else {})
        sent = time.time()
        try:
            with _errors_as_os(uri):
                blob.upload_from_string(data, timeout=self.timeout, retry=self.retry, **condition)
        except PreconditionFailed:
            raise FileExistsError(f"{uri} changed meanwhile") from None
        if blob.updated is not None:
            self._clock_offset = sent - blob.updated.timestamp()
        return str(blob.generation)

    def delete(self, uris: list[str]) -> None:
        raise_first(each_concurrently(self._delete_one, uris))

    def _delete_one(self, uri: str, if_match: str | None = None) -> None:
        from google.api_core.exceptions import NotFound

        condition = {"if_generation_match": int(if_match)} if if_match is not None else {}
        try:
            self._blob(uri).delete(timeout=self.timeout, retry=self.retry, **condition)
        except NotFound:
            pass

    def delete_if_match(self, uri: str, etag: str) -> None:
        self._delete_one(uri, etag)

@contextmanager
def _errors_as_os(uri: str):
    """Google's NotFound and Forbidden as the OSError kinds the rest of the pipeline handles."""
    from google.api_core import exceptions as gexc

    try:
        yield
    except gexc.NotFound:
        raise FileNotFoundError(f"{uri}: not found") from None
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise PermissionError(f"{uri}: access denied ({exc.code})") from None


def arrow_fs(uri: str):
    """pyarrow's own GCS filesystem with the same credentials (or the emulator), for dataset reads."""
    from pyarrow import fs

    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        scheme, _, host = emulator.rpartition("://")
        return fs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=scheme or "http")
    return fs.GcsFileSystem()

def arrow_path(uri: str) -> str:
    where = Location.of(uri)
    return join(where.bucket, where.key) if where.key else where.bucket

def check_bucket(store: GcsStore, field: str, uri: str, prefix: str) -> None:
    """A one-line UserError when the bucket is missing, denied or unreachable, or no credentials exist."""
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud.storage.retry import DEFAULT_RETRY

    bucket = Location.of(uri).bucket
    where = os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage"
    try:
        blobs = store.client.list_blobs(bucket, prefix=prefix, max_results=1, timeout=(3, 10),
                                       retry=DEFAULT_RETRY.with_timeout(15))
        next(iter(blobs), None)
    except DefaultCredentialsError:
        raise UserError(f"{field}: no Google Cloud credentials found for gs://{bucket}; set "
                        "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run `gcloud auth "
                        "application-default login`, or run where Workload Identity applies") from None
    except gexc.NotFound:
        raise UserError(f"{field}: bucket '{bucket}' does not exist at {where}; check the bucket name "
                        "(and STORAGE_EMULATOR_HOST)") from None
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise UserError(f"{field}: access to bucket '{bucket}' denied at {where} ({exc.code}); check the "
                        "credentials' roles on the bucket (storage.objects.list, get, create, delete)") from None
    except gexc.RetryError:  # every try failed to connect, within the probe's deadline
        raise UserError(f"{field}: cannot reach {where} (no answer within 15 s); check the network (and "
                        "STORAGE_EMULATOR_HOST)") from None
    except gexc.GoogleAPIError as exc:
        raise UserError(f"{field}: cannot use bucket '{bucket}' at {where} ({type(exc).__name__}); check "
                        "the URI and the network") from None
    except Exception as exc:  # noqa: BLE001 - requests' connection errors, a malformed emulator host
        raise UserError(f"{field}: cannot reach {where} ({type(exc).__name__}); check the network (and "
                        "STORAGE_EMULATOR_HOST)") from None
