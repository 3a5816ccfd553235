"""Hive-style partition folders (`modality=CT/`), named the way Spark names them (ExternalCatalogUtils.escapePathName:
only ASCII control characters and `"#%'*/:=?\\{[]^` become `%XX`), so that Spark, Athena, DuckDB and pyarrow all
read the same value back; a null value goes to `__HIVE_DEFAULT_PARTITION__`.
Why: docs/design-notes.md#pipelineoutputhivepy"""

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
