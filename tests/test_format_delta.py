"""output.format: delta — one Delta commit per run, read back by delta-rs, Polars and DuckDB, locally and on S3
(moto). No Ray: the format is given staged rows directly, as the output front door gives them."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import uuid
from typing import Callable

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline.io.storage import Storage
from pipeline.output.delta import DeltaFormat, storage_options
from pipeline.output.formats import Commit, Partitioning
from pipeline.job.errors import UserError
from readers import duckdb_connection

SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("modality", pa.string()),
    pa.field("last_modified", pa.timestamp("us", tz="UTC")),
    pa.field("embedding", pa.list_(pa.float32(), 2)),
    pa.field("run_id", pa.string(), nullable=False),
])
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)


def run_id(n: int) -> str:
    return f"20240506T0708{n:02d}Z-{n:08x}"


def rows(run: str, names: list[str], modality: str | list[str | None] = "CT") -> pa.Table:
    modalities = modality if isinstance(modality, list) else [modality] * len(names)
    return pa.Table.from_pylist(
        [{"uri": f"s3://in/{name}", "label": "cat", "score": 0.5, "modality": m, "last_modified": WHEN,
          "embedding": [1.0, 2.0], "run_id": run} for name, m in zip(names, modalities)], schema=SCHEMA)


def make_commit(run: str, tables: list[pa.Table], overwrite: bool = False, partitioning: Partitioning | None = None,
                schema: pa.Schema = SCHEMA, fence: Callable[[], None] = lambda: None) -> Commit:
    record = {"run_id": run, "model": "resnet18", "weights": "w.pt", "model_key": "mk-1", "job_key": "jk-1",
              "rows": sum(t.num_rows for t in tables), "input_fingerprint": f"{run}-fp"}
    return Commit(run_id=run, rows=lambda: iter(tables), schema=schema, record=record, overwrite=overwrite,
                  partitioning=partitioning or Partitioning(), rows_per_file=1000, fence=fence)


@pytest.fixture(scope="module")
def s3_bucket(s3_server) -> tuple[Storage, str]:
    """One bucket for this module's tests, each under its own prefix: a boto3 client takes a while to make."""
    storage = Storage.from_env()
    name = f"delta-{uuid.uuid4().hex[:12]}"
    storage.s3_client.create_bucket(Bucket=name)
    return storage, name


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path) -> tuple[Storage, str]:
    """(storage, table uri): a local folder, or a fresh prefix in the moto server's bucket."""
    if request.param == "local":
        return Storage(), str(tmp_path / "table")
    storage, bucket = request.getfixturevalue("s3_bucket")
    return storage, f"s3://{bucket}/{uuid.uuid4().hex[:8]}/table"


def uris(table) -> list[str]:
    return sorted(pa.table(table)["uri"].to_pylist()) if not isinstance(table, pl.DataFrame) else \
        sorted(table["uri"].to_list())


def read_parquet(storage: Storage, uri: str) -> pa.Table:
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return pq.read_table(pa.BufferReader(storage.s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()))
    return pq.read_table(uri)


def duckdb_uris(storage: Storage, uri: str, version: int | None = None) -> list[str]:
    con = duckdb_connection(storage if uri.startswith("s3://") else None, "delta")
    at = f", version => {version}" if version is not None else ""
    return [u for (u,) in con.execute(f"SELECT uri FROM delta_scan('{uri}'{at}) ORDER BY uri").fetchall()]


# --- the tests -------------------------------------------------------------------------------------------------
def test_appends_then_an_overwrite(target):
    storage, uri = target
    fmt = DeltaFormat(storage, uri, schema=SCHEMA, partitioning=Partitioning())
    assert fmt.committed() == [] and fmt.live() == [] and fmt.data_files() == []
    fmt.check_existing(overwrite=False)

    first = fmt.commit(make_commit(run_id(1), [rows(run_id(1), ["a.jpg", "b.jpg"]), rows(run_id(1), ["c.jpg"])]))
    second = fmt.commit(make_commit(run_id(2), [rows(run_id(2), ["d.jpg"])]))
    assert (first["version"], second["version"]) == (0, 1)
    assert sum(f["rows"] for f in first["files"]) == 3 and second["files"][0]["rows"] == 1
    assert fmt.describe(second).startswith("Delta table version 1")
    assert [r["run_id"] for r in fmt.live()] == [run_id(1), run_id(2)]
    assert sorted(fmt.data_files()) == sorted(f"{uri}/{f['path']}" for f in first["files"] + second["files"])
    assert fmt.data_files({run_id(2)}) == [f"{uri}/{second['files'][0]['path']}"]
    assert sorted(fmt.data_files({run_id(1), run_id(2)})) == sorted(fmt.data_files())
    fmt.check_existing(overwrite=False)

    # The overwrite changes the schema too: one atomic replace.
    wider = SCHEMA.append(pa.field("extra", pa.int64()))
    table = rows(run_id(3), ["e.jpg"]).append_column("extra", pa.array([7], pa.int64()))
    third = fmt.commit(make_commit(run_id(3), [table], overwrite=True, schema=wider))
    assert third["version"] == 2 and third["mode"] == "overwrite"

    committed = fmt.committed()
    assert [(r["run_id"], r["mode"], r["version"]) for r in committed] == [
        (run_id(1), "append", 0), (run_id(2), "append", 1), (run_id(3), "overwrite", 2)]
    for record in committed:
        assert record["model_key"] == "mk-1" and record["committed_at"] and record["input_fingerprint"]
    assert [r["run_id"] for r in fmt.live()] == [run_id(3)]
    assert fmt.data_files() == [f"{uri}/{third['files'][0]['path']}"]
    assert read_parquet(storage, fmt.data_files()[0])["extra"].to_pylist() == [7]  # a plain Parquet file

    options = storage_options(storage, uri)
    latest = DeltaTable(uri, storage_options=options).to_pyarrow_table()
    assert uris(latest) == ["s3://in/e.jpg"] and latest["extra"].to_pylist() == [7]
    # Time travel: the version before the overwrite, through each reader.
    before = ["s3://in/a.jpg", "s3://in/b.jpg", "s3://in/c.jpg", "s3://in/d.jpg"]
    assert uris(DeltaTable(uri, version=1, storage_options=options).to_pyarrow_table()) == before
    assert uris(pl.read_delta(uri, version=1, storage_options=options)) == before
    assert duckdb_uris(storage, uri, version=1) == before
    assert duckdb_uris(storage, uri) == ["s3://in/e.jpg"]

    # A new DeltaFormat (a new driver) sees the same, and its cache follows later commits.
    again = DeltaFormat(storage, uri)
    assert again.committed() == committed
    fourth = rows(run_id(4), ["f.jpg"]).append_column("extra", pa.array([8], pa.int64()))
    again.commit(make_commit(run_id(4), [fourth], schema=wider))
    assert [r["run_id"] for r in again.live()] == [run_id(3), run_id(4)]


def test_a_run_commits_once(tmp_path):
    fmt = DeltaFormat(Storage(), str(tmp_path / "table"))
    commit = make_commit(run_id(1), [rows(run_id(1), ["a.jpg"])])
    record = fmt.commit(commit)
    calls = []
    commit.rows = lambda: calls.append(1) or iter([])  # a retry must not even read the rows again
    assert fmt.commit(commit) == record
    assert not calls
    assert DeltaTable(fmt.uri).version() == 0 and len(fmt.committed()) == 1
    # A new driver (no cache) finds it committed too, even after an overwrite by another run.
    fmt.commit(make_commit(run_id(2), [rows(run_id(2), ["b.jpg"])], overwrite=True))
    assert DeltaFormat(Storage(), fmt.uri).commit(commit)["version"] == 0
    assert DeltaTable(fmt.uri).version() == 1


def test_partitioned_by_run_date_and_by_a_column(target):
    storage, uri = target
    options = storage_options(storage, uri)

    by_date = DeltaFormat(storage, uri + "_by_date")
    record = by_date.commit(make_commit(run_id(1), [rows(run_id(1), ["a.jpg", "b.jpg"])],
                                        partitioning=Partitioning(run_date="2024-05-06")))
    assert [f["path"].split("/")[0] for f in record["files"]] == ["run_date=2024-05-06"]
    table = DeltaTable(uri + "_by_date", storage_options=options)
    assert table.metadata().partition_columns == ["run_date"]
    read = table.to_pyarrow_table()
    assert read.schema.field("run_date").type == pa.date32()
    assert set(read["run_date"].to_pylist()) == {datetime.date(2024, 5, 6)}
    assert pl.read_delta(uri + "_by_date", storage_options=options)["run_date"].to_list() == [
        datetime.date(2024, 5, 6)] * 2
    assert duckdb_uris(storage, uri + "_by_date") == ["s3://in/a.jpg", "s3://in/b.jpg"]

    by_column = DeltaFormat(storage, uri + "_by_modality")
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    record = by_column.commit(make_commit(run_id(2), [rows(run_id(2), names, ["CT", "MR", None, "C T/x"])],
                                          partitioning=Partitioning(column="modality")))
    folders = {f["path"].split("/")[0] for f in record["files"]}
    assert {"modality=CT", "modality=MR", "modality=__HIVE_DEFAULT_PARTITION__"} < folders and len(folders) == 4
    assert sorted(by_column.data_files()) == sorted(f"{uri}_by_modality/{f['path']}" for f in record["files"])
    assert sorted(by_column.data_files({run_id(2)})) == sorted(by_column.data_files())
    read = DeltaTable(uri + "_by_modality", storage_options=options).to_pyarrow_table()
    assert "modality" in read.schema.names  # a partition column stays a column of the table
    assert sorted(zip(read["uri"].to_pylist(), read["modality"].to_pylist()), key=lambda p: p[0]) == [
        ("s3://in/a.jpg", "CT"), ("s3://in/b.jpg", "MR"), ("s3://in/c.jpg", None), ("s3://in/d.jpg", "C T/x")]
    polars = pl.read_delta(uri + "_by_modality", storage_options=options).sort("uri")
    assert polars["modality"].to_list() == ["CT", "MR", None, "C T/x"]
    con = duckdb_connection(storage if uri.startswith("s3://") else None, "delta")
    assert con.execute(f"SELECT uri FROM delta_scan('{uri}_by_modality') WHERE modality = 'MR'").fetchall() == [
        ("s3://in/b.jpg",)]

    # An append must match the table's partitioning; an overwrite may change it.
    with pytest.raises(UserError, match="partitioned by"):
        DeltaFormat(storage, uri + "_by_modality", schema=SCHEMA, partitioning=Partitioning()).check_existing(False)
    DeltaFormat(storage, uri + "_by_modality", schema=SCHEMA, partitioning=Partitioning()).check_existing(True)
    DeltaFormat(storage, uri + "_by_date", schema=SCHEMA,
                partitioning=Partitioning(run_date="2024-05-07")).check_existing(False)
    with pytest.raises(UserError, match=r"partitioned by \['run_date'\], this job by \['modality'\]"):
        by_date.commit(make_commit(run_id(3), [rows(run_id(3), ["e.jpg"])],
                                   partitioning=Partitioning(column="modality")))


class Boom(Exception):
    pass


def test_rows_that_fail_midway_leave_the_table_as_it_was(target):
    storage, uri = target
    fmt = DeltaFormat(storage, uri)
    fmt.commit(make_commit(run_id(1), [rows(run_id(1), ["a.jpg"])]))

    def failing():
        yield rows(run_id(2), ["b.jpg", "c.jpg"])
        raise Boom("staged chunk unreadable")

    commit = make_commit(run_id(2), [])
    commit.rows = failing
    with pytest.raises(Boom):
        fmt.commit(commit)
    table = DeltaTable(uri, storage_options=storage_options(storage, uri))
    assert table.version() == 0 and uris(table.to_pyarrow_table()) == ["s3://in/a.jpg"]
    assert [r["run_id"] for r in fmt.committed()] == [run_id(1)]

    # Fewer rows than the driver staged: refused, nothing visible.
    short = make_commit(run_id(3), [rows(run_id(3), ["d.jpg"])])
    short.record["rows"] = 2
    with pytest.raises(Exception, match="staged rows number 1"):
        fmt.commit(short)
    assert DeltaTable(uri, storage_options=storage_options(storage, uri)).version() == 0


def test_a_lost_lease_prevents_the_commit(tmp_path):
    class LeaseLost(Exception):
        pass

    fmt = DeltaFormat(Storage(), str(tmp_path / "table"))
    fmt.commit(make_commit(run_id(1), [rows(run_id(1), ["a.jpg"])]))

    def lost():
        raise LeaseLost("another driver holds the output")

    with pytest.raises(LeaseLost):
        fmt.commit(make_commit(run_id(2), [rows(run_id(2), ["b.jpg"])], fence=lost))

    # Lost while the rows streamed: the fence is checked again after the last row, before the log commit.
    checks = []

    def lost_on_second_check():
        checks.append(1)
        if len(checks) > 1:
            raise LeaseLost("lost during the write")

    with pytest.raises(LeaseLost):
        fmt.commit(make_commit(run_id(3), [rows(run_id(3), ["c.jpg"])], fence=lost_on_second_check))
    assert len(checks) == 2
    assert DeltaTable(fmt.uri).version() == 0 and [r["run_id"] for r in fmt.committed()] == [run_id(1)]


def test_compaction_and_vacuum_keep_the_runs(tmp_path):
    fmt = DeltaFormat(Storage(), str(tmp_path / "table"))
    for n in (1, 2, 3):
        fmt.commit(make_commit(run_id(n), [rows(run_id(n), [f"{n}.jpg"])]))
    table = DeltaTable(fmt.uri)
    table.optimize.compact(partition_filters=None)
    table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    assert [r["run_id"] for r in fmt.live()] == [run_id(1), run_id(2), run_id(3)]
    compacted = fmt.data_files()
    assert len(compacted) == 1 and fmt.data_files({run_id(2)}) == compacted  # it holds all three runs' rows
    assert fmt.data_files({"20240101T000000Z-00000000"}) == []
    fmt.commit(make_commit(run_id(4), [rows(run_id(4), ["4.jpg"])]))
    assert len(fmt.data_files({run_id(4)})) == 1 and len(fmt.data_files()) == 2
    assert uris(DeltaTable(fmt.uri).to_pyarrow_table()) == [f"s3://in/{n}.jpg" for n in (1, 2, 3, 4)]


def test_check_existing_refuses_what_it_cannot_append_to(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(rows(run_id(1), ["a.jpg"]), plain / "part-0.parquet")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="no Delta table.*output.format: parquet"):
            DeltaFormat(Storage(), str(plain), schema=SCHEMA).check_existing(overwrite)
    staged_only = tmp_path / "staged"
    (staged_only / "_staging" / "r").mkdir(parents=True)
    pq.write_table(rows(run_id(1), ["a.jpg"]), staged_only / "_staging" / "r" / "chunk.parquet")
    DeltaFormat(Storage(), str(staged_only), schema=SCHEMA).check_existing(False)

    uri = str(tmp_path / "table")
    DeltaFormat(Storage(), uri).commit(make_commit(run_id(1), [rows(run_id(1), ["a.jpg"])]))
    DeltaFormat(Storage(), uri, schema=SCHEMA).check_existing(False)
    other = SCHEMA.remove(SCHEMA.get_field_index("label")).set(1, pa.field("score", pa.string()))
    with pytest.raises(UserError, match=r"column\(s\) score \(the table has float, the job writes string\) differ "
                                        r"in type.*--overwrite"):
        DeltaFormat(Storage(), uri, schema=SCHEMA.set(SCHEMA.get_field_index("score"), pa.field("score", pa.string()))
                    ).check_existing(False)
    with pytest.raises(UserError, match="lacks column"):
        DeltaFormat(Storage(), uri, schema=SCHEMA.append(pa.field("x", pa.int32()))).check_existing(False)
    with pytest.raises(UserError, match="does not write"):
        DeltaFormat(Storage(), uri, schema=other).check_existing(False)
    DeltaFormat(Storage(), uri, schema=other).check_existing(True)


def test_another_tools_overwrite_ends_the_live_runs(tmp_path):
    from deltalake import write_deltalake

    fmt = DeltaFormat(Storage(), str(tmp_path / "table"))
    fmt.commit(make_commit(run_id(1), [rows(run_id(1), ["a.jpg"])]))
    write_deltalake(fmt.uri, rows("theirs", ["x.jpg"]), mode="overwrite")
    assert [r["run_id"] for r in fmt.committed()] == [run_id(1)]
    assert fmt.live() == []
    fmt.commit(make_commit(run_id(2), [rows(run_id(2), ["b.jpg"])]))
    assert [r["run_id"] for r in fmt.live()] == [run_id(2)]



def test_a_checkpoint_every_ten_commits_on_tables_the_pipeline_creates(tmp_path):
    """A commit replays the JSON entries since the last checkpoint: at most 10 here (delta-rs's default is 100).
    A table made otherwise keeps its own interval, even through the pipeline's overwrite."""
    from deltalake import write_deltalake

    fmt = DeltaFormat(Storage(), str(tmp_path / "table"))
    for n in range(12):
        fmt.commit(make_commit(run_id(n), [rows(run_id(n), [f"{n}.jpg"])]))
    checkpoints = sorted(p.name.split(".")[0] for p in (tmp_path / "table" / "_delta_log").glob("*.checkpoint.parquet"))
    assert [int(v) for v in checkpoints] == [9]  # after the 10th commit (versions count from 0)
    fmt.commit(make_commit(run_id(12), [rows(run_id(12), ["x.jpg"])], overwrite=True))
    assert DeltaTable(fmt.uri).metadata().configuration == {"delta.checkpointInterval": "10"}
    assert len(fmt.committed()) == 13

    theirs = str(tmp_path / "theirs")
    write_deltalake(theirs, rows("theirs", ["a.jpg"]), configuration={"delta.checkpointInterval": "50"})
    mine = DeltaFormat(Storage(), theirs)
    mine.commit(make_commit(run_id(1), [rows(run_id(1), ["b.jpg"])]))
    mine.commit(make_commit(run_id(2), [rows(run_id(2), ["c.jpg"])], overwrite=True))
    assert DeltaTable(theirs).metadata().configuration == {"delta.checkpointInterval": "50"}

# --- two commits racing for one version on S3 ------------------------------------------------------------------
# An HTTP proxy in front of the moto server, in its own process (delta-rs holds the GIL in some calls, so a proxy
# thread in this process could not answer them). The first time a client PUTs a Delta log entry, the proxy first
# has another writer commit that same version, as if that writer had won a race our writer lost; it records the
# status of every conditional log PUT it forwards.
RACING_PROXY = r"""
import http.client, json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import pyarrow as pa
from deltalake import CommitProperties, Transaction, write_deltalake

target_port, table_uri, storage_options, run_id, record, rows, status_file = json.loads(sys.argv[1])
raced = threading.Event()

def race():
    write_deltalake(table_uri, pa.Table.from_pylist(rows), mode="append", storage_options=storage_options,
                    commit_properties=CommitProperties(
                        custom_metadata={"pipeline.run_id": run_id, "pipeline.record": json.dumps(record)},
                        app_transactions=[Transaction(app_id="pipeline-run-" + run_id, version=1)]))

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        is_log_put = self.command == "PUT" and "/_delta_log/0" in self.path and self.path.endswith(".json")
        if is_log_put and not raced.is_set():
            raced.set()
            race()
        connection = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
        connection.request(self.command, self.path, body=body,
                           headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
        reply = connection.getresponse()
        data = reply.read()
        if is_log_put and self.headers.get("If-None-Match"):
            with open(status_file, "a") as f:
                f.write(f"{reply.status}\n")
        self.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", reply.getheader("Content-Length") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        connection.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_racing_commits_on_s3_never_take_the_same_version(s3_server, s3_bucket, tmp_path):
    storage, bucket = s3_bucket
    uri = f"s3://{bucket}/raced"
    DeltaFormat(storage, uri).commit(make_commit(run_id(1), [rows(run_id(1), ["a.jpg"])]))

    competitor = make_commit(run_id(2), [rows(run_id(2), ["b.jpg"])])
    record = {**competitor.record, "mode": "append", "committed_at": "2024-05-06T07:08:09.000000+00:00"}
    status_file = tmp_path / "statuses"
    rows_json = [{**row, "last_modified": None} for row in rows(run_id(2), ["b.jpg"]).to_pylist()]
    argument = [s3_server.port, uri, storage_options(storage, uri), run_id(2), record, rows_json, str(status_file)]
    proxy = subprocess.Popen([sys.executable, "-c", RACING_PROXY, json.dumps(argument)], stdout=subprocess.PIPE,
                             text=True)
    try:
        port = int(proxy.stdout.readline())
        ours = DeltaFormat(Storage(endpoint_url=f"http://127.0.0.1:{port}", region=storage.region), uri)
        committed = ours.commit(make_commit(run_id(3), [rows(run_id(3), ["c.jpg"])]))
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)

    # Our first try at version 1 was refused (412: the other writer's version 1 exists); delta-rs retried at 2.
    assert status_file.read_text().split() == ["412", "200"]
    assert committed["version"] == 2 and committed["run_id"] == run_id(3)
    assert [(r["run_id"], r["version"]) for r in DeltaFormat(storage, uri).committed()] == [
        (run_id(1), 0), (run_id(2), 1), (run_id(3), 2)]
    table = DeltaTable(uri, storage_options=storage_options(storage, uri)).to_pyarrow_table()
    assert uris(table) == ["s3://in/a.jpg", "s3://in/b.jpg", "s3://in/c.jpg"]


@pytest.mark.e2e  # `pipeline run` in a subprocess (it stops at the spec, before Ray)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_path_delta_rs_would_read_as_a_url_is_one_line(tmp_path, bucket, where):
    """delta-rs decodes `%25` (and cuts at `?` and `#`): the table would land under another path than the lease,
    staging and history use, and locally every rerun ended in a DeltaError traceback. Refused before anything."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"not read")
    output = str(tmp_path / "my out %25" / "ü") if where == "local" else f"s3://{bucket}/my out %25/ü"
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", "--input", str(tmp_path / "in"), "--output",
                          output, "--format", "delta", "--model", "resnet18"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "output.uri" in lines[0] and "%" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    if where == "s3":
        assert [o for page in Storage.from_env().list_pages(f"s3://{bucket}/") for o in page] == []
