"""Before a Delta output is written: whether the table there can take this job's rows."""

from __future__ import annotations

import os

import pyarrow as pa

from pipeline.io.storage import is_remote
from pipeline.job.rows import ADDED_COLUMNS
from pipeline.output.delta.table import RUN_DATE, DeltaLocation, delta_schema, partition_by, with_run_date_field
from pipeline.output.formats import Partitioning
from pipeline.job.errors import UserError


class DeltaChecks:
    """Refuses, with a UserError naming the fix, an output.uri an append could not go into: Parquet files that
    are no Delta table, or a table partitioned otherwise or of another schema than the job's (when given)."""

    def __init__(self, location: DeltaLocation, schema: pa.Schema | None, partitioning: Partitioning | None):
        self.location = location
        self.schema = schema
        self.partitioning = partitioning

    def check_existing(self, overwrite: bool) -> None:
        uri = self.location.uri
        table = self.location.table()
        if table is None:
            if self._holds_parquet():
                raise UserError(f"output.uri: {uri} holds Parquet files but no Delta table (no _delta_log); "
                                "choose another output.uri or output.format: parquet")
            return
        if overwrite:
            return  # one atomic commit replaces rows, schema and partitioning
        if self.partitioning is not None:
            check_partitioning(table, uri, self.partitioning)
        if self.schema is not None:
            problem = self._schema_problem(table)
            if problem:
                raise UserError(f"output.uri: the Delta table at {uri} cannot take this job's rows ({problem}); "
                                "pass --overwrite (output.overwrite: true) to replace it, or choose another output.uri")

    def _holds_parquet(self) -> bool:
        """Whether any Parquet file is under uri (hidden and `_` folders, such as our staging, aside)."""
        uri = self.location.uri
        if not is_remote(uri) and not os.path.isdir(uri):
            return False
        prefix = uri.rstrip("/") + "/"
        for page in self.location.storage.list_pages(uri):
            for obj in page:
                parts = obj.uri.removeprefix(prefix).split("/")
                if obj.uri.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts):
                    return True
        return False

    def _schema_problem(self, table) -> str | None:
        from deltalake import Schema

        expected = delta_schema(self.schema)
        partitioning = self.partitioning
        have = {f.name: f.type for f in table.schema().fields}
        if (partitioning is None and RUN_DATE in have and RUN_DATE not in expected.names) or (
                partitioning is not None and partitioning.run_date):
            expected = with_run_date_field(expected)
        want = {f.name: f.type for f in Schema.from_arrow(expected).fields}
        missing = [n for n in want if n not in have and n not in ADDED_COLUMNS]  # those the append adds
        extra = [n for n in have if n not in want]
        differ = [n for n in want if n in have and want[n] != have[n]]
        parts = []
        if missing:
            parts.append(f"it lacks column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"it has column(s) {', '.join(extra)} the job does not write")
        if differ:
            parts.append("column(s) " + ", ".join(f"{n} (the table has {_type_name(have[n])}, the job writes "
                                                  f"{_type_name(want[n])})" for n in differ)
                         + " differ in type")
        return "; ".join(parts) or None


def check_partitioning(table, uri: str, partitioning: Partitioning) -> None:
    """Refuse to append to a table at `uri` partitioned otherwise than `partitioning`."""
    want, have = partition_by(partitioning), list(table.metadata().partition_columns)
    if want != have:
        raise UserError(f"output.uri: the Delta table at {uri} is partitioned by {have or 'nothing'}, "
                        f"this job by {want or 'nothing'}; set output.partitioning to match, use "
                        "--overwrite (output.overwrite: true) to replace the table, or choose another output.uri")


def _type_name(t) -> str:
    """A Delta type as its log writes it: float, array<string>, struct<...>."""
    if type(t).__name__ == "PrimitiveType":
        return t.type
    if type(t).__name__ == "ArrayType":
        return f"array<{_type_name(t.element_type)}>"
    return t.type if isinstance(t.type, str) else str(t)
