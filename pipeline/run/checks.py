"""Checks that need the outside world, run on the driver: buckets, paths and credentials before Ray starts,
then the model and checkpoint while it starts. Each failure is one UserError line naming the field and the fix.
"""

from __future__ import annotations

import importlib
import os
import uuid
from typing import TYPE_CHECKING

from pipeline.io.inventory import InventoryError, check_inventory, find_manifest, is_inventory
from pipeline.io.manifest import BadManifest, check_first_batch, is_manifest, manifest_columns
from pipeline.io.storage import Storage, is_remote, is_s3, join, split_s3
from pipeline.io.uris import Location, store_of
from pipeline.job.config import JobConfig
from pipeline.job.errors import UserError


if TYPE_CHECKING:
    from pipeline.models.spec import ModelSpec


def check_storage(cfg: JobConfig, storage: Storage) -> None:
    """Input, output and mapping locations: quick, so a wrong bucket is refused before anything starts."""
    check_input(cfg.input.uri, storage, quote=not cfg.privacy.pseudonymize, prefix=cfg.input.prefix)
    if cfg.output.uri.rstrip("/") == cfg.input.uri.rstrip("/"):
        raise UserError(f"output.uri: {cfg.output.uri} is the input folder itself; write the predictions to "
                        "another folder (a subfolder of the input is fine: it is never listed as input)")
    check_output(cfg.output.uri, storage)
    if cfg.privacy.mapping_uri:
        check_mapping(cfg.privacy.mapping_uri, cfg.output.uri, storage)


def check_model(cfg: JobConfig, storage: Storage) -> ModelSpec:
    """The model built once on the CPU: architecture, weights, labels. Imports torch (seconds), so the run does
    it while the engine starts."""
    from pipeline.models.resolve import resolve_model

    return resolve_model(cfg.model, storage)


def check_input(uri: str, storage: Storage, quote: bool = True, prefix: str | None = None) -> None:
    """`quote=False` (a pseudonymised job): no message quotes a manifest's value. `prefix`: input.prefix, which
    only an S3 Inventory takes."""
    if is_remote(uri):
        check_bucket("input.uri", uri, storage)
    if is_inventory(uri) or not is_manifest(uri):
        try:
            inventory = find_manifest(uri, storage)
            if inventory is not None:
                check_inventory(inventory, storage)
                return
        except InventoryError as exc:
            raise UserError(f"input.uri: {exc}") from None
    if prefix is not None:
        raise UserError(f"input.prefix: {prefix!r} applies to an S3 Inventory, and {uri} is none (no manifest.json, "
                        "no hive/ folder); for a folder, put the prefix in input.uri")
    if is_manifest(uri):
        check_manifest(uri, storage, quote)
    elif not is_remote(uri) and not os.path.isdir(uri):
        what = "is a file, not a folder" if os.path.exists(uri) else "does not exist"
        raise UserError(f"input.uri: {uri} {what}; give a folder of images, s3://, gs:// or az:// "
                        "prefix, or a .parquet/.csv manifest")


def check_manifest(uri: str, storage: Storage, quote: bool = True) -> None:
    """The manifest exists, has a 'uri' column, and its first batch of rows can be read."""
    if not storage.exists(uri):
        raise UserError(f"input.uri: manifest {uri} does not exist; check the path")
    try:
        columns = manifest_columns(uri, storage)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a manifest we can read"
        raise UserError(f"input.uri: cannot read manifest {uri} ({type(exc).__name__}); give a Parquet or "
                        "CSV file with a 'uri' column") from None
    if "uri" not in columns:
        raise UserError(f"input.uri: manifest {uri} has no 'uri' column (it has: {', '.join(columns)}); "
                        "name the column of image URIs 'uri'")
    try:
        check_first_batch(uri, storage, quote)
    except BadManifest as exc:
        raise UserError(f"input.uri: manifest {uri}, {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a CSV that is not UTF-8 text
        raise UserError(f"input.uri: cannot read the rows of manifest {uri} ({type(exc).__name__}); give a "
                        "Parquet file, or a CSV file in UTF-8") from None


def check_output(uri: str, storage: Storage) -> None:
    if is_remote(uri):
        check_bucket("output.uri", uri, storage)
    elif os.path.exists(uri) and not os.path.isdir(uri):
        raise UserError(f"output.uri: {uri} is a file; give a folder for the Parquet files")
    check_writable(uri, storage)


def check_mapping(uri: str, output_uri: str, storage: Storage) -> None:
    """The token -> uri mapping re-identifies every row: never beside the predictions."""
    inside = (uri.rstrip("/") + "/").startswith(output_uri.rstrip("/") + "/")
    if inside:
        raise UserError(f"privacy.mapping_uri: {uri} is inside output.uri, beside the pseudonymised predictions; "
                        "keep the mapping apart, where only those who may re-identify can read it")
    if is_remote(uri):
        check_bucket("privacy.mapping_uri", uri, storage)
    check_writable(uri, storage, "privacy.mapping_uri")


def check_writable(uri: str, storage: Storage, field: str = "output.uri") -> None:
    """Write and delete a hidden probe, so a read-only folder or bucket fails now, not at the first flush."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete([probe])
    except Exception as exc:  # noqa: BLE001 - PermissionError, ClientError, NotADirectoryError, ...
        raise UserError(f"{field}: cannot write to {uri} ({type(exc).__name__}: {exc}); check the folder's "
                        "permissions or the credentials' write access") from None


def check_bucket(field: str, uri: str, storage: Storage) -> None:
    """The bucket (container) exists and the credentials may list the job's prefix in it, or one line why not."""
    kind = store_of(uri)
    if kind in ("gcs", "azure"):
        module = importlib.import_module(f"pipeline.io.{kind}")
        return module.check_bucket(storage.cloud(uri), field, uri, probe_prefix(uri, Location.of(uri).key))
    check_s3_bucket(field, uri, storage)


def check_s3_bucket(field: str, uri: str, storage: Storage) -> None:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, key = split_s3(uri)
    where = storage.endpoint_url or "AWS S3"
    try:
        # A listing of the job's own prefix, not HeadBucket: HeadBucket needs s3:ListBucket on the whole bucket,
        # which a policy scoped to the job's prefixes (infra/README.md) does not grant.
        storage.s3_probe_client.list_objects_v2(Bucket=bucket, Prefix=probe_prefix(uri, key), MaxKeys=1)
    except NoCredentialsError:
        raise UserError(f"{field}: no AWS credentials found for s3://{bucket}; set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise UserError(f"{field}: bucket '{bucket}' does not exist at {where}; check the bucket name "
                            "(and storage.endpoint_url / AWS_ENDPOINT_URL)") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise UserError(f"{field}: access to bucket '{bucket}' denied at {where} ({code}); check the AWS "
                            "credentials and the bucket policy") from None
        raise UserError(f"{field}: cannot use bucket '{bucket}' at {where} ({code}); check the URI") from None
    except BotoCoreError as exc:
        raise UserError(f"{field}: cannot reach {where} ({type(exc).__name__}); check storage.endpoint_url / "
                        "AWS_ENDPOINT_URL and the network") from None
    except ValueError as exc:  # boto3 refuses a malformed endpoint when it builds the client
        raise UserError(f"{field}: endpoint {where!r} is not usable ({exc}); fix storage.endpoint_url / "
                        "AWS_ENDPOINT_URL") from None


def probe_prefix(uri: str, key: str) -> str:
    """The prefix the job lists under: a manifest's own key, or a folder's key with its trailing slash."""
    if is_manifest(uri) or not key:
        return key
    return key.rstrip("/") + "/"
