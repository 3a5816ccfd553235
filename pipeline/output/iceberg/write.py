"""An Iceberg run's data files: written before its commit, named so that no attempt overwrites another's, and
deleted when the commit does not happen (why own write tasks, not `Transaction.append`: see
`pipeline/output/iceberg/__init__.py`)."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Iterator

import pyarrow as pa
from pyiceberg.table import WriteTask

from pipeline.output.formats import Commit
from pipeline.output.iceberg.catalog import RUN_DATE

logger = logging.getLogger(__name__)

# part-<run_id>-<attempt>-<seq>.parquet: the names DataFileWriter gives.
FILE_RE = re.compile(r"(?:^|/)part-(?P<run_id>\d{8}T\d{6}Z-[0-9a-f]{8})-[0-9a-f]{8}-\d+\.parquet$")


@dataclass
class _Buffer:
    key: object  # pyiceberg PartitionKey, or None for an unpartitioned table
    tables: list[pa.Table]
    rows: int = 0


class DataFileWriter:
    """Writes one attempt's rows as data files that nothing references yet, streaming: at most rows_per_file rows
    are buffered per partition, and each file is written by pyiceberg's own Parquet writer (field ids,
    statistics, the exact partition key)."""

    def __init__(self, table, commit: Commit, attempt: str):
        self.table = table
        self.commit = commit
        self.attempt = attempt
        self.schema = table.schema()
        self.spec = table.spec()
        self.metadata = table.metadata
        self.run_date = date.fromisoformat(commit.partitioning.run_date) if commit.partitioning.run_date else None
        self._seq = 0

    def files(self) -> Iterator:
        """The run's data files (pyiceberg DataFiles), each yielded once written."""
        limit = self.commit.rows_per_file
        buffers: dict[object, _Buffer] = {}
        for batch in self.commit.rows():
            batch = self._conform(batch)
            if not batch.num_rows:
                continue
            for key, rows in self._partitions(batch):
                buffer = buffers.setdefault(_key_id(key), _Buffer(key, []))
                buffer.tables.append(rows)
                buffer.rows += rows.num_rows
                while buffer.rows >= limit:
                    combined = pa.concat_tables(buffer.tables)
                    yield from self._write(buffer.key, combined.slice(0, limit))
                    rest = combined.slice(limit)
                    buffer.tables, buffer.rows = ([rest] if rest.num_rows else []), rest.num_rows
        for buffer in buffers.values():
            if buffer.rows:
                yield from self._write(buffer.key, pa.concat_tables(buffer.tables))

    def _conform(self, rows: pa.Table) -> pa.Table:
        names = self.schema.column_names
        if RUN_DATE in names and RUN_DATE not in rows.column_names:
            rows = rows.append_column(pa.field(RUN_DATE, pa.date32()),
                                      pa.array([self.run_date] * rows.num_rows, pa.date32()))
        return rows.select([n for n in names if n in rows.column_names])

    def _partitions(self, batch: pa.Table) -> list[tuple[object, pa.Table]]:
        from pyiceberg.io.pyarrow import _determine_partitions

        if self.spec.is_unpartitioned():
            return [(None, batch)]
        return [(p.partition_key, p.arrow_table_partition)
                for p in _determine_partitions(spec=self.spec, schema=self.schema, arrow_table=batch)]

    def _write(self, key, rows: pa.Table) -> Iterator:
        from pyiceberg.io.pyarrow import pyarrow_to_schema, write_file

        task = _RunWriteTask(write_uuid=uuid.uuid4(), task_id=self._seq, record_batches=rows.to_batches(),
                             schema=pyarrow_to_schema(rows.schema, name_mapping=self.schema.name_mapping,
                                                      format_version=self.metadata.format_version),
                             partition_key=key, file_name=f"part-{self.commit.run_id}-{self.attempt}-{self._seq:05d}")
        self._seq += 1
        yield from write_file(self.table.io, self.metadata, iter([task]))


def discard(table, data_files: list) -> None:
    """Best effort: data files this attempt wrote and no snapshot references."""
    for data_file in data_files:
        try:
            table.io.delete(data_file.file_path)
        except Exception as exc:  # an orphan is harmless: remove_orphan_files or `recover` finds it
            logger.warning("could not delete uncommitted data file %s (%s)", data_file.file_path,
                           type(exc).__name__)


def _key_id(key) -> object:
    return None if key is None else tuple(key.partition)


@dataclass(frozen=True)
class _RunWriteTask(WriteTask):
    """pyiceberg's write task, with the pipeline's file name (run id, attempt, sequence)."""
    file_name: str = ""

    def generate_data_file_filename(self, extension: str) -> str:
        return f"{self.file_name}.{extension}"
