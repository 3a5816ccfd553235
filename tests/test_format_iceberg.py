"""The Iceberg output format on its own (no Ray): one snapshot per run, read back by pyiceberg, Polars and DuckDB,
on a local folder (embedded SQLite catalog) and on the moto S3 server (a SQLite catalog in tmp_path)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from pipeline.io.storage import Storage
from pipeline.output.formats import RECORD_KEY, RUN_ID_KEY, Commit, Partitioning
from pipeline.output.iceberg import IcebergFormat
from pipeline.job.errors import UserError
from readers import duckdb_connection

SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("topk_labels", pa.list_(pa.string())),
    pa.field("modality", pa.string()),
    pa.field("last_modified", pa.timestamp("us", tz="UTC")),
    pa.field("run_id", pa.string(), nullable=False),
])
RUN1, RUN2, RUN3 = "20240501T000000Z-0000000a", "20240502T000000Z-0000000b", "20240503T000000Z-0000000c"
TABLE = "default.predictions"
# Polars plans Iceberg scans with pyiceberg when its optional planner plugin is absent, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:Iceberg scan planning")


def rows(run_id: str, n: int, start: int = 0, modality: str | None = None) -> pa.Table:
    ids = range(start, start + n)
    return pa.table({
        "uri": [f"s3://in/{i}.jpg" for i in ids],
        "label": ["cat" if i % 2 else "dog" for i in ids],
        "score": pa.array([i / 10 for i in ids], pa.float32()),
        "topk_labels": [["cat", "dog"] for _ in ids],
        "modality": [modality or ("CT" if i % 2 else "MR") for i in ids],
        "last_modified": pa.array([datetime(2024, 1, 1, tzinfo=timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
        "run_id": [run_id] * n,
    }, schema=SCHEMA)


def make_commit(run_id: str, tables: list[pa.Table], overwrite: bool = False, partitioning: Partitioning | None = None,
                rows_per_file: int = 2, fence=lambda: None, fail_after: int | None = None) -> Commit:
    def stream():
        for i, table in enumerate(tables):
            if fail_after is not None and i == fail_after:
                raise OSError("staged chunk unreadable")
            yield table

    record = {"run_id": run_id, "model": "resnet18", "weights": "w.pt", "model_key": "mk1", "job_key": "jk1",
              "input_fingerprint": f"{sum(t.num_rows for t in tables)}:00", "mode": "overwrite" if overwrite else "append",
              "committed_at": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
    return Commit(run_id=run_id, rows=stream, schema=SCHEMA, record=record, overwrite=overwrite,
                  partitioning=partitioning or Partitioning(), rows_per_file=rows_per_file, fence=fence)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> IcebergFormat:
    """An Iceberg output: a local folder with the default catalog, or S3 with a SQLite catalog in tmp_path."""
    if request.param == "local":
        return IcebergFormat(Storage.from_env(), str(tmp_path / "out"), None, TABLE, schema=SCHEMA)
    bucket = request.getfixturevalue("bucket")
    return IcebergFormat(request.getfixturevalue("storage"), f"s3://{bucket}/predictions",
                         {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db"}, TABLE, schema=SCHEMA)


def s3_storage_options(fmt: IcebergFormat) -> dict | None:
    """Polars' scan_iceberg takes pyiceberg FileIO properties."""
    if not fmt.uri.startswith("s3://"):
        return None
    return {"s3.endpoint": fmt.storage.endpoint_url, "s3.region": "us-east-1",
            "s3.access-key-id": os.environ["AWS_ACCESS_KEY_ID"],
            "s3.secret-access-key": os.environ["AWS_SECRET_ACCESS_KEY"]}


def test_appends_then_overwrite_each_one_snapshot_read_by_pyiceberg_polars_duckdb(output):
    first = output.commit(make_commit(RUN1, [rows(RUN1, 2), rows(RUN1, 1, start=2)]))
    second = output.commit(make_commit(RUN2, [rows(RUN2, 2, start=10)]))
    assert [c["run_id"] for c in output.committed()] == [RUN1, RUN2]
    assert [c["mode"] for c in output.committed()] == ["append", "append"]
    assert [c["run_id"] for c in output.live()] == [RUN1, RUN2]
    assert [f["rows"] for f in first["files"]] == [2, 1]  # rows_per_file=2
    assert sorted(output.data_files()) == sorted(f["path"] for f in first["files"] + second["files"])
    assert sorted(output.data_files({RUN2})) == sorted(output.data_files())  # rows say their run, not files
    assert all(RUN1 in f["path"] and "/data/" in f["path"] for f in first["files"])
    table = output.load()
    assert len(table.metadata.snapshots) == 2
    if output.uri.startswith("s3://"):
        assert type(table.io).__name__ == "FsspecFileIO"
    summary = table.snapshot_by_id(first["snapshot_id"]).summary.additional_properties
    assert summary[RUN_ID_KEY] == RUN1 and '"model_key": "mk1"' in summary[RECORD_KEY]
    assert table.scan().to_arrow().num_rows == 5
    assert "Iceberg snapshot" in output.describe(first) and TABLE in output.describe(first)

    third = output.commit(make_commit(RUN3, [rows(RUN3, 1, start=20)], overwrite=True))
    table = output.load()
    assert len(table.metadata.snapshots) == 3  # the overwrite is one snapshot, not a delete plus an append
    assert table.current_snapshot().summary.operation.value == "overwrite"
    assert [c["mode"] for c in output.committed()] == ["append", "append", "overwrite"]
    assert [c["run_id"] for c in output.live()] == [RUN3]
    assert output.data_files() == [third["files"][0]["path"]]
    assert third["metadata_location"] == output.metadata_location
    assert table.scan().to_arrow()["run_id"].to_pylist() == [RUN3]

    # time travel: the table as of the first run
    as_of_first = table.scan(snapshot_id=first["snapshot_id"]).to_arrow()
    assert sorted(as_of_first["uri"].to_pylist()) == [f"s3://in/{i}.jpg" for i in range(3)]

    import polars as pl

    frame = pl.scan_iceberg(table).collect()
    assert frame["run_id"].to_list() == [RUN3]
    frame = pl.scan_iceberg(output.metadata_location, storage_options=s3_storage_options(output)).collect()
    assert frame.height == 1 and frame["label"].to_list() == ["dog"]

    con = duckdb_connection(output.storage if output.uri.startswith("s3://") else None, "iceberg")
    path = output.metadata_location
    assert con.execute(f"SELECT run_id, uri FROM iceberg_scan('{path}')").fetchall() == [(RUN3, "s3://in/20.jpg")]
    old = con.execute(f"SELECT count(*), min(run_id) FROM iceberg_scan('{path}', "
                      f"snapshot_from_id => {first['snapshot_id']})").fetchone()
    assert old == (3, RUN1)


def test_committing_a_run_again_returns_its_record_without_a_new_snapshot(output):
    first = output.commit(make_commit(RUN1, [rows(RUN1, 3)]))
    again = output.commit(make_commit(RUN1, [rows(RUN1, 3)]))
    assert again["snapshot_id"] == first["snapshot_id"]
    assert sorted(f["path"] for f in again["files"]) == sorted(f["path"] for f in first["files"])
    assert len(output.load().metadata.snapshots) == 1
    assert [c["run_id"] for c in output.committed()] == [RUN1]


def test_partitioned_by_run_date(tmp_path):
    fmt = IcebergFormat(Storage.from_env(), str(tmp_path / "out"), None, TABLE, schema=SCHEMA)
    layout = Partitioning(run_date="2024-05-01")
    fmt.commit(make_commit(RUN1, [rows(RUN1, 3)], partitioning=layout))
    fmt.commit(make_commit(RUN2, [rows(RUN2, 1)], partitioning=Partitioning(run_date="2024-05-02")))
    table = fmt.load()
    assert [f.name for f in table.spec().fields] == ["run_date"]
    assert all("/data/run_date=2024-05-0" in f for f in fmt.data_files())
    read = table.scan(row_filter="run_date = '2024-05-01'").to_arrow()
    assert read.num_rows == 3 and read.schema.field("run_date").type == pa.date32()

    import polars as pl

    by_date = pl.scan_iceberg(fmt.metadata_location).group_by("run_date").len().sort("run_date").collect()
    assert by_date["len"].to_list() == [3, 1]
    with pytest.raises(UserError, match=r"^output.partitioning: .* partitioned by run_date, the job asks for none"):
        fmt.commit(make_commit(RUN3, [rows(RUN3, 1)]))


def test_partitioned_by_a_column(output):
    layout = Partitioning(column="modality")
    result = output.commit(make_commit(RUN1, [rows(RUN1, 3), rows(RUN1, 2, start=3, modality=None)],
                                       partitioning=layout, rows_per_file=10))
    table = output.load()
    assert [f.name for f in table.spec().fields] == ["modality"]
    assert sorted(f["rows"] for f in result["files"]) == [2, 3]  # CT: 1, 3 / MR: 0, 2, 4
    assert sorted(p.rsplit("/", 2)[1] for p in output.data_files()) == ["modality=CT", "modality=MR"]
    assert table.scan(row_filter="modality = 'CT'").to_arrow()["uri"].to_pylist() == ["s3://in/1.jpg", "s3://in/3.jpg"]


def test_rows_failing_midway_leave_the_table_unchanged(output):
    output.commit(make_commit(RUN1, [rows(RUN1, 2)]))
    before = output.metadata_location
    with pytest.raises(OSError, match="unreadable"):
        output.commit(make_commit(RUN2, [rows(RUN2, 2), rows(RUN2, 2), rows(RUN2, 1)], rows_per_file=1, fail_after=2))
    assert output.metadata_location == before
    assert [c["run_id"] for c in output.committed()] == [RUN1]
    assert output.load().scan().to_arrow().num_rows == 2
    leftovers = [o.uri for page in output.storage.list_pages(output.uri + "/data") for o in page if RUN2 in o.uri]
    assert leftovers == []  # the failed attempt's data files were deleted


def test_a_lost_lease_commits_nothing(tmp_path):
    fmt = IcebergFormat(Storage.from_env(), str(tmp_path / "out"), None, TABLE, schema=SCHEMA)
    fmt.commit(make_commit(RUN1, [rows(RUN1, 2)]))

    def fence():
        raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        fmt.commit(make_commit(RUN2, [rows(RUN2, 2)], fence=fence))
    assert [c["run_id"] for c in fmt.committed()] == [RUN1]
    assert len(fmt.load().metadata.snapshots) == 1


def test_an_empty_run_is_recorded_as_a_snapshot(tmp_path):
    fmt = IcebergFormat(Storage.from_env(), str(tmp_path / "out"), None, TABLE, schema=SCHEMA)
    fmt.commit(make_commit(RUN1, [rows(RUN1, 2)]))
    empty = fmt.commit(make_commit(RUN2, []))
    assert empty["files"] == [] and [c["run_id"] for c in fmt.committed()] == [RUN1, RUN2]
    assert fmt.load().scan().to_arrow().num_rows == 2


def test_an_s3_output_without_a_catalog_is_refused(storage, bucket):
    fmt = IcebergFormat(storage, f"s3://{bucket}/predictions", None, TABLE, schema=SCHEMA)
    with pytest.raises(UserError, match=r"^output.catalog: .*set output.catalog.*sqlite"):
        fmt.committed()


def test_check_existing_refuses_what_it_must_not_write(tmp_path):
    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db"}
    fmt = IcebergFormat(Storage.from_env(), str(tmp_path / "a"), catalog, TABLE, schema=SCHEMA)
    assert fmt.committed() == [] and fmt.data_files() == [] and fmt.metadata_location is None
    fmt.check_existing(overwrite=False)  # no table yet: fine
    fmt.commit(make_commit(RUN1, [rows(RUN1, 1)]))
    fmt.check_existing(overwrite=False)

    elsewhere = IcebergFormat(Storage.from_env(), str(tmp_path / "b"), catalog, TABLE, schema=SCHEMA)
    with pytest.raises(UserError, match=r"^output.table: default.predictions already exists at .*/a, not at"):
        elsewhere.check_existing(overwrite=False)

    lost_catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/other.db"}
    with pytest.raises(UserError, match=r"^output.uri: .*/a already holds Iceberg metadata"):
        IcebergFormat(Storage.from_env(), str(tmp_path / "a"), lost_catalog, TABLE).check_existing(overwrite=False)

    other = pa.schema([pa.field("uri", pa.string(), nullable=False), pa.field("score", pa.string())])
    with pytest.raises(UserError, match=r"^output.table: .*score is float, the job writes string"):
        IcebergFormat(Storage.from_env(), str(tmp_path / "a"), catalog, TABLE, schema=other).check_existing(False)
    wider = SCHEMA.append(pa.field("embedding", pa.list_(pa.float32())))
    with pytest.raises(UserError, match=r"has no column embedding"):
        IcebergFormat(Storage.from_env(), str(tmp_path / "a"), catalog, TABLE, schema=wider).check_existing(False)

    bad = IcebergFormat(Storage.from_env(), str(tmp_path / "c"), {"type": "nosuch"}, TABLE, schema=SCHEMA)
    with pytest.raises(UserError, match=r"^output.catalog: cannot open the Iceberg catalog"):
        bad.check_existing(overwrite=False)
    secret = {"type": "sql", "uri": "postgresql+psycopg://user:hunter2@127.0.0.1:1/db"}
    with pytest.raises(UserError, match=r"^output.catalog: ") as caught:
        IcebergFormat(Storage.from_env(), str(tmp_path / "d"), secret, TABLE).check_existing(overwrite=False)
    assert "hunter2" not in str(caught.value)


def test_the_catalog_is_named_as_the_job_says_and_the_summary_names_it(tmp_path):
    """A SQL catalog files each table under the catalog's name: another engine must open it by that name."""
    from pyiceberg.catalog import load_catalog

    uri = f"sqlite:///{tmp_path}/catalog.db"
    fmt = IcebergFormat(Storage.from_env(), str(tmp_path / "out"), {"type": "sql", "uri": uri, "name": "lake"},
                        TABLE, schema=SCHEMA)
    record = fmt.commit(make_commit(RUN1, [rows(RUN1, 3)]))
    assert "in catalog 'lake'" in fmt.describe(record)
    assert load_catalog("lake", type="sql", uri=uri).load_table(TABLE).scan().to_arrow().num_rows == 3
    assert not load_catalog("pipeline", type="sql", uri=uri).table_exists(TABLE)

    default = IcebergFormat(Storage.from_env(), str(tmp_path / "local"), None, TABLE, schema=SCHEMA)
    assert "in catalog 'pipeline'" in default.describe(default.commit(make_commit(RUN1, [rows(RUN1, 1)])))


def test_a_missing_postgres_driver_is_one_line_naming_what_installs_it(tmp_path):
    """pyiceberg's advice (`pyiceberg[sql-postgres]`) installs psycopg2, which postgresql+psycopg:// does not use."""
    pytest.importorskip("sqlalchemy")
    if __import__("importlib.util").util.find_spec("psycopg") is not None:
        pytest.skip("psycopg is installed here")
    catalog = {"type": "sql", "uri": "postgresql+psycopg://user:hunter2@127.0.0.1:1/db"}
    with pytest.raises(UserError) as caught:
        IcebergFormat(Storage.from_env(), str(tmp_path / "out"), catalog, TABLE).check_existing(overwrite=False)
    message = str(caught.value)
    assert message.startswith("output.catalog: ") and "pipeline[iceberg-postgres]" in message
    assert "sql-postgres" not in message and "hunter2" not in message and "\n" not in message


# --- upkeep: snapshots expired after each commit, run records kept beside the table ------------------------------

EXPIRE_AT_ONCE = {"history.expire.max-snapshot-age-ms": "1", "history.expire.min-snapshots-to-keep": "2"}


def nth_run(i: int) -> str:
    return f"20240601T0000{i:02d}Z-{i:08x}"


def set_properties(fmt: IcebergFormat, properties: dict[str, str]) -> None:
    """As a user (or another engine) sets them: the table's own properties."""
    fmt.load().transaction().set_properties(properties).commit_transaction()


def metadata_bytes(fmt: IcebergFormat) -> int:
    table = fmt.load()
    return len(table.io.new_input(table.metadata_location).open().read())


def test_snapshots_expire_as_the_table_says_and_every_run_stays_known(output):
    """16 runs into a table that keeps 2 snapshots: metadata.json stays small (without expiry it grows by ~1 KB a
    run), a tagged snapshot is kept, and every run is still committed and live, in order."""
    runs = [nth_run(i) for i in range(16)]
    first = output.commit(make_commit(runs[0], [rows(runs[0], 2)]))
    output.load().manage_snapshots().create_tag(first["snapshot_id"], "first-night").commit()
    set_properties(output, EXPIRE_AT_ONCE)
    sizes = []
    for i, run in enumerate(runs[1:], start=1):
        output.commit(make_commit(run, [rows(run, 2, start=2 * i)]))
        sizes.append(metadata_bytes(output))
    # A run adds a metadata-log entry (~160 B, until previous-versions-max=20 are listed), not a snapshot (~1 KB).
    assert all(later - earlier < 300 for earlier, later in zip(sizes[2:], sizes[3:])) and sizes[-1] < 9_000, sizes

    table = output.load()
    # One catalog commit a run, its expiry included: created (0), 16 runs, the tag and the properties.
    assert table.metadata_location.rsplit("/", 1)[1].startswith("00018-")
    kept = [s.snapshot_id for s in table.metadata.snapshots]
    assert len(kept) == 3 and first["snapshot_id"] in kept  # the last two, and the tagged one
    assert [c["run_id"] for c in output.committed()] == runs
    assert [c["run_id"] for c in output.live()] == runs
    assert all(c["model_key"] == "mk1" and c["mode"] == "append" for c in output.committed())
    assert table.scan().to_arrow().num_rows == 32  # expiry drops snapshots, never live rows
    copies = sorted(o.uri.rsplit("/", 1)[1] for page in output.storage.list_pages(output.uri + "/_pipeline/runs")
                    for o in page)
    assert copies == [f"{r}.json" for r in runs]

    again = output.commit(make_commit(runs[3], [rows(runs[3], 2)]))  # a retry of a run whose snapshot is gone
    assert again["snapshot_id"] not in kept and len(output.load().metadata.snapshots) == 3
    overwrite = output.commit(make_commit(nth_run(40), [rows(nth_run(40), 1)], overwrite=True))
    assert [c["run_id"] for c in output.live()] == [overwrite["run_id"]]
    assert len(output.committed()) == 17


def test_a_record_whose_copy_was_not_written_is_copied_before_its_snapshot_expires(tmp_path):
    """A driver killed between the commit and the copy: the run is known by its snapshot; the next commit copies
    its record, then expires the snapshot, and the run stays known."""
    fmt = IcebergFormat(Storage.from_env(), str(tmp_path / "out"), None, TABLE, schema=SCHEMA)
    fmt.commit(make_commit(RUN1, [rows(RUN1, 2)]))
    copy = tmp_path / "out" / "_pipeline" / "runs" / f"{RUN1}.json"
    copy.unlink()  # as if killed before it was written
    assert [c["run_id"] for c in fmt.committed()] == [RUN1]
    set_properties(fmt, {**EXPIRE_AT_ONCE, "history.expire.min-snapshots-to-keep": "1"})

    fmt.commit(make_commit(RUN2, [rows(RUN2, 2, start=2)]))
    assert copy.exists() and len(fmt.load().metadata.snapshots) == 1
    assert [c["run_id"] for c in fmt.committed()] == [RUN1, RUN2]
    assert fmt.committed()[0]["model_key"] == "mk1"


def test_a_rolled_back_run_or_another_tables_copy_is_not_a_run(tmp_path):
    """A run rolled back by another engine is not committed, before its snapshot expires and after; a copy left
    by another table once at this location (another uuid) is not a run either."""
    fmt = IcebergFormat(Storage.from_env(), str(tmp_path / "out"), None, TABLE, schema=SCHEMA)
    first = fmt.commit(make_commit(RUN1, [rows(RUN1, 2)]))
    fmt.commit(make_commit(RUN2, [rows(RUN2, 2, start=2)], overwrite=True))
    fmt.load().manage_snapshots().rollback_to_snapshot(first["snapshot_id"]).commit()
    assert [c["run_id"] for c in fmt.committed()] == [RUN1]  # RUN2's snapshot is kept, out of the ancestry
    assert [c["run_id"] for c in fmt.live()] == [RUN1]

    set_properties(fmt, {**EXPIRE_AT_ONCE, "history.expire.min-snapshots-to-keep": "1"})
    fmt.commit(make_commit(RUN3, [rows(RUN3, 2, start=4)]))
    assert len(fmt.load().metadata.snapshots) == 1  # RUN1's and the rolled-back RUN2's expired
    assert not (tmp_path / "out" / "_pipeline" / "runs" / f"{RUN2}.json").exists()
    assert [c["run_id"] for c in fmt.live()] == [RUN1, RUN3]

    stranger = tmp_path / "out" / "_pipeline" / "runs" / f"{nth_run(50)}.json"
    stranger.write_text(json.dumps({"run_id": nth_run(50), "snapshot_id": 1, "table_uuid": "another",
                                    "mode": "overwrite", "committed_at": "2099-01-01T00:00:00+00:00"}))
    assert [c["run_id"] for c in fmt.committed()] == [RUN1, RUN3]


def test_nightly_runs_with_expiry_skip_every_earlier_runs_inputs(tmp_path):
    """Through the output's front door, as a job runs: each night 5 new inputs of a growing listing; with every
    older snapshot expired, the skip set still holds all earlier nights, so no input is predicted twice."""
    from output_driver import run_once

    output = str(tmp_path / "out")
    assert run_once(output, "iceberg", 5)["processed"] == 5
    set_properties(IcebergFormat(Storage.from_env(), output, None, TABLE), {
        **EXPIRE_AT_ONCE, "history.expire.min-snapshots-to-keep": "1"})
    for night in range(2, 7):
        assert run_once(output, "iceberg", 5 * night)["processed"] == 5
    fmt = IcebergFormat(Storage.from_env(), output, None, TABLE)
    assert len(fmt.load().metadata.snapshots) == 1 and len(fmt.committed()) == 6
    uris = fmt.load().scan(selected_fields=("uri",)).to_arrow()["uri"].to_pylist()
    assert len(uris) == len(set(uris)) == 30
