"""Manifests as ordinary tools write them (pandas' Parquet and CSV, a spreadsheet's CSV), run through the CLI (in this
process, on the session's Ray) on the test S3 server and on a local folder, read back, and run again incrementally.

Each manifest form runs end to end once; the same form on the other storage is read with `read_manifest` only (the
model adds nothing there), which keeps this module's model runs to four."""

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
from pipeline.cli.commands import main
from pipeline.io.manifest import cast_batch, read_manifest
from pipeline.io.storage import ObjectInfo, Storage, join
from pipeline.job.rows import SOURCE_SCHEMA
from test_cli_errors import assert_one_line

pytestmark = pytest.mark.usefixtures("ray_session")

UTC = timezone.utc
NAMES = ["a.png", "b c.png", "d.png"]


def put_images(storage: Storage, root: str, names=NAMES) -> None:
    """The images under <root>/imgs/, local or on the test S3 server; manifests and outputs go beside them."""
    for i, name in enumerate(names):
        storage.write_bytes(join(root, f"imgs/{name}"), encode(photo(seed=i), "PNG"))


@pytest.fixture
def spec(tmp_path, classifier_files) -> str:
    """The classifier, with one model actor: these tests are about the manifest, not the actor pool."""
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"model": {"name": classifier_files["model"], "weights": classifier_files["weights"],
                                          "labels": classifier_files["labels"]},
                                "compute": {"min_actors": 1, "max_actors": 1}}))
    return str(path)


def run(storage: Storage, manifest: str, output: str, spec: str) -> dict:
    """`pipeline run` in this process (the session's Ray); its _summary.json."""
    assert main(["run", spec, "--input", manifest, "--output", output]) == 0
    return json.loads(storage.read_bytes(join(output, "_summary.json")))


def listed(manifest: str, storage: Storage) -> dict[str, ObjectInfo]:
    """The manifest's entries as the listing reads them, by file name (no job, no model)."""
    return {o.uri.rsplit("/", 1)[1]: o for page in read_manifest(manifest, storage) for o in page}


def rows(output: str) -> dict[str, dict]:
    table = pads.dataset(output, format="parquet").to_table()
    return {r["uri"].rsplit("/", 1)[1]: r for r in table.to_pylist()}


def put_parquet(storage: Storage, uri: str, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer)  # pandas' own writer: nanosecond timestamps, the index as __index_level_0__
    storage.write_bytes(uri, buffer.getvalue())


def pandas_manifest(where: str, stamps: pd.DatetimeIndex) -> pd.DataFrame:
    return pd.DataFrame({"uri": [join(where, f"imgs/{n}") for n in NAMES],
                         "size": pd.array([10, 20, 30], dtype="int32"),
                         "etag": [123, 456, 789],  # numbers, not text
                         "last_modified": stamps}, index=[7, 8, 9])


STAMPS = ["2024-05-01 10:00:00.123456789", "2024-05-02 11:30:00", "2024-05-03 00:00:00.5"]


def test_pandas_parquet_manifest(storage, bucket, spec):
    """On S3, tz-aware; the naive (UTC) form is read in the test below."""
    where = f"s3://{bucket}"
    put_images(storage, where)
    stamps = pd.to_datetime(STAMPS, format="ISO8601").tz_localize("Europe/Berlin")
    manifest = join(where, "list.parquet")
    put_parquet(storage, manifest, pandas_manifest(where, stamps))
    assert "__index_level_0__" in pq.read_schema(io.BytesIO(storage.read_bytes(manifest))).names

    first = run(storage, manifest, join(where, "out"), spec)
    written = rows(join(where, "out"))
    assert first["inputs"] == 3 and all(r["error"] is None for r in written.values())
    for name, stamp, size, etag in zip(NAMES, stamps, [10, 20, 30], ["123", "456", "789"]):
        assert written[name]["last_modified"] == stamp.floor("us").to_pydatetime()  # ns truncated, in UTC
        assert (written[name]["size"], written[name]["etag"]) == (size, etag)
    assert written["a.png"]["last_modified"] == datetime(2024, 5, 1, 8, 0, 0, 123456, UTC)

    again = run(storage, manifest, join(where, "out"), spec)
    assert (again["inputs"], again["already_done"]) == (0, 3)


def test_pandas_parquet_manifest_with_naive_timestamps_on_a_local_folder(tmp_path, storage):
    """Naive timestamps are UTC; the rest as on S3 above (the entries are what the rows are written from)."""
    stamps = pd.to_datetime(STAMPS, format="ISO8601")
    manifest = str(tmp_path / "list.parquet")
    put_parquet(storage, manifest, pandas_manifest(str(tmp_path), stamps))
    assert "__index_level_0__" in pq.read_schema(manifest).names
    entries = listed(manifest, storage)
    assert list(entries) == NAMES
    for name, stamp, size, etag in zip(NAMES, stamps.tz_localize("UTC"), [10, 20, 30], ["123", "456", "789"]):
        entry = entries[name]
        assert entry.uri == str(tmp_path / "imgs" / name)
        assert entry.last_modified == stamp.floor("us").to_pydatetime()  # ns truncated, in UTC
        assert (entry.size, entry.etag) == (size, etag)
    assert entries["a.png"].last_modified == datetime(2024, 5, 1, 10, 0, 0, 123456, UTC)


CSV_NAMES = [*NAMES, "e.png", "f.png"]


def spreadsheet_csv(where: str) -> bytes:
    """A spreadsheet's 'CSV UTF-8' (byte-order mark, CRLF), every ISO form, pandas' to_csv values, blank cells."""
    lines = ["uri,size,etag,last_modified",
             f"{join(where, 'imgs/a.png')},1234.0,,2024-05-01 10:00:00",          # pandas' float size; no etag
             f'"{join(where, "imgs/b c.png")}", ,e-b,2024-05-01T12:00:00+02:00',  # blank size, with an offset
             "imgs/d.png,,,2024-05-01 10:00:00.123456789",                       # pandas' ns, relative uri
             "imgs/e.png,,e1,",                                                   # etag only
             "imgs/f.png,,,"]                                                     # neither etag nor mtime
    return b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n"


def test_csv_manifest_as_tools_write_it(tmp_path, storage, spec):
    """Also: the read stage must not fill in a size the listing did not give with an etag or mtime (the version
    key would differ, and the rerun would process them again). An entry with neither keys on its uri alone, so its
    size is filled from the bytes read."""
    where = str(tmp_path)
    put_images(storage, where, CSV_NAMES)
    manifest = join(where, "list.csv")
    storage.write_bytes(manifest, spreadsheet_csv(where))

    first = run(storage, manifest, join(where, "out"), spec)
    written = rows(join(where, "out"))
    assert first["inputs"] == 5 and all(r["error"] is None for r in written.values())
    assert {n: (r["size"], r["etag"], r["last_modified"]) for n, r in written.items()} == {
        "a.png": (1234, None, datetime(2024, 5, 1, 10, tzinfo=UTC)),
        "b c.png": (None, "e-b", datetime(2024, 5, 1, 10, tzinfo=UTC)),  # listed without a size: stays so
        "d.png": (None, None, datetime(2024, 5, 1, 10, 0, 0, 123456, UTC)),
        "e.png": (None, "e1", None),
        "f.png": ((tmp_path / "imgs" / "f.png").stat().st_size, None, None),
    }
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{where}/out/**/*.parquet') "
                      "WHERE last_modified = TIMESTAMPTZ '2024-05-01 10:00:00+00'").fetchall() == [(2,)]

    again = run(storage, manifest, join(where, "out"), spec)
    assert (again["inputs"], again["already_done"]) == (0, 5)


def test_csv_manifest_as_tools_write_it_on_s3(storage, bucket):
    """The same file on S3: byte-order mark, CRLF, quoting and relative uris (against the s3:// folder)."""
    where = f"s3://{bucket}"
    manifest = join(where, "list.csv")
    storage.write_bytes(manifest, spreadsheet_csv(where))
    entries = listed(manifest, storage)
    assert {n: (o.uri, o.size, o.etag, o.last_modified) for n, o in entries.items()} == {
        "a.png": (f"{where}/imgs/a.png", 1234, None, datetime(2024, 5, 1, 10, tzinfo=UTC)),
        "b c.png": (f"{where}/imgs/b c.png", None, "e-b", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        "d.png": (f"{where}/imgs/d.png", None, None, datetime(2024, 5, 1, 10, 0, 0, 123456, UTC)),
        "e.png": (f"{where}/imgs/e.png", None, "e1", None),
        "f.png": (f"{where}/imgs/f.png", None, None, None),
    }


def test_a_manifest_without_a_size_column_lists_no_sizes(tmp_path, storage):
    """No size column at all reads as blank sizes (the end-to-end case of blank sizes is the CSV test above)."""
    (tmp_path / "list.csv").write_text("uri,etag,last_modified\n"
                                       "a.png,e1,\n"                          # etag only
                                       "b c.png,,2024-05-01T10:00:00Z\n"      # last_modified only
                                       "d.png,,\n")                           # neither
    entries = listed(str(tmp_path / "list.csv"), storage)
    assert {n: (o.size, o.etag, o.last_modified) for n, o in entries.items()} == {
        "a.png": (None, "e1", None), "b c.png": (None, None, datetime(2024, 5, 1, 10, tzinfo=UTC)),
        "d.png": (None, None, None)}


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
    with caplog.at_level(logging.WARNING, logger="pipeline.io.manifest"):
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
