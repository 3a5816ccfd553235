"""Hive-style partition folders (`modality=CT/`), named the way Spark names them, so that Spark, Athena,
DuckDB and pyarrow all read the same value back.

Spark escapes only ASCII control characters and `"#%'*/:=?\\{[]^` (ExternalCatalogUtils.escapePathName)
and leaves every other character, non-ASCII included, as it is; reading, it turns each `%XX` back into one
character. Percent-encoding a value's UTF-8 bytes (`%C3%BC` for `ü`) would therefore come back from Spark as
two characters (`Ã¼`), while DuckDB and pyarrow decode it as UTF-8; Spark's own escaping reads the same
everywhere.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # Hive's, Spark's and Athena's folder name for a null value
_ESCAPED = {*map(chr, range(0x01, 0x20)), '"', "#", "%", "'", "*", "/", ":", "=", "?", "\\", "\x7f", "{", "[",
            "]", "^"}


def escape(value: str) -> str:
    return "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in value)


def folder_name(column: str, value: str | None) -> str:
    return f"{column}={HIVE_NULL if value in (None, '') else escape(value)}"


def split_by_partition(table: pa.Table, folder: str | None, column: str | None) -> Iterator[tuple[str | None, pa.Table]]:
    """(partition folder, rows) pairs: the fixed folder (or none), or one per value of `column`, sorted; the
    column itself lives in the folder name only (Spark refuses a column that is in both)."""
    if column is None:
        yield folder, table
        return
    values = table[column].to_pylist()
    rest = table.drop_columns([column])
    for value in sorted(set(values), key=lambda v: (v is None, v or "")):
        rows = np.flatnonzero([v == value for v in values])
        yield folder_name(column, value), rest.take(rows)
