"""Manifests as ordinary tools write them (pandas' Parquet and CSV, a spreadsheet's CSV), run through the CLI on a
local folder and on the test S3 server, read back, and run again incrementally."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timezone

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import encode, photo
from pipeline.cli import main
from pipeline.manifest import cast_batch, read_manifest
from pipeline.rows import SOURCE_SCHEMA
from pipeline.storage import Storage, join
from test_cli_errors import assert_one_line

pytestmark = pytest.mark.usefixtures("ray_session")

UTC = timezone.utc
NAMES = ["a.png", "b c.png", "d.png"]


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, storage, bucket) -> str:
    """A folder holding the images and the manifest, local or on the test S3 server; outputs go beside it."""
    root = str(tmp_path) if request.param == "local" else f"s3://{bucket}"
    for i, name in enumerate(NAMES):
        storage.write_bytes(join(root, f"imgs/{name}"), encode(photo(seed=i), "PNG"))
    return root


def run(storage: Storage, manifest: str, output: str, classifier_files) -> dict:
    """`pipeline run` in this process (the session's Ray); its _summary.json."""
    code = main(["run", "--input", manifest, "--output", output, "--model", classifier_files["model"],
                 "--weights", classifier_files["weights"], "--labels", classifier_files["labels"]])
    assert code == 0
    return json.loads(storage.read_bytes(join(output, "_summary.json")))


def rows(output: str) -> dict[str, dict]:
    table = pads.dataset(output, format="parquet").to_table()
    return {r["uri"].rsplit("/", 1)[1]: r for r in table.to_pylist()}


def put_parquet(storage: Storage, uri: str, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer)  # pandas' own writer: nanosecond timestamps, the index as __index_level_0__
    storage.write_bytes(uri, buffer.getvalue())


def test_pandas_parquet_manifest(where, storage, classifier_files):
    stamps = pd.to_datetime(["2024-05-01 10:00:00.123456789", "2024-05-02 11:30:00", "2024-05-03 00:00:00.5"], format="ISO8601")
    if where.startswith("s3://"):
        stamps = stamps.tz_localize("Europe/Berlin")  # tz-aware on S3, naive (UTC) locally
    frame = pd.DataFrame({"uri": [join(where, f"imgs/{n}") for n in NAMES],
                          "size": pd.array([10, 20, 30], dtype="int32"),
                          "etag": [123, 456, 789],  # numbers, not text
                          "last_modified": stamps}, index=[7, 8, 9])
    manifest = join(where, "list.parquet")
    put_parquet(storage, manifest, frame)
    assert "__index_level_0__" in pq.read_schema(io.BytesIO(storage.read_bytes(manifest))).names

    first = run(storage, manifest, join(where, "out"), classifier_files)
    written = rows(join(where, "out"))
    assert first["inputs"] == 3 and all(r["error"] is None for r in written.values())
    expected = stamps if stamps.tz is not None else stamps.tz_localize("UTC")
    for name, stamp, size, etag in zip(NAMES, expected, [10, 20, 30], ["123", "456", "789"]):
        assert written[name]["last_modified"] == stamp.floor("us").to_pydatetime()  # ns truncated, in UTC
        assert (written[name]["size"], written[name]["etag"]) == (size, etag)
    assert written["a.png"]["last_modified"] == datetime(2024, 5, 1, 8 if stamps.tz else 10, 0, 0, 123456, UTC)

    again = run(storage, manifest, join(where, "out"), classifier_files)
    assert (again["inputs"], again["already_done"]) == (0, 3)


def test_csv_manifest_as_tools_write_it(where, storage, classifier_files):
    """A spreadsheet's 'CSV UTF-8' (byte-order mark, CRLF), every ISO form, pandas' to_csv values, blank cells."""
    lines = ["uri,size,etag,last_modified",
             f"{join(where, 'imgs/a.png')},1234.0,,2024-05-01 10:00:00",          # pandas' float size; no etag
             f'"{join(where, "imgs/b c.png")}", ,e-b,2024-05-01T12:00:00+02:00',  # blank size, with an offset
             "imgs/d.png,,,2024-05-01 10:00:00.123456789"]                       # pandas' ns, relative uri
    manifest = join(where, "list.csv")
    storage.write_bytes(manifest, b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")

    first = run(storage, manifest, join(where, "out"), classifier_files)
    written = rows(join(where, "out"))
    assert first["inputs"] == 3 and all(r["error"] is None for r in written.values())
    assert {n: (r["size"], r["etag"], r["last_modified"]) for n, r in written.items()} == {
        "a.png": (1234, None, datetime(2024, 5, 1, 10, tzinfo=UTC)),
        "b c.png": (None, "e-b", datetime(2024, 5, 1, 10, tzinfo=UTC)),  # listed without a size: stays so
        "d.png": (None, None, datetime(2024, 5, 1, 10, 0, 0, 123456, UTC)),
    }
    if not where.startswith("s3://"):
        assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{where}/out/**/*.parquet') "
                          "WHERE last_modified = TIMESTAMPTZ '2024-05-01 10:00:00+00'").fetchall() == [(2,)]

    again = run(storage, manifest, join(where, "out"), classifier_files)
    assert (again["inputs"], again["already_done"]) == (0, 3)


def test_manifest_with_etag_and_mtime_but_no_size_is_not_reprocessed(tmp_path, storage, classifier_files):
    """The read stage must not fill in a size the listing did not give with an etag or mtime: the version key
    would differ. An entry with neither keys on its uri alone, so its size is filled from the bytes read."""
    for i, name in enumerate(NAMES):
        (tmp_path / name).write_bytes(encode(photo(seed=i), "PNG"))
    (tmp_path / "list.csv").write_text("uri,etag,last_modified\n"
                                       "a.png,e1,\n"                          # etag only
                                       "b c.png,,2024-05-01T10:00:00Z\n"      # last_modified only
                                       "d.png,,\n")                           # neither
    manifest, output = str(tmp_path / "list.csv"), str(tmp_path / "out")
    assert run(storage, manifest, output, classifier_files)["inputs"] == 3
    sizes = {name: r["size"] for name, r in rows(output).items()}
    assert sizes == {"a.png": None, "b c.png": None, "d.png": (tmp_path / "d.png").stat().st_size}
    again = run(storage, manifest, output, classifier_files)
    assert (again["inputs"], again["already_done"]) == (0, 3)


@pytest.mark.parametrize("column, value, words", [
    ("last_modified", "5/1/2024 10:00", ["column 'last_modified', row 2", "'5/1/2024 10:00' is not a timestamp",
                                         "yyyy-mm-dd hh:mm:ss"]),
    ("last_modified", "yesterday", ["column 'last_modified', row 2", "write ISO 8601"]),
    ("size", "12kB", ["column 'size', row 2", "'12kB' is not a whole number of bytes"]),
    ("size", "-5", ["column 'size', row 2", "not a whole number of bytes"]),
])
def test_an_unreadable_csv_value_is_one_line(capsys, tmp_path, classifier_files, column, value, words):
    good = {"size": "10", "last_modified": "2024-05-01 10:00:00"}
    (tmp_path / "list.csv").write_text(f"uri,{column}\na.png,{good[column]}\nb.png,{value}\n")
    code = main(["run", "--input", str(tmp_path / "list.csv"), "--output", str(tmp_path / "out"),
                 "--model", classifier_files["model"], "--weights", classifier_files["weights"],
                 "--labels", classifier_files["labels"]])
    assert code == 2
    assert_one_line(capsys.readouterr().err, "input.uri", "list.csv", *words)


def test_epoch_numbers_as_last_modified_are_one_line(capsys, tmp_path, classifier_files):
    """Seconds or milliseconds? A number says neither: refused, not guessed."""
    pq.write_table(pa.table({"uri": ["a.png"], "last_modified": [1714557600]}), tmp_path / "list.parquet")
    code = main(["run", "--input", str(tmp_path / "list.parquet"), "--output", str(tmp_path / "out"),
                 "--model", classifier_files["model"], "--weights", classifier_files["weights"],
                 "--labels", classifier_files["labels"]])
    assert code == 2
    assert_one_line(capsys.readouterr().err, "column 'last_modified', row 1: 1714557600 is not a timestamp")


def test_an_unreadable_value_past_the_first_batch_is_null_and_logged(tmp_path, caplog):
    """Preflight reads only the first batch; one bad cell later must not end a job hours into the listing."""
    sizes = [str(i) for i in range(1500)]
    sizes[1200] = "twelve"
    pq.write_table(pa.table({"uri": [f"{i}.png" for i in range(1500)], "size": sizes}), tmp_path / "list.parquet")
    with caplog.at_level(logging.WARNING, logger="pipeline.manifest"):
        entries = [o for page in read_manifest(str(tmp_path / "list.parquet"), Storage()) for o in page]
    assert len(entries) == 1500 and entries[1200].size is None and entries[1201].size == 1201
    assert "column 'size', row 1201: 'twelve'" in caplog.text


def test_what_pandas_makes_of_a_column_with_gaps_is_read_as_meant():
    """A missing value turns pandas' int columns into float64 with NaN, and strings into large_string."""
    frame = pd.DataFrame({"uri": pd.array(["a.png", "b.png"], dtype="string[pyarrow]"),
                          "size": [1234, None], "etag": [5678, None],
                          "last_modified": pd.to_datetime(["2024-05-01 10:00", None]).tz_localize("US/Pacific")})
    assert str(frame["size"].dtype) == "float64"
    batch, bad = cast_batch(pa.RecordBatch.from_pandas(frame, preserve_index=False))
    assert bad == [] and batch.schema == SOURCE_SCHEMA
    assert batch.to_pylist() == [
        {"uri": "a.png", "size": 1234, "etag": "5678", "last_modified": datetime(2024, 5, 1, 17, tzinfo=UTC)},
        {"uri": "b.png", "size": None, "etag": None, "last_modified": None}]
