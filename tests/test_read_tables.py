"""An output is read as its readers read it: `pipeline report`, `pipeline runs` and the next incremental run see
a partition column that lives only in folder names or the Delta log, and do not see rows that another engine
deleted: by the format's own library (files rewritten) or as Spark's merge-on-read deletes (a Delta deletion
vector, an Iceberg position delete file). Rows are read back by DuckDB, which applies both.

One real `pipeline run` per format (a subprocess, as a user runs it) writes a label-partitioned output on the
test S3 server; the tests of a format share it, and the delete test runs after the read-only one (file order).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import encode, ensure_bucket, photo
from readers import duckdb_connection
from pipeline.io.storage import Storage
from pipeline.output.delta import storage_options

TESTS = Path(__file__).parent
BUCKET = "read-tables"
CATALOG = "tests"  # an Iceberg SQL catalog files its tables under the catalog's name
# counting_model's untrained net labels these three colours "cat" and the other two inputs "dog".
IMAGES = {"photo0.jpg": photo(seed=0), "photo1.jpg": photo(seed=1), "black.jpg": Image.new("RGB", (96, 72), (5, 5, 5)),
          "green.jpg": Image.new("RGB", (96, 72), (20, 200, 20)), "white.jpg": Image.new("RGB", (96, 72), (250,) * 3)}
BROKEN = "notes.jpg"  # a text file: an error row, whose label is null (the partition __HIVE_DEFAULT_PARTITION__)


@dataclass
class Written:
    """A format's label-partitioned output, as the first run left it."""
    fmt: str
    output: str
    inputs: list[str]
    spec: str
    catalog_db: str
    first_run: subprocess.CompletedProcess

    def read_args(self) -> list[str]:
        """What `pipeline report` and `pipeline runs` need besides the output's URI."""
        if self.fmt != "iceberg":
            return []
        return ["--catalog", "type=sql", "--catalog", f"uri=sqlite:///{self.catalog_db}", "--catalog",
                f"name={CATALOG}", "--table", "default.predictions"]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def written(s3_server, tmp_path_factory):
    """One first run per format, made when a test first asks for it."""
    storage = Storage.from_env()
    ensure_bucket(storage, BUCKET)
    runs: dict[str, Written] = {}

    def write(fmt: str) -> Written:
        if fmt not in runs:
            runs[fmt] = first_run(storage, fmt, tmp_path_factory.mktemp(f"read-{fmt}"))
        return runs[fmt]

    return write


def first_run(storage: Storage, fmt: str, folder: Path) -> Written:
    prefix = f"{fmt}/in/"
    objects = {name: encode(image, "JPEG") for name, image in IMAGES.items()} | {BROKEN: b"not an image at all"}
    for name, data in objects.items():
        storage.s3_client.put_object(Bucket=BUCKET, Key=prefix + name, Body=data)
    (folder / "labels.txt").write_text("cat\ndog\nbird\n")
    catalog_db = str(folder / "catalog.db")
    output = {"format": fmt, "partitioning": "label", "checkpoint_rows": 4}
    if fmt == "iceberg":
        output["catalog"] = {"type": "sql", "uri": f"sqlite:///{catalog_db}", "name": CATALOG}
    spec = folder / "job.json"
    spec.write_text(json.dumps({
        "input": {"uri": f"s3://{BUCKET}/{prefix}"}, "output": {"uri": f"s3://{BUCKET}/{fmt}/out", **output},
        "model": {"name": "counting_model:build", "labels": str(folder / "labels.txt")}}))
    run = cli("run", str(spec))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return Written(fmt, f"s3://{BUCKET}/{fmt}/out", [f"s3://{BUCKET}/{prefix}{n}" for n in objects], str(spec),
                   catalog_db, run)


def table_rows(storage: Storage, w: Written) -> list[dict]:
    """The output's rows as the format's own reader returns them (uri, label, run_id)."""
    columns = ["uri", "label", "run_id"]
    if w.fmt == "parquet":
        fs, path = storage.fs(w.output)
        fs.invalidate_cache()  # s3fs caches listings; the output changed in another process
        dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        return dataset.to_table(columns=columns).to_pylist()
    if w.fmt == "delta":  # DuckDB's delta_scan, which applies deletion vectors (delta-rs's pyarrow dataset refuses them)
        con = duckdb_connection(storage, "delta")
        return [dict(zip(columns, row)) for row in
                con.execute(f"SELECT {', '.join(columns)} FROM delta_scan('{w.output}')").fetchall()]
    # DuckDB's iceberg_scan, which applies position deletes
    con = duckdb_connection(storage, "iceberg")
    metadata = iceberg_table(storage, w).metadata_location
    return [dict(zip(columns, row)) for row in
            con.execute(f"SELECT {', '.join(columns)} FROM iceberg_scan('{metadata}')").fetchall()]


def iceberg_table(storage: Storage, w: Written):
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog(CATALOG, type="sql", uri=f"sqlite:///{w.catalog_db}", **{
        "py-io-impl": "pyiceberg.io.fsspec.FsspecFileIO", "s3.endpoint": storage.endpoint_url,
        "s3.region": storage.region})
    return catalog.load_table("default.predictions")


def report(w: Written, page: Path) -> str:
    done = cli("report", w.output, *w.read_args(), "-o", str(page))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return page.read_text()


def next_run_line(w: Written) -> str:
    done = cli("runs", w.output, *w.read_args())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return next(line for line in done.stdout.splitlines() if line.startswith("Next run of "))


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_a_label_partitioned_output_is_reported_and_counted_with_its_labels(fmt, written, tmp_path):
    w = written(fmt)
    storage = Storage.from_env()
    rows = table_rows(storage, w)
    labels = {r["uri"].rsplit("/", 1)[1]: r["label"] for r in rows}
    assert sorted(labels) == sorted(u.rsplit("/", 1)[1] for u in w.inputs)
    assert labels[BROKEN] is None and set(labels.values()) == {"cat", "dog", None}  # two partitions and the null one
    if fmt != "iceberg":  # the label lives in folder names only (Iceberg keeps it in its data files too)
        assert {path.split("/")[-2] for path in partition_files(storage, w)} == {
            "label=cat", "label=dog", "label=__HIVE_DEFAULT_PARTITION__"}

    page = report(w, tmp_path / "report.html")
    assert "No predictions in this run" not in page
    for label in ("cat", "dog"):  # a contact sheet group per label, each input in it
        assert re.search(rf"<h3>\s*{label}\b", page)
    for name in IMAGES:
        assert name in page
    # All six inputs are done: the next run predicts none of them.
    assert ": 0 new, 0 changed or to retry, 6 unchanged and skipped" in next_run_line(w)


def partition_files(storage: Storage, w: Written) -> list[str]:
    fs, path = storage.fs(w.output)
    fs.invalidate_cache()
    return [p for p in fs.find(path) if p.endswith(".parquet") and "/_staging/" not in p]


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_rows_another_engine_deleted_are_gone_and_redone(fmt, written, tmp_path):
    """One row deleted by the format's library (delta-rs's `DeltaTable.delete`, pyiceberg's `Table.delete`: both
    rewrite the row's file), another as Spark deletes with merge-on-read, which neither library writes (1.6, 0.12):
    a Delta deletion vector, an Iceberg position delete file."""
    w = written(fmt)
    storage = Storage.from_env()
    by_library = next(u for u in w.inputs if u.endswith("/green.jpg"))  # a "cat": its partition keeps another row
    by_position = next(u for u in w.inputs if u.endswith("/photo0.jpg"))
    gone = {by_library: "cat", by_position: "dog"}
    if fmt == "delta":
        from deltalake import DeltaTable

        table = DeltaTable(w.output, storage_options=storage_options(storage, w.output))
        assert table.delete(f"uri = '{by_library}'")["num_deleted_rows"] == 1
        delete_by_deletion_vector(storage, w.output, by_position)
    else:
        from pyiceberg.expressions import EqualTo

        iceberg_table(storage, w).delete(EqualTo("uri", by_library))
        delete_by_position(iceberg_table(storage, w), by_position)
    assert not set(gone) & {r["uri"] for r in table_rows(storage, w)}

    page = report(w, tmp_path / "report.html")
    names = {uri.rsplit("/", 1)[1] for uri in gone}
    assert not [name for name in names if name in page]
    assert all(name in page for name in IMAGES if name not in names)
    assert f": {len(gone)} new, 0 changed or to retry, {6 - len(gone)} unchanged and skipped" in next_run_line(w)

    rerun = cli("run", w.spec)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    rows = table_rows(storage, w)
    assert sorted(r["uri"] for r in rows) == sorted(w.inputs)  # one row per input, the deleted ones again
    first_run_id = next(r["run_id"] for r in rows if r["uri"] not in gone)
    assert {r["uri"]: r["label"] for r in rows if r["run_id"] != first_run_id} == gone


def delete_by_position(table, uri: str) -> None:
    """Delete `uri`'s row as Spark does in merge-on-read mode: a position delete file (file_path, pos) in a delete
    manifest of a new snapshot (Iceberg spec, "Position Delete Files"); pyiceberg writes the files."""
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
    from pyiceberg.table.snapshots import Operation

    for task in table.scan().plan_files():
        with table.io.new_input(task.file.file_path).open() as f:
            uris = pq.read_table(f, columns=["uri"])["uri"].to_pylist()
        if uri in uris:
            break
    else:
        raise AssertionError(f"{uri} is in no live data file")
    deletes = pa.table({"file_path": [task.file.file_path], "pos": [uris.index(uri)]}, schema=pa.schema([
        pa.field("file_path", pa.string(), False, metadata={"PARQUET:field_id": "2147483546"}),
        pa.field("pos", pa.int64(), False, metadata={"PARQUET:field_id": "2147483545"})]))
    path = f"{table.location()}/data/deletes-{uuid.uuid4()}.parquet"
    with table.io.new_output(path).create() as out:
        pq.write_table(deletes, out)
    delete_file = DataFile.from_args(content=DataFileContent.POSITION_DELETES, file_path=path,
                                     file_format=FileFormat.PARQUET, partition=task.file.partition, record_count=1,
                                     file_size_in_bytes=len(table.io.new_input(path)))
    delete_file.spec_id = task.file.spec_id
    with table.transaction() as tx:
        producer = _position_deletes_producer()(Operation.DELETE, tx, tx._table.io)
        producer.append_data_file(delete_file)
        producer.commit()


def _position_deletes_producer():
    """pyiceberg's fast append, writing its added files into a delete manifest instead of a data manifest."""
    from pyiceberg.manifest import ManifestContent, ManifestEntry, ManifestEntryStatus, ManifestWriterV2
    from pyiceberg.table.update.snapshot import _FastAppendFiles

    class DeleteManifestWriter(ManifestWriterV2):
        def content(self) -> ManifestContent:
            return ManifestContent.DELETES

        @property
        def _meta(self) -> dict[str, str]:
            return {**super()._meta, "content": "deletes"}

    class AddPositionDeletes(_FastAppendFiles):
        def _manifests(self):
            writer = DeleteManifestWriter(self._transaction.table_metadata.spec(), self.schema(),
                                          self.new_manifest_output(), self._snapshot_id, self._compression)
            with writer:
                for delete_file in self._added_data_files:
                    writer.add(ManifestEntry.from_args(status=ManifestEntryStatus.ADDED, snapshot_id=self._snapshot_id,
                                                       sequence_number=None, file_sequence_number=None,
                                                       data_file=delete_file))
            return [writer.to_manifest_file()] + self._existing_manifests()

    return AddPositionDeletes


Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def delete_by_deletion_vector(storage: Storage, output: str, uri: str) -> None:
    """Delete `uri`'s row as Spark does with deletion vectors on: one commit that removes its file and adds it
    back with an inline deletion vector marking the row's position (Delta protocol, "Deletion Vectors")."""
    from deltalake import DeltaTable, TableFeatures

    options = storage_options(storage, output)
    DeltaTable(output, storage_options=options).alter.add_feature(TableFeatures.DeletionVectors,
                                                                  allow_protocol_versions_increase=True)
    version = DeltaTable(output, storage_options=options).version()
    fs, root = storage.fs(output)
    fs.invalidate_cache()
    for add in live_adds(fs, root):
        with fs.open(f"{root}/{add['path']}", "rb") as f:
            uris = pq.read_table(f, columns=["uri"])["uri"].to_pylist()
        if uri in uris:
            break
    else:
        raise AssertionError(f"{uri} is in no live file of {output}")
    vector = roaring_bitmap_array([uris.index(uri)])
    now = int(time.time() * 1000)
    commit = [{"commitInfo": {"timestamp": now, "operation": "DELETE",
                              "operationParameters": {"predicate": f"uri = '{uri}'"}}},
              {"remove": {"path": add["path"], "deletionTimestamp": now, "dataChange": True,
                          "extendedFileMetadata": True, "partitionValues": add["partitionValues"], "size": add["size"]}},
              {"add": {**add, "modificationTime": now, "dataChange": True, "deletionVector": {
                  "storageType": "i", "pathOrInlineDv": z85(vector), "sizeInBytes": len(vector), "cardinality": 1}}}]
    bucket, _, prefix = root.partition("/")
    storage.s3_client.put_object(Bucket=bucket, Key=f"{prefix}/_delta_log/{version + 1:020d}.json", IfNoneMatch="*",
                                 Body="\n".join(json.dumps(action) for action in commit).encode())


def live_adds(fs, root: str) -> list[dict]:
    """The add actions of the table's current version, by replaying its JSON log (no checkpoint this young)."""
    live: dict[str, dict] = {}
    for entry in sorted(p for p in fs.ls(f"{root}/_delta_log", detail=False) if p.endswith(".json")):
        for line in fs.cat(entry).decode().splitlines():
            action = json.loads(line)
            if "add" in action:
                live[action["add"]["path"]] = action["add"]
            elif "remove" in action:
                live.pop(action["remove"]["path"], None)
    return list(live.values())


def roaring_bitmap_array(rows: list[int]) -> bytes:
    """A deletion vector's bytes: the magic number, then a RoaringBitmapArray in its portable serialization (one
    32-bit bitmap: the cookie without run containers, one array container of the row positions)."""
    rows = sorted(rows)
    bitmap = (struct.pack("<II", 12346, 1) + struct.pack("<HH", 0, len(rows) - 1) + struct.pack("<I", 16)
              + b"".join(struct.pack("<H", r) for r in rows))
    return struct.pack("<iqi", 1681511377, 1, 0) + bitmap


def z85(data: bytes) -> str:
    """Z85 (Delta's Base85 for inline deletion vectors), zero-padded to whole 4-byte groups."""
    data += b"\0" * (-len(data) % 4)
    words = (int.from_bytes(data[i:i + 4], "big") for i in range(0, len(data), 4))
    return "".join(Z85[word // 85 ** k % 85] for word in words for k in range(4, -1, -1))


def test_partition_values_read_back_as_written(tmp_path):
    """Values a folder name must escape (hive.escape, as Spark does), digits that must stay text, null and empty
    (both Hive's default partition), non-ASCII: each comes back as its row held it."""
    from pipeline.output.hive import split_by_partition
    from pipeline.output.rows import FolderRows

    labels = ["a/b", "100%", "x=y", "c+d e", "ü", "007", None, "", "it's", "q?#"]
    rows = pa.table({"uri": [f"u{i}" for i in range(len(labels))], "label": labels})
    files = []
    for n, (folder, part) in enumerate(split_by_partition(rows, None, "label")):
        (tmp_path / folder).mkdir(exist_ok=True)
        files.append(str(tmp_path / folder / f"part-{n}.parquet"))
        pq.write_table(part, files[-1])
    read = [b for b in FolderRows(str(tmp_path), tuple(files)).batches(Storage(), ["uri", "label"])]
    got = {u: label for b in read for u, label in zip(b["uri"].to_pylist(), b["label"].to_pylist())}
    assert got == {f"u{i}": label or None for i, label in enumerate(labels)}
