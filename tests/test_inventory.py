"""S3 Inventory as input: deliveries written as AWS lays them out (tests/inventories.py) in CSV, ORC and Parquet,
read as listings (current versions only, keys decoded, under input.prefix), and run through `pipeline run` against
the S3 server: each expected input predicted once, and an incremental run takes only what a newer delivery adds.
A data file unlike its manifest's MD5checksum, or gone or unreadable once the run is under way, ends the run in one
line on either executor, and the next run still predicts each input once; `pipeline runs` counts under the prefix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

from conftest import encode, photo
from inventories import Entry, entry_of, write_inventory
from pipeline.cli.commands import main
from pipeline.io.inventory import PAGE_ROWS, InventoryError, find_manifest, read_inventory
from pipeline.io.storage import Storage
from pipeline.job.config import InputConfig
from pipeline.job.errors import UserError
from pipeline.run.checks import check_input

TESTS = Path(__file__).parent
ODD = "photos/summer 2024/café+crème 100%.png"  # a space, unicode, a `+` and a `%`: CSV spells it encoded
OLD, GONE = Entry("photos/c.jpg", version_id="1", is_latest=False), Entry("photos/gone.jpg", version_id="1",
                                                                          is_latest=False)
MARKER = Entry("photos/gone.jpg", None, None, version_id="2", is_delete_marker=True)
FORMATS = ["CSV", "ORC", "Parquet"]


def keys(manifest: str, prefix: str | None = "photos/") -> list[str]:
    return sorted(o.uri for page in read_inventory(manifest, Storage(), prefix) for o in page)


@pytest.mark.unit
@pytest.mark.parametrize("fmt", FORMATS)
def test_current_objects_under_the_prefix_with_their_versions(tmp_path, fmt):
    """A delete marker and every non-latest version are left out; so is a key outside the prefix and a folder
    marker; ETag, size and last-modified come through as the listing would give them."""
    odd = Entry(ODD, 7, "9bb58f26192e4ba00f01e2e7b136bbd8", version_id="3")
    entries = [Entry("photos/a.jpg"), odd, OLD, Entry("photos/c.jpg", version_id="2"), GONE, MARKER,
               Entry("photos/folder/", 0), Entry("elsewhere/b.jpg")]
    manifest = write_inventory(Storage(), str(tmp_path), "src", entries, fmt)
    assert keys(manifest) == sorted(f"s3://src/{k}" for k in ["photos/a.jpg", ODD, "photos/c.jpg"])
    assert len(keys(manifest, None)) == 4
    found = {o.uri: o for page in read_inventory(manifest, Storage()) for o in page}[f"s3://src/{ODD}"]
    assert (found.size, found.etag, found.last_modified) == (7, odd.etag, odd.last_modified)


@pytest.mark.unit
@pytest.mark.parametrize("space", ["+", "%20"])
def test_csv_keys_are_url_decoded_however_a_space_is_spelt(tmp_path, space):
    """AWS URL-encodes a CSV inventory's keys: `+` or `%20` is a space, `%2B` a plus; ORC and Parquet keys are
    taken as written, so a literal `%2B` in one stays."""
    manifest = write_inventory(Storage(), str(tmp_path), "src", [Entry(ODD), Entry("photos/a%2Bb c.jpg")], "CSV",
                               space=space)
    assert keys(manifest) == sorted([f"s3://src/{ODD}", "s3://src/photos/a%2Bb c.jpg"])
    raw = write_inventory(Storage(), str(tmp_path), "src", [Entry("photos/a%2Bb+c.jpg")], "Parquet", config="pq")
    assert keys(raw) == ["s3://src/photos/a%2Bb+c.jpg"]


@pytest.mark.unit
def test_pages_stream_record_batch_by_record_batch(tmp_path):
    """A delivery of 2,500 keys in 2 data files comes a page of at most PAGE_ROWS at a time."""
    manifest = write_inventory(Storage(), str(tmp_path), "src", [Entry(f"photos/{i:05d}.jpg") for i in range(2500)],
                               "Parquet")
    pages = [len(page) for page in read_inventory(manifest, Storage())]
    assert sum(pages) == 2500 and max(pages) <= PAGE_ROWS and len(pages) >= 4


@pytest.mark.unit
def test_a_config_folder_means_its_latest_complete_delivery(tmp_path):
    """From hive/ (one key a delivery), never a listing of data/; a delivery whose manifest.json is not written yet
    is passed over; a dated folder means its own; a folder of images is no inventory; a copied inventory's data
    files are read where the copy lies."""
    storage = Storage()
    write_inventory(storage, str(tmp_path), "src", [Entry("photos/a.jpg")], "ORC", delivered="2024-05-01T00-00Z")
    newest = write_inventory(storage, str(tmp_path), "src", [Entry("photos/b.jpg")], "ORC",
                             delivered="2024-05-02T00-00Z")
    pending = tmp_path / "inventories/src/daily/hive/dt=2024-05-03-00-00"
    pending.mkdir()
    (pending / "symlink.txt").write_text("s3://dest/inventories/src/daily/data/x.orc\n")
    config = str(tmp_path / "inventories/src/daily")
    assert find_manifest(config + "/", storage) == newest
    assert find_manifest(config + "/2024-05-01T00-00Z", storage) == config + "/2024-05-01T00-00Z/manifest.json"
    (tmp_path / "images").mkdir()
    assert find_manifest(str(tmp_path / "images"), storage) is None
    assert keys(newest) == ["s3://src/photos/b.jpg"]


@pytest.mark.unit
def test_an_unreadable_inventory_is_one_line(storage, bucket, tmp_path, capsys):
    """Missing manifest.json, one that is not JSON, a data file it names that is gone; input.prefix on a folder
    that is no inventory, or on a .csv manifest."""
    root = f"s3://{bucket}"
    manifest = write_inventory(storage, root, "src", [Entry("photos/a.jpg"), Entry("photos/b.jpg")], "CSV")
    check_input(manifest, storage)
    check_input(manifest.rsplit("/", 2)[0], storage, prefix="photos/")
    cases = {f"{root}/inventories/src/daily/2024-06-01T00-00Z/manifest.json": "does not exist"}
    storage.write_bytes(f"{root}/broken/manifest.json", b"{not json")
    cases[f"{root}/broken/manifest.json"] = "is not JSON"
    data_file = json.loads(storage.read_bytes(manifest))["files"][1]["key"]
    storage.delete([f"{root}/{data_file}"])
    cases[manifest] = f"names 1 data file(s) that do not exist, the first {root}/{data_file}"
    for uri, words in cases.items():
        with pytest.raises(UserError) as refused:
            check_input(uri, storage)
        assert str(refused.value).startswith("input.uri: ") and words in str(refused.value), refused.value
        assert "\n" not in str(refused.value)
    code = main(["run", "--input", manifest.rsplit("/", 2)[0], "--output", str(tmp_path), "--model",
                 "counting_model:build"])  # as `pipeline run` says it: one line, exit 2, no traceback
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: input.uri: inventory manifest"), err
    with pytest.raises(UserError, match="input.prefix: 'photos/' applies to an S3 Inventory"):
        check_input(f"{root}/images/", storage, prefix="photos/")
    with pytest.raises(ValueError, match="not to a .parquet/.csv manifest"):
        InputConfig(uri=f"{root}/list.csv", prefix="photos/")


def pipeline(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def pipeline_run(uri: str, output: str, *flags: str) -> dict:
    run = pipeline("run", *flags, "--input", uri, "--prefix", "photos/", "--output", output, "--model",
                   "counting_model:build", "--batch-size", "4")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((Path(output) / "_summary.json").read_text())


def predicted(output: str) -> dict[str, int]:
    rows = duckdb.sql(f"SELECT uri, count(*) AS n, count(error) AS errors FROM read_parquet('{output}/*.parquet') "
                      "GROUP BY uri").fetchall()
    assert all(errors == 0 for _, _, errors in rows), rows
    return {uri: n for uri, n, _ in rows}


@pytest.mark.e2e
def test_each_format_through_pipeline_run_predicts_each_current_object_once(storage, bucket, tmp_path):
    """One delivery written in all three formats, then a newer one adding two keys, each format run once on one
    output: the CSV delivery (its config folder as input.uri) predicts the three current images under the prefix;
    the same delivery as Parquet finds them unchanged (the same URI, ETag, size and last-modified from every
    format); the ORC config folder's newest delivery predicts just the two keys it adds."""
    source, dest = bucket, f"{bucket}-inventory"
    storage.s3_client.create_bucket(Bucket=dest)
    current = ["photos/a.jpg", ODD, "photos/c.jpg", "elsewhere/outside.jpg", "photos/notes.txt"]
    added = ["photos/new 1.jpg", "photos/ü/new+2.png"]
    for i, key in enumerate(current + added):
        storage.s3_client.put_object(Bucket=source, Key=key, Body=encode(photo(32, 24, seed=i), "PNG"))
    day1 = [entry_of(storage, source, k, version_id="v") for k in current] + [OLD, GONE, MARKER]
    day2 = day1 + [entry_of(storage, source, k) for k in added]
    for fmt in FORMATS:
        write_inventory(storage, f"s3://{dest}", source, day1, fmt, config=fmt.lower())
    write_inventory(storage, f"s3://{dest}", source, day2, "ORC", config="orc", delivered="2024-05-02T00-00Z")
    output, expected = str(tmp_path / "out"), {f"s3://{source}/{k}" for k in ["photos/a.jpg", ODD, "photos/c.jpg"]}

    first = pipeline_run(f"s3://{dest}/inventories/{source}/csv/", output)
    assert (first["predicted"], first["skipped_by_extension"]) == (3, 1)
    assert predicted(output) == dict.fromkeys(expected, 1)

    again = pipeline_run(f"s3://{dest}/inventories/{source}/parquet/2024-05-01T00-00Z/manifest.json", output)
    assert (again["inputs"], again["already_done"]) == (0, 3)

    newer = pipeline_run(f"s3://{dest}/inventories/{source}/orc", output)
    assert (newer["inputs"], newer["already_done"]) == (2, 3)
    assert predicted(output) == dict.fromkeys(expected | {f"s3://{source}/{k}" for k in added}, 1)


def data_files(storage: Storage, manifest: str) -> list[str]:
    root = manifest.split("/inventories/")[0]
    return [f"{root}/{f['key']}" for f in json.loads(storage.read_bytes(manifest))["files"]]


@pytest.mark.unit
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_data_file_unlike_its_manifest_lists_none_of_its_rows(tmp_path, fmt):
    """A data file replaced by another (here: the first one's bytes) or cut short is found out by its MD5checksum
    (of the bytes as stored, a CSV's gzip) before any of its rows is listed: the first file's keys come once, then
    one line naming the second. A manifest without MD5checksum (a tool other than S3 wrote it) is read unverified:
    the replaced file's keys come twice; cut short, or deleted, it is still one line naming it."""
    storage = Storage()
    entries = [Entry(f"photos/{i}.jpg") for i in range(6)]
    manifest = write_inventory(storage, str(tmp_path), "src", entries, fmt)
    first, second = data_files(storage, manifest)
    good = storage.read_bytes(second)
    for bad in (storage.read_bytes(first), good[:len(good) // 2]):
        storage.write_bytes(second, bad)
        listed = []
        with pytest.raises(InventoryError) as refused:
            for page in read_inventory(manifest, storage):
                listed += [o.uri for o in page]
        assert sorted(listed) == [f"s3://src/photos/{i}.jpg" for i in (0, 2, 4)]
        assert str(refused.value).startswith(f"inventory data file {second} does not match its manifest ("), refused
        assert "restore it, or run on another delivery" in str(refused.value) and "\n" not in str(refused.value)
    unverified = json.loads(storage.read_bytes(manifest))
    for listed_file in unverified["files"]:
        del listed_file["MD5checksum"]
    storage.write_bytes(manifest, json.dumps(unverified).encode())
    storage.write_bytes(second, storage.read_bytes(first))
    assert keys(manifest) == sorted(2 * [f"s3://src/photos/{i}.jpg" for i in (0, 2, 4)])
    storage.write_bytes(second, good[:len(good) // 2])
    with pytest.raises(InventoryError, match=f"inventory data file {second} cannot be read"):
        keys(manifest)
    storage.delete([second])
    with pytest.raises(InventoryError, match=f"inventory data file {second} no longer exists"):
        keys(manifest)


def spec_file(tmp_path: Path, uri: str, output: str) -> str:
    """A job staging every batch of 4 rows, so an attempt that fails has staged some."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": {"uri": uri, "prefix": "photos/"},
                                    "output": {"uri": output, "checkpoint_rows": 4},
                                    "model": {"source": "torchvision", "name": "counting_model:build"},
                                    "compute": {"batch_size": 4}}))
    return str(path)


@pytest.mark.e2e
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_data_file_failing_mid_run_ends_it_in_one_line_and_the_rerun_predicts_each_input_once(
        storage, bucket, tmp_path, executor):
    """After the manifest and its data files passed the checks, the second data file is replaced, then (its bytes
    back) unreadable (moved to GLACIER: HEAD answers, GET is refused): each run ends with exit 1 and one line naming
    it; rows the first file gave stay staged. Once the file is restored, `pipeline runs` counts the resume under the
    prefix, and the next run predicts each of the 40 images once."""
    source, dest = bucket, f"{bucket}-inventory"
    storage.s3_client.create_bucket(Bucket=dest)
    images = [f"photos/{i:02d}.png" for i in range(40)]
    for i, key in enumerate(images):
        storage.s3_client.put_object(Bucket=source, Key=key, Body=encode(photo(32, 24, seed=i), "PNG"))
    entries = [entry_of(storage, source, k) for k in images] + [Entry(f"elsewhere/{i}.png") for i in range(10)]
    manifest = write_inventory(storage, f"s3://{dest}", source, entries, "CSV", files=2)  # 20 images in each
    second = data_files(storage, manifest)[1]
    bucket_key = second.removeprefix("s3://").split("/", 1)
    good = storage.read_bytes(second)
    output = str(tmp_path / "out")
    job = ["run", spec_file(tmp_path, manifest.rsplit("/", 2)[0], output), "--executor", executor]

    # On Ray both failures take the same way out of the listing task: the second is tried on the local executor only.
    for damage in ("replaced", "glacier") if executor == "local" else ("replaced",):
        if damage == "replaced":
            storage.write_bytes(second, storage.read_bytes(data_files(storage, manifest)[0]))
        else:
            storage.s3_client.put_object(Bucket=bucket_key[0], Key=bucket_key[1], Body=good, StorageClass="GLACIER")
        failed = pipeline(*job)
        said = failed.stderr.strip().splitlines()
        why = "does not match its manifest" if damage == "replaced" else "cannot be read"
        assert failed.returncode == 1 and said[-1].startswith(f"error: input.uri: inventory data file {second} {why}"), \
            failed.stdout[-3000:] + failed.stderr[-3000:]
        assert "rerunning the job resumes after them" in said[-1] and "Traceback" not in failed.stderr, failed.stderr
        assert not (Path(output) / "_summary.json").exists() or json.loads(
            (Path(output) / "_summary.json").read_text())["committed_rows"] == 0

    storage.s3_client.put_object(Bucket=bucket_key[0], Key=bucket_key[1], Body=good)
    runs = pipeline("runs", output)
    line = next((x for x in runs.stdout.splitlines() if x.startswith("Rerunning the job of run")), runs.stdout)
    pending, staged = (int(n.replace(",", "")) for n in (line.split("inputs pending")[0].split()[-1],
                                                           line.split(" staged and not redone")[0].split()[-1]))
    assert pending + staged == 40 and (staged > 0 or executor == "ray"), runs.stdout
    done = pipeline(*job)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((Path(output) / "_summary.json").read_text())
    assert summary["resumed"] == staged and summary["committed_rows"] == 40, summary
    assert predicted(output) == {f"s3://{source}/{k}": 1 for k in images}


@pytest.mark.e2e
def test_pipeline_runs_estimates_the_next_run_under_the_prefix(storage, bucket, tmp_path):
    """The next run of an inventory job (its config folder and input.prefix in the run's record) is counted as the
    job lists: the newest delivery, keys under the prefix, by extension; keys outside the prefix are not counted."""
    source, dest = bucket, f"{bucket}-inventory"
    storage.s3_client.create_bucket(Bucket=dest)
    first = ["photos/a.png", "photos/b.png", "elsewhere/c.png"]
    added = ["photos/d.png", "photos/e.png", "photos/notes.txt", "elsewhere/f.png", "elsewhere/g.png"]
    for i, key in enumerate(first + added):
        storage.s3_client.put_object(Bucket=source, Key=key, Body=encode(photo(32, 24, seed=i), "PNG"))
    day1 = [entry_of(storage, source, k) for k in first]
    write_inventory(storage, f"s3://{dest}", source, day1, "Parquet")
    config, output = f"s3://{dest}/inventories/{source}/daily/", str(tmp_path / "out")
    assert pipeline_run(config, output, "--executor", "local")["predicted"] == 2
    write_inventory(storage, f"s3://{dest}", source, day1 + [entry_of(storage, source, k) for k in added], "Parquet",
                    delivered="2024-05-02T00-00Z")
    runs = pipeline("runs", output)
    assert runs.returncode == 0, runs.stderr
    assert ": 2 new, 0 changed or to retry, 2 unchanged and skipped; 1 other files not listed" in runs.stdout, \
        runs.stdout
