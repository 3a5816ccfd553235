"""Azure Blob Storage through its own library (azure-storage-blob), for az:// and abfs(s):// URIs.

The account: AZURE_STORAGE_CONNECTION_STRING (Azurite's too), else the URI's own (abfs://container@account.dfs.
core.windows.net/key) or AZURE_STORAGE_ACCOUNT_NAME, with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or
DefaultAzureCredential (managed identity, Workload Identity, `az login`). Create-only writes are
`If-None-Match: *`, a replace `If-Match: <ETag>`. Every request has a timeout and a bounded retry count.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Iterator
from urllib.parse import SplitResult, urlsplit

from pipeline.io.cloud import each_concurrently, raise_first
from pipeline.io.uris import Location, ObjectInfo, join
from pipeline.job.errors import UserError

PAGE_SIZE = 1000
CONNECTION_STRING = "AZURE_STORAGE_CONNECTION_STRING"


class AzureStore:
    """az:// and abfs:// blobs, made in each process from `StoreClients`' settings."""
    name = "Azure Blob Storage"

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, max_attempts: int):
        self.options = {"connection_timeout": connect_timeout_s, "read_timeout": read_timeout_s,
                        "retry_policy": retry_policy(max_attempts)}
        self._services: dict[str | None, object] = {}

    def service(self, account: str | None):
        """The account's BlobServiceClient (one per account, made on first use)."""
        if account not in self._services:
            self._services[account] = _service_client(account, self.options)
        return self._services[account]

    def ready(self, uri: str) -> None:
        self.service(Location.of(uri).account)

    def _container(self, uri: str):
        where = Location.of(uri)
        return self.service(where.account).get_container_client(where.bucket), where

    def _blob(self, uri: str):
        container, where = self._container(uri)
        return container.get_blob_client(where.key)

    # --- reading --------------------------------------------------------------------------------------
    def read(self, uri: str) -> bytes:
        with _errors_as_os(uri):
            return self._blob(uri).download_blob(max_concurrency=1).readall()

    def read_many(self, uris: list[str]) -> list[bytes | Exception]:
        return each_concurrently(self.read, uris)

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        found = self.read_with_age(uri)
        return found[:2] if found is not None else None

    def read_with_age(self, uri: str) -> tuple[bytes, str, float] | None:
        """(bytes, ETag, seconds since it was written by the server's clock: the reply's Date), or None."""
        served: list[str] = []
        try:
            with _errors_as_os(uri):
                download = self._blob(uri).download_blob(
                    max_concurrency=1, raw_response_hook=lambda r: served.append(r.http_response.headers.get("date")))
                data = download.readall()
        except FileNotFoundError:
            return None
        written = download.properties.last_modified.timestamp()
        now = parsedate_to_datetime(served[0]).timestamp() if served and served[0] else written
        return data, download.properties.etag, now - written

    def stat(self, uri: str) -> tuple[str, int] | None:
        try:
            with _errors_as_os(uri):
                props = self._blob(uri).get_blob_properties()
        except FileNotFoundError:
            return None
        return props.etag, props.size

    def exists(self, uri: str) -> bool:
        """An object, or a folder: anything under `uri/` (as s3fs answers for S3)."""
        return self.stat(uri) is not None or bool(next(iter(self.list_pages(uri)), []))

    def list_pages(self, folder: str) -> Iterator[list[ObjectInfo]]:
        container, where = self._container(folder)
        prefix = where.key if not where.key or where.key.endswith("/") else where.key + "/"
        with _errors_as_os(folder):
            for page in container.list_blobs(name_starts_with=prefix or None, results_per_page=PAGE_SIZE).by_page():
                yield [ObjectInfo(uri=where.uri(blob.name), size=blob.size, etag=(blob.etag or "").strip('"') or None,
                                  last_modified=blob.last_modified) for blob in page if not blob.name.endswith("/")]

    # --- writing --------------------------------------------------------------------------------------
    def put(self, uri: str, data: bytes, if_absent: bool, if_match: str | None) -> str:
        """Write `data`; `if_absent`/`if_match` as `Storage.write_atomic`. Returns the new ETag.
        A create-only write of an existing blob answers 409 BlobAlreadyExists (not S3's 412)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

        condition = ({"etag": if_match, "match_condition": MatchConditions.IfNotModified} if if_match is not None
                     else {})
        try:
            with _errors_as_os(uri, keep=(ResourceExistsError, ResourceModifiedError, ResourceNotFoundError)):
                reply = self._blob(uri).upload_blob(data, overwrite=not (if_absent and if_match is None), **condition)
        except (ResourceExistsError, ResourceModifiedError):
            raise FileExistsError(f"{uri} changed meanwhile") from None
        except ResourceNotFoundError as exc:
            if if_match is not None and getattr(exc, "error_code", "") not in ("ContainerNotFound",):
                raise FileExistsError(f"{uri} changed meanwhile") from None
            raise FileNotFoundError(f"{uri}: container not found") from None
        return reply["etag"]

    def delete(self, uris: list[str]) -> None:
        raise_first(each_concurrently(self._delete_one, uris))

    def _delete_one(self, uri: str, if_match: str | None = None) -> None:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceNotFoundError

        condition = ({"etag": if_match, "match_condition": MatchConditions.IfNotModified} if if_match is not None
                     else {})
        try:
            with _errors_as_os(uri, keep=(ResourceNotFoundError,)):
                self._blob(uri).delete_blob(**condition)
        except ResourceNotFoundError:
            pass

    def delete_if_match(self, uri: str, etag: str) -> None:
        self._delete_one(uri, etag)

def retry_policy(attempts: int):
    """The SDK's retries (timeouts, resets, 408, 429, 5xx) about a second apart, `attempts` in all: its default
    waits 15 s, then 18, 24, ... between tries, minutes for a few failures in a row."""
    from azure.storage.blob import LinearRetry

    return LinearRetry(backoff=1.0, random_jitter_range=1, retry_total=attempts)


def _service_client(account: str | None, options: dict):
    from azure.storage.blob import BlobServiceClient

    settings = account_settings(account)
    if settings.connection_string:
        return BlobServiceClient.from_connection_string(settings.connection_string, **options)
    if not settings.name:
        raise PermissionError("no Azure storage account: set AZURE_STORAGE_CONNECTION_STRING or "
                              "AZURE_STORAGE_ACCOUNT_NAME")
    credential = settings.key or settings.sas or None
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return BlobServiceClient(settings.blob_endpoint, credential=credential, **options)


@dataclass(frozen=True)
class AzureAccount:
    """A storage account as this process reaches it: name, key or SAS token (neither: DefaultAzureCredential),
    blob endpoint, and the connection string when that is what names it."""
    name: str
    key: str = ""
    sas: str = ""
    blob_endpoint: str = ""
    connection_string: str = ""

    @property
    def custom_endpoint(self) -> SplitResult | None:
        """The blob endpoint when it is not Azure's public one (Azurite, a private endpoint), else None."""
        endpoint = urlsplit(self.blob_endpoint)
        return endpoint if endpoint.netloc and not endpoint.netloc.endswith(".blob.core.windows.net") else None

    def credential(self, key_option: str, sas_option: str) -> dict[str, str]:
        """The key or SAS token under a library's own option names; none for DefaultAzureCredential."""
        return {key_option: self.key} if self.key else {sas_option: self.sas} if self.sas else {}


def account_settings(account: str | None) -> AzureAccount:
    """`account` (from an abfs:// URI), or the one the environment names: AZURE_STORAGE_CONNECTION_STRING first."""
    text = os.environ.get(CONNECTION_STRING)
    if text:
        parts = dict(p.split("=", 1) for p in text.split(";") if "=" in p)
        if account is None or parts.get("AccountName") == account:
            name = parts.get("AccountName", "")
            protocol = parts.get("DefaultEndpointsProtocol", "https")
            suffix = parts.get("EndpointSuffix", "core.windows.net")
            return AzureAccount(name, parts.get("AccountKey", ""), parts.get("SharedAccessSignature", ""),
                                parts.get("BlobEndpoint") or f"{protocol}://{name}.blob.{suffix}", text)
    name = account or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or os.environ.get("AZURE_STORAGE_ACCOUNT") or ""
    return AzureAccount(name, os.environ.get("AZURE_STORAGE_ACCOUNT_KEY", ""),
                        os.environ.get("AZURE_STORAGE_SAS_TOKEN", ""),
                        os.environ.get("AZURE_STORAGE_BLOB_ENDPOINT") or f"https://{name}.blob.core.windows.net")


@contextmanager
def _errors_as_os(uri: str, keep: tuple = ()):
    """Azure's not-found and refusals as the OSError kinds the rest of the pipeline handles; `keep`: let
    those through for the caller to tell apart."""
    from azure.core import exceptions as aexc

    try:
        yield
    except keep:
        raise
    except aexc.ResourceNotFoundError:
        raise FileNotFoundError(f"{uri}: not found") from None
    except aexc.ClientAuthenticationError as exc:
        raise PermissionError(f"{uri}: access denied ({exc.status_code})") from None
    except aexc.HttpResponseError as exc:
        if exc.status_code == 403:
            raise PermissionError(f"{uri}: access denied (403)") from None
        raise


def arrow_fs(uri: str):
    """pyarrow's own Azure filesystem with the same account and credentials, for dataset reads."""
    from pyarrow import fs

    account = account_settings(Location.of(uri).account)
    options = {"account_name": account.name, **account.credential("account_key", "sas_token")}
    if (endpoint := account.custom_endpoint) is not None:
        options.update(blob_storage_authority=endpoint.netloc, blob_storage_scheme=endpoint.scheme,
                       dfs_storage_authority=endpoint.netloc, dfs_storage_scheme=endpoint.scheme)
    return fs.AzureFileSystem(**options)


def arrow_path(uri: str) -> str:
    where = Location.of(uri)
    return join(where.bucket, where.key) if where.key else where.bucket

def check_bucket(store: AzureStore, field: str, uri: str, prefix: str) -> None:
    """A one-line UserError when the container is missing, denied or unreachable, or no account is named."""
    from azure.core import exceptions as aexc

    where = Location.of(uri)
    account = account_settings(where.account)
    if not account.name:
        raise UserError(f"{field}: no Azure storage account for {uri}; set {CONNECTION_STRING}, or "
                        "AZURE_STORAGE_ACCOUNT_NAME (with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or "
                        "a managed identity), or write abfs://container@account.dfs.core.windows.net/path")
    at = account.blob_endpoint or f"account '{account.name}'"
    try:
        service = _service_client(where.account, {"connection_timeout": 3, "read_timeout": 10, "retry_total": 2})
        blobs = service.get_container_client(where.bucket).list_blobs(name_starts_with=prefix or None,
                                                                     results_per_page=1)
        next(iter(blobs.by_page()), None)
    except aexc.ResourceNotFoundError:
        raise UserError(f"{field}: container '{where.bucket}' does not exist in {at}; check the container "
                        f"name (and {CONNECTION_STRING} / AZURE_STORAGE_ACCOUNT_NAME)") from None
    except aexc.HttpResponseError as exc:
        if exc.status_code not in (401, 403) and not isinstance(exc, aexc.ClientAuthenticationError):
            raise UserError(f"{field}: cannot use container '{where.bucket}' in {at} ({exc.status_code} "
                            f"{getattr(exc, 'error_code', '') or ''}); check the URI and the credentials") from None
        raise UserError(f"{field}: access to container '{where.bucket}' denied in {at} "
                        f"({getattr(exc, 'error_code', None) or exc.status_code}); check the account key, SAS "
                        "token or the identity's role (Storage Blob Data Contributor)") from None
    except Exception as exc:  # noqa: BLE001 - connection refused, unknown host, missing credential chain
        raise UserError(f"{field}: cannot reach {at} ({type(exc).__name__}); check the network and "
                        f"{CONNECTION_STRING} / AZURE_STORAGE_ACCOUNT_NAME") from None
