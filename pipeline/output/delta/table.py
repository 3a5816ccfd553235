"""Where a Delta output's table lives and how delta-rs reaches it, and the Arrow schema its rows are written in
(the format itself: `pipeline/output/delta/__init__.py`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa

from pipeline.io.storage import Storage, is_s3
from pipeline.io.uris import Location, store_of
from pipeline.output.formats import Partitioning

RUN_DATE = "run_date"
APP_ID_PREFIX = "pipeline-run-"
# Set on the tables the pipeline creates (never on an existing one): a checkpoint every 10 commits, so a commit
# replays at most 10 JSON entries (delta-rs's default, 100, made a nightly commit's time a 100-night sawtooth).
TABLE_CONFIGURATION = {"delta.checkpointInterval": "10"}


def app_id(run_id: str) -> str:
    return f"{APP_ID_PREFIX}{run_id}"


def storage_options(storage: Storage, uri: str) -> dict[str, str] | None:
    """delta-rs's options for `uri`: None for a local path. Credentials come from the environment only if set
    there (else delta-rs's own chain: profile, web identity, instance role); callers never log these."""
    if store_of(uri) == "azure":
        return azure_options(uri)
    if not is_s3(uri):
        return None
    options = {"conditional_put": "etag"}  # see pipeline/output/delta/__init__.py's docstring: safe commits without DynamoDB
    if storage.endpoint_url:
        options["AWS_ENDPOINT_URL"] = storage.endpoint_url
        if storage.endpoint_url.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if storage.region:
        options["AWS_REGION"] = storage.region
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(name):
            options[name] = os.environ[name]
    return options


def azure_options(uri: str) -> dict[str, str]:
    """The account as `pipeline.io.azure` finds it (connection string, URI, environment); with neither key nor SAS
    token, delta-rs's own chain (managed identity, Workload Identity, Azure CLI). Azure refuses a create-only write
    of an existing blob by itself, so concurrent commits are safe without a lock service."""
    from pipeline.io.azure import account_settings

    account = account_settings(Location.of(uri).account)
    options = {"azure_storage_account_name": account.name,
               **account.credential("azure_storage_account_key", "azure_storage_sas_key")}
    if (endpoint := account.custom_endpoint) is not None:
        options["azure_storage_endpoint"] = account.blob_endpoint.rstrip("/")
        if endpoint.scheme == "http":
            options["allow_http"] = "true"
    return options


@dataclass(frozen=True)
class DeltaLocation:
    """The table at `uri` (absolute, or a store's URI without a trailing slash): opens it with delta-rs."""
    storage: Storage
    uri: str

    @property
    def options(self) -> dict[str, str] | None:
        return storage_options(self.storage, self.uri)

    def table(self, version: int | None = None):
        """The DeltaTable at `uri` (its latest version, or `version`), or None when there is none yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.uri, version=version, storage_options=self.options)
        except TableNotFoundError:
            return None


def partition_by(partitioning: Partitioning) -> list[str]:
    if partitioning.run_date:
        return [RUN_DATE]
    return [partitioning.column] if partitioning.column else []


def delta_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` in the Arrow types that Delta's types read back as: the Parquet files keep their Arrow schema, and
    a reader (Polars) that finds a fixed-size list there where the log says list refuses the file."""
    return pa.schema([field.with_type(_delta_type(field.type)) for field in schema], metadata=schema.metadata)


def _delta_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_delta_type(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_delta_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_delta_type(t.key_type)), t.item_field.with_type(_delta_type(t.item_type)))
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC" if t.tz else None)  # Delta: timestamp (UTC) or timestamp_ntz, in µs
    return t


def with_run_date_field(schema: pa.Schema) -> pa.Schema:
    field = pa.field(RUN_DATE, pa.date32())
    if RUN_DATE in schema.names:
        return schema.set(schema.get_field_index(RUN_DATE), field)
    return schema.append(field)
