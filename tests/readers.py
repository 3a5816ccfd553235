"""The readers users point at an output, for tests: DuckDB with the extensions its PyPI packages ship
(it cannot download them here), over local paths and the local S3 server."""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
from urllib.parse import urlsplit

import duckdb

from pipeline.io.storage import Storage


def extension_file(name: str) -> str:
    """The extension binary inside its `duckdb-extension-<name>` package, for this DuckDB release."""
    package = importlib.util.find_spec(f"duckdb_extension_{name}")
    folder = os.path.dirname(package.origin)
    return glob.glob(os.path.join(folder, "extensions", f"v{duckdb.__version__}", f"{name}.duckdb_extension"))[0]


def duckdb_connection(storage: Storage | None = None, *extensions: str) -> duckdb.DuckDBPyConnection:
    """A connection with `extensions` loaded (iceberg needs avro first) and, given the S3 storage, a secret for
    it; one per kind, shared (loading httpfs costs a good part of a second)."""
    return _connection(storage.endpoint_url if storage else None, storage.region if storage else None,
                       tuple(extensions)).cursor()


@functools.lru_cache(maxsize=None)
def _connection(endpoint_url: str | None, region: str | None, extensions: tuple[str, ...]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for name in (["avro"] if "iceberg" in extensions else []) + list(extensions) + (["httpfs"] if region else []):
        con.execute(f"LOAD '{extension_file(name)}'")
    if endpoint_url:
        endpoint = urlsplit(endpoint_url)
        con.execute(f"""CREATE SECRET (TYPE s3, KEY_ID '{os.environ["AWS_ACCESS_KEY_ID"]}',
                        SECRET '{os.environ["AWS_SECRET_ACCESS_KEY"]}', ENDPOINT '{endpoint.netloc}',
                        URL_STYLE 'path', USE_SSL {str(endpoint.scheme == 'https').lower()},
                        REGION '{region}')""")
    return con
