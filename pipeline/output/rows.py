"""A table's live rows read the way its readers read them, for the report, `pipeline runs` and the skip set: here the
folder's (`FolderRows`, pyarrow's hive partitioning); Delta's and Iceberg's in `output/delta/rows.py` and
`output/iceberg/rows.py`. A `TableRows` is a small picklable description (where, which runs), opened where it is
read: the listing task builds the skip set on whichever node runs it. Reads stream record batches of the asked
columns only, so memory stays bounded by a few batches whatever the table's size.
Why each format reads through its own reader: docs/commit-protocol.md#a-run-step-by-step (step 5)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.io.storage import Storage

logger = logging.getLogger(__name__)

BATCH_ROWS = 32_768


class TableRows(ABC):
    """The live rows of an output (of some runs only), as its format's readers see them."""

    @abstractmethod
    def batches(self, storage: Storage, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The rows, `columns` only (those the table has), a record batch at a time, in plain Arrow types."""


@dataclass(frozen=True)
class FolderRows(TableRows):
    """A Parquet folder's committed files (those the commit records list), read as a pyarrow dataset with hive
    partitioning: a partition column lives only in its folder names (`label=dog/`), escaped as `hive` writes."""
    root: str  # the output folder
    files: tuple[str, ...]  # absolute URIs

    def batches(self, storage: Storage, columns: list[str]) -> Iterator[pa.RecordBatch]:
        if not self.files:
            return
        fs, base = storage.fs(self.root)
        paths = [storage.fs(uri)[1] for uri in self.files]
        keys = partition_keys(path.removeprefix(base.rstrip("/") + "/") for path in paths)
        # Every partition value is a string: inferring types would read `label=007` back as the number 7.
        partitioning = ds.partitioning(pa.schema([(key, pa.string()) for key in keys]), flavor="hive")
        for path in paths:  # one file at a time: parts of older versions may lack a column
            try:
                dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning=partitioning,
                                     partition_base_dir=base)
            except FileNotFoundError:
                logger.warning("%s is listed in a commit record but gone; its rows count as not there", path)
                continue
            wanted = [c for c in dict.fromkeys(columns) if c in dataset.schema.names]
            for batch in dataset.to_batches(columns=wanted, batch_size=BATCH_ROWS):
                if batch.num_rows:
                    yield plain(batch)


def partition_keys(relative_paths: Iterable[str]) -> list[str]:
    """The hive partition columns named by the folders of these paths (`label=dog/part-1.parquet`: label)."""
    keys: dict[str, None] = {}
    for path in relative_paths:
        for folder in path.split("/")[:-1]:
            if "=" in folder:
                keys[folder.split("=", 1)[0]] = None
    return list(keys)


def plain(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` in the types the pipeline writes: readers hand out view and large types (delta-rs's DataFusion,
    pyiceberg) and timestamps in other units, and the skip set's keys must match the listing's (µs)."""
    schema = pa.schema([field.with_type(_plain_type(field.type)) for field in batch.schema])
    return batch if schema.equals(batch.schema) else batch.cast(schema)


def _plain_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_string_view(t) or pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_plain_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_dictionary(t):
        return _plain_type(t.value_type)
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz=t.tz)
    return t
