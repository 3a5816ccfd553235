"""An Iceberg output's table in its catalog (which catalogs, and why an S3 output must name one: see
`pipeline/output/iceberg/__init__.py`)."""

from __future__ import annotations

import os
import re

import pyarrow as pa

from pipeline.io.storage import Storage, is_remote, is_s3, join
from pipeline.io.uris import Location, store_of
from pipeline.output.formats import Partitioning
from pipeline.job.errors import UserError

DEFAULT_NAMESPACE = "default"
FSSPEC_IO = "pyiceberg.io.fsspec.FsspecFileIO"
PYARROW_IO = "pyiceberg.io.pyarrow.PyArrowFileIO"
TABLE_PROPERTIES = {
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
    "commit.manifest-merge.enabled": "true",
    "write.parquet.compression-codec": "zstd",
}
RUN_DATE = "run_date"
DEFAULT_CATALOG_NAME = "pipeline"  # a SQL catalog keeps it in each row: readers must open it under the same name
# SQLAlchemy's PostgreSQL drivers: the module each needs, and what installs it.
POSTGRES_DRIVERS = {"psycopg": ("psycopg", "pip install 'pipeline[iceberg-postgres]' (psycopg 3)"),
                    "psycopg2": ("psycopg2", "pip install psycopg2-binary, or use postgresql+psycopg:// with "
                                             "pip install 'pipeline[iceberg-postgres]'"),
                    "pg8000": ("pg8000", "pip install pg8000")}
_SECRET_KEY = re.compile(r"secret|password|token|credential|key-id|access-key", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


class CatalogTable:
    """output.table in output.catalog: opens the catalog once, then loads or creates the table at `uri`."""

    def __init__(self, storage: Storage, uri: str, catalog: dict[str, str] | None, table: str):
        self.storage = storage
        self.uri = uri
        namespace, _, name = (table or "").rpartition(".")
        if not name:
            raise UserError("output.table: name the Iceberg table as namespace.name, e.g. default.predictions")
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.identifier = f"{self.namespace}.{name}"
        self._config = dict(catalog) if catalog else None
        self._catalog = None

    def catalog_properties(self) -> tuple[str, dict[str, str]]:
        """(catalog name, pyiceberg properties): the job's catalog, or the embedded SQLite of a local output."""
        if self._config is None:
            if is_remote(self.uri):
                raise UserError(
                    "output.catalog: an Iceberg output in an object store needs a catalog; set output.catalog, e.g. "
                    "{type: sql, uri: sqlite:////path/catalog.db} for one machine, or PostgreSQL "
                    "({type: sql, uri: postgresql+psycopg://...}) or a REST catalog for teams")
            folder = join(self.uri, "_catalog")
            os.makedirs(folder, exist_ok=True)
            props = {"type": "sql", "uri": f"sqlite:///{folder}/iceberg.db"}
        else:
            props = {k: str(v) for k, v in self._config.items()}
        name = props.pop("name", DEFAULT_CATALOG_NAME)
        if is_s3(self.uri):
            props.setdefault("py-io-impl", FSSPEC_IO)
            if self.storage.endpoint_url:
                props.setdefault("s3.endpoint", self.storage.endpoint_url)
            if self.storage.region:
                props.setdefault("s3.region", self.storage.region)
        elif is_remote(self.uri):
            props.setdefault("py-io-impl", PYARROW_IO)
            for key, value in file_io_properties(self.uri).items():
                props.setdefault(key, value)
        return name, props


    @property
    def catalog(self):
        if self._catalog is None:
            from pyiceberg.catalog import load_catalog

            name, props = self.catalog_properties()
            if "type" not in props and "py-catalog-impl" not in props:
                raise UserError("output.catalog: say which catalog with type (sql, rest, glue, ...), e.g. "
                                "{type: sql, uri: sqlite:////path/catalog.db}")
            check_sql_driver(props)
            try:
                self._catalog = load_catalog(name, **props)
            except UserError:
                raise
            except Exception as exc:  # bad type, unreachable database or service, missing driver
                raise UserError(f"output.catalog: cannot open the Iceberg catalog ({self._redact(exc)}); check "
                                "its type (sql, rest, glue, ...), uri and credentials") from None
        return self._catalog

    @property
    def name(self) -> str:
        """The catalog's name: what pyiceberg, Polars, Spark or Trino must call it to find the table."""
        return str((self._config or {}).get("name", DEFAULT_CATALOG_NAME))

    def _redact(self, exc: BaseException) -> str:
        """An exception as one line, without the catalog's secrets (a database URL's password, tokens)."""
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        for key, value in (self._config or {}).items():
            if _SECRET_KEY.search(str(key)) and value and str(value) in text:
                text = text.replace(str(value), "***")
        return _URL_PASSWORD.sub(r"\1***@", text)[:300]

    def load(self):
        """The table, refreshed from the catalog; None if it does not exist yet."""
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        catalog = self.catalog
        try:
            return catalog.load_table(self.identifier)
        except (NoSuchTableError, NoSuchNamespaceError):
            return None
        except OSError:  # storage failing after retries: the front door's JobFailed, not a user error
            raise
        except Exception as exc:
            raise UserError(f"output.catalog: cannot read table {self.identifier} from the catalog "
                            f"({self._redact(exc)}); check the catalog's uri and credentials") from None

    def create(self, schema: pa.Schema, partitioning: Partitioning):
        """The table, created at `uri` with TABLE_PROPERTIES and `partitioning` (or as another driver just did)."""
        from pyiceberg.exceptions import TableAlreadyExistsError

        if partitioning.run_date and RUN_DATE not in schema.names:
            schema = schema.append(pa.field(RUN_DATE, pa.date32()))
        self.catalog.create_namespace_if_not_exists(self.namespace)
        try:
            tx = self.catalog.create_table_transaction(self.identifier, schema=schema, location=self.uri,
                                                       properties=TABLE_PROPERTIES)
            column = RUN_DATE if partitioning.run_date else partitioning.column
            if column:
                with tx.update_spec() as spec:
                    spec.add_identity(column)
            tx.commit_transaction()
        except TableAlreadyExistsError:  # created meanwhile
            pass
        return self.catalog.load_table(self.identifier)


def iceberg_location(uri: str) -> str:
    """The table's location as pyiceberg spells it: its file IO knows Azure as abfs://, not az://."""
    return "abfs://" + uri.partition("://")[2] if uri.startswith("az://") else uri


def file_io_properties(uri: str) -> dict[str, str]:
    """pyiceberg's pyarrow file IO settings for a gs:// or Azure table: the emulator, or the account
    (`pipeline.io.azure.account_settings`); other credentials come from the cloud's own default chain."""
    if store_of(uri) == "gcs":
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        # pyarrow's GCS client needs a token to skip the metadata server; an emulator takes any.
        return {"gcs.service.host": emulator, "gcs.oauth2.token": "anonymous",
                "gcs.oauth2.token-expires-at": "4102444800000"} if emulator else {}
    from pipeline.io.azure import account_settings

    account = account_settings(Location.of(uri).account)
    props = {"adls.account-name": account.name, **account.credential("adls.account-key", "adls.sas-token")}
    if (endpoint := account.custom_endpoint) is not None:
        props.update({"adls.blob-storage-authority": endpoint.netloc, "adls.blob-storage-scheme": endpoint.scheme,
                      "adls.dfs-storage-authority": endpoint.netloc, "adls.dfs-storage-scheme": endpoint.scheme})
    return props


def check_sql_driver(props: dict[str, str]) -> None:
    """A PostgreSQL catalog whose driver is not installed: one line naming what installs it. (pyiceberg's own
    advice, `pyiceberg[sql-postgres]`, installs psycopg2, which `postgresql+psycopg://` does not use.)"""
    from importlib.util import find_spec

    scheme = props.get("uri", "").partition("://")[0] if props.get("type") == "sql" else ""
    dialect, _, driver = scheme.partition("+")
    if dialect != "postgresql":
        return
    module, install = POSTGRES_DRIVERS.get(driver or "psycopg2", (None, None))
    if module is not None and find_spec(module) is None:
        raise UserError(f"output.catalog: uri {scheme}://… needs the {module} driver, which is not installed: "
                        f"{install}")
