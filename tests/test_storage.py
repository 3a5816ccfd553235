"""Storage: atomic visibility of written files, even when the writer is killed mid-write."""

import os
import signal
import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.io.storage import Storage


def test_failed_write_leaves_nothing(tmp_path):
    def explode(f):
        f.write(b"PAR1 half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        Storage().write_atomic(str(tmp_path / "part-0.parquet"), explode)
    assert os.listdir(tmp_path) == []


KILLED_WRITER = """
import sys, time
import pyarrow as pa, pyarrow.parquet as pq
from pipeline.io.storage import Storage

def slow(f):
    pq.write_table(pa.table({"x": list(range(1000))}), f)
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

Storage().write_atomic(sys.argv[1], slow)
"""


def test_killed_writer_is_invisible_to_readers(tmp_path):
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "part-committed.parquet")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "part-dying.parquet")],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    leftovers = [name for name in os.listdir(tmp_path) if name != "part-committed.parquet"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".") and not leftovers[0].endswith(".parquet")
    assert pads.dataset(str(tmp_path), format="parquet").to_table().num_rows == 3
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/**/*.parquet')").fetchall()[0][0] == 3
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/*.parquet')").fetchall()[0][0] == 3


ODD_NAMES = ["a folder/ünïcode 名前 #1.png", "glob[1].png", "star*.png", "what?.png", "plus+and%20.png",
             "emoji 📷.png", "semi;colon,comma'quote.png"]


def test_odd_s3_keys_round_trip(storage, bucket):
    uris = [f"s3://{bucket}/{name}" for name in ODD_NAMES]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, f"payload {i}".encode())
    listed = [o.uri for page in storage.list_pages(f"s3://{bucket}/") for o in page]
    assert sorted(listed) == sorted(uris)
    fetched = storage.read_many([*uris, f"s3://{bucket}/missing.png"])
    assert fetched[:-1] == [f"payload {i}".encode() for i in range(len(uris))]
    assert isinstance(fetched[-1], FileNotFoundError)


def test_odd_local_names_round_trip(tmp_path):
    paths = [tmp_path / name for name in ODD_NAMES]
    for i, path in enumerate(paths):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(f"payload {i}".encode())
    listed = [o.uri for page in Storage().list_pages(str(tmp_path)) for o in page]
    assert sorted(listed) == sorted(str(p) for p in paths)
    assert Storage().read_many([str(p) for p in paths]) == [f"payload {i}".encode() for i in range(len(paths))]


def test_s3_prefix_is_a_folder(storage, bucket):
    for key in ("images/a.jpg", "images/sub/b.jpg", "images2/c.jpg"):
        storage.write_bytes(f"s3://{bucket}/{key}", b"x")
    for prefix in (f"s3://{bucket}/images", f"s3://{bucket}/images/"):
        listed = sorted(o.uri.rsplit("/", 2)[-2:][-1] for page in storage.list_pages(prefix) for o in page)
        assert listed == ["a.jpg", "b.jpg"]
    assert len([o for page in storage.list_pages(f"s3://{bucket}") for o in page]) == 3


def test_local_walk_survives_a_symlink_loop(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)
    listed = [o.uri for page in Storage().list_pages(str(tmp_path)) for o in page]
    assert listed == [str(tmp_path / "a" / "x.jpg")]


def test_spec_endpoint_wins_over_the_environment(s3_server, bucket, monkeypatch):
    """storage.endpoint_url in the job spec is used even when AWS_ENDPOINT_URL points elsewhere."""
    from pipeline.run.checks import check_bucket

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    storage = Storage.from_env(endpoint_url=s3_server.endpoint_url)
    check_bucket("input.uri", f"s3://{bucket}/x", storage)  # raises UserError if it went to port 9
    storage.write_bytes(f"s3://{bucket}/x/a.bin", b"1")
    assert storage.read_many([f"s3://{bucket}/x/a.bin"]) == [b"1"]


def test_delete_takes_keys_literally(storage, bucket):
    keep, drop = f"s3://{bucket}/outv/part-1.parquet", f"s3://{bucket}/out[v]/part-1.parquet"
    storage.write_bytes(keep, b"keep")
    storage.write_bytes(drop, b"drop")
    storage.delete([drop])
    assert [o.uri for page in storage.list_pages(f"s3://{bucket}/") for o in page] == [keep]


def test_failed_s3_write_leaves_nothing(storage, bucket):
    def explode(f):
        f.write(b"PAR1 half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.write_atomic(f"s3://{bucket}/out/part-0.parquet", explode)
    assert not storage.exists(f"s3://{bucket}/out/part-0.parquet")


def test_undecodable_local_name_is_still_listed(tmp_path):
    os.mkdir(os.fsencode(str(tmp_path / "in")))
    with open(os.path.join(os.fsencode(str(tmp_path / "in")), b"caf\xe9.jpg"), "wb") as f:
        f.write(b"x")
    listed = [o.uri for page in Storage().list_pages(str(tmp_path / "in")) for o in page]
    assert listed == [str(tmp_path / "in" / "caf\ufffd.jpg")]
