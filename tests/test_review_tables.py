"""Sibling tables beside an output (`pipeline/review/tables.py`): appended, overwritten and read back by each
format's own reader and by DuckDB, on a local folder and on the S3 server; the Iceberg one in the output's catalog."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from output_driver import run_once
from pipeline.io.storage import Storage, join
from pipeline.job.errors import UserError
from pipeline.review.tables import TABLE_LIST, ParquetSibling, SiblingTable, sibling_uri
from readers import duckdb_connection

TRUTH = pa.schema([
    pa.field("uri", pa.string(), nullable=False), pa.field("label", pa.string()),
    pa.field("boxes", pa.list_(pa.struct([("label", pa.string()), ("x1", pa.float32()), ("y1", pa.float32()),
                                          ("x2", pa.float32()), ("y2", pa.float32())]))),
    pa.field("reviewer", pa.string()), pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),
])
FORMATS = ["parquet", "delta", "iceberg"]
STORES = ["local", pytest.param("s3", marks=pytest.mark.e2e)]


def answers(*uris: str) -> pa.Table:
    at = datetime(2026, 12, 6, 19, 0, tzinfo=timezone.utc)
    return pa.table({"uri": list(uris), "label": ["cat"] * len(uris),
                     "boxes": [[{"label": "cat", "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0}]] * len(uris),
                     "reviewer": ["ann"] * len(uris), "reviewed_at": [at] * len(uris)}, schema=TRUTH)


def make_output(request, tmp_path, fmt: str, store: str) -> tuple[Storage, str, dict | None]:
    """A committed output of one small run, without Ray: (storage, uri, catalog)."""
    catalog = None
    if store == "local":
        storage, uri = Storage.from_env(), str(tmp_path / "out")
    else:
        storage, uri = request.getfixturevalue("storage"), f"s3://{request.getfixturevalue('bucket')}/out"
    catalog_db = str(tmp_path / "catalog.db") if fmt == "iceberg" and store == "s3" else None
    run_once(uri, fmt, 2, catalog_db=catalog_db, storage=storage)
    if catalog_db:
        catalog = {"type": "sql", "uri": f"sqlite:///{catalog_db}"}
    return storage, uri, catalog


def own_reader(table: SiblingTable) -> pa.Table:
    """The rows as the format's own reader (and DuckDB) read them."""
    con = duckdb_connection(table.storage if table.uri.startswith("s3://") else None, *(
        [table.format] if table.format != "parquet" else []))
    if table.format == "delta":
        from deltalake import DeltaTable
        from pipeline.output.delta import storage_options

        rows = DeltaTable(table.uri, storage_options=storage_options(table.storage, table.uri)).to_pyarrow_table()
        assert sorted(u for (u,) in con.execute(f"SELECT uri FROM delta_scan('{table.uri}')").fetchall()) == \
            sorted(rows["uri"].to_pylist())
        return rows
    if table.format == "iceberg":
        iceberg = table.catalog.load_table(table.identifier)
        found = con.execute(f"SELECT uri FROM iceberg_scan('{iceberg.metadata_location}')").fetchall()
        rows = iceberg.scan().to_arrow()
        assert sorted(u for (u,) in found) == sorted(rows["uri"].to_pylist())
        return rows
    files = json.loads(table.storage.read_bytes(join(table.uri, TABLE_LIST)))["files"]
    glob = con.execute(f"SELECT uri FROM read_parquet('{table.uri}/*.parquet')").fetchall()
    rows = pa.concat_tables(pq.read_table(pa.BufferReader(table.storage.read_bytes(join(table.uri, f))))
                            for f in files)
    assert sorted(u for (u,) in glob) == sorted(rows["uri"].to_pylist())  # no part beside the listed ones
    return rows


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_append_then_overwrite_read_back_by_the_formats_own_readers(request, tmp_path, fmt, store):
    storage, uri, catalog = make_output(request, tmp_path, fmt, store)
    table = SiblingTable.for_output(storage, uri, "truth", catalog=catalog)
    assert table.format == fmt and table.uri == sibling_uri(uri, "truth") and table.read().num_rows == 0

    table.append(answers("s3://in/a.jpg", "s3://in/b.jpg"))
    table.append(answers("s3://in/c.jpg"))
    again = SiblingTable.for_output(storage, uri + "/", "truth", catalog=catalog)  # a later command
    assert sorted(again.read()["uri"].to_pylist()) == ["s3://in/a.jpg", "s3://in/b.jpg", "s3://in/c.jpg"]
    assert sorted(own_reader(again)["uri"].to_pylist()) == ["s3://in/a.jpg", "s3://in/b.jpg", "s3://in/c.jpg"]

    again.overwrite(answers("s3://in/d.jpg"))
    read = table.read()
    assert read["uri"].to_pylist() == ["s3://in/d.jpg"] and read.schema.field("reviewed_at").type == TRUTH.field(
        "reviewed_at").type
    assert read["boxes"].to_pylist() == [[{"label": "cat", "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0}]]
    assert own_reader(table)["uri"].to_pylist() == ["s3://in/d.jpg"]
    if fmt == "iceberg":  # in the output's catalog, beside the predictions
        names = {".".join(t) for t in table.catalog.list_tables("default")}
        assert names == {"default.predictions", "default.predictions_truth"}


def test_a_parquet_overwrite_is_one_part_and_appends_that_race_are_both_kept(tmp_path):
    storage = Storage.from_env()
    table = ParquetSibling(storage, str(tmp_path / "out_dedup"))
    table.append(answers("a"))
    table.append(answers("b"))
    table.overwrite(answers("c", "d"))
    parts = sorted(p.name for p in (tmp_path / "out_dedup").glob("*.parquet"))
    assert len(parts) == 1 and json.loads((tmp_path / "out_dedup" / TABLE_LIST).read_text())["files"] == parts

    # Another writer changes the list between our read and our write: our compare-and-swap reads it again.
    swap = table._swap

    def racing(change):
        table._swap = swap
        other = ParquetSibling(storage, table.uri)
        other.append(answers("e"))
        return swap(change)

    table._swap = racing
    table.append(answers("f"))
    assert sorted(table.read()["uri"].to_pylist()) == ["c", "d", "e", "f"]


def test_an_output_that_is_not_there_is_one_line(tmp_path):
    with pytest.raises(UserError, match="is not an output of this pipeline"):
        SiblingTable.for_output(Storage.from_env(), str(tmp_path / "nothing"), "dedup")
    with pytest.raises(ValueError):
        sibling_uri(str(tmp_path), "labels")
