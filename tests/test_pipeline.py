"""End to end on the real parts: moto's S3 on loopback, a local Ray, Parquet read back by pyarrow and DuckDB. What
does not depend on the engine (manifests, limits, overwrite, an empty input) runs on the default local executor."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import encode, photo, photo_jpeg
from pipeline.cli.commands import main
from pipeline.decode.image import Decoder
from pipeline.io.listing import InputListing
from pipeline.io.storage import Storage
from pipeline.models.resolve import build_model, resolve_model
from pipeline.local.executor import run_locally
from pipeline.ray.executor import run_on_ray
from pipeline.job.config import load_job
from pipeline.job.errors import JobStopped

pytestmark = pytest.mark.usefixtures("ray_session")


def good_images() -> dict[str, bytes]:
    """One of each format and odd mode, with spaces and unicode in some names."""
    base = photo(120, 90, seed=1)
    sixteen_bit = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    return {
        "plain.jpg": encode(base, "JPEG", quality=90),
        "UPPER CASE.JPG": encode(photo(seed=2), "JPEG"),
        "folder with space/ünïcödé 名前.png": encode(photo(seed=3), "PNG"),
        "nested/deeper/photo.webp": encode(photo(seed=4), "WEBP"),
        "animated.gif": encode(photo(seed=5).convert("P"), "GIF", save_all=True,
                               append_images=[photo(seed=6).convert("P")]),
        "sixteen-bit.tiff": encode(sixteen_bit, "TIFF"),
        "cmyk.jpg": encode(photo(seed=7).convert("CMYK"), "JPEG"),
        "rgba.png": encode(photo(seed=8).convert("RGBA"), "PNG"),
        "palette.png": encode(photo(seed=9).convert("P"), "PNG"),
        "bilevel.png": encode(photo(seed=10).convert("1"), "PNG"),
        "grey-alpha.png": encode(photo(seed=11).convert("LA"), "PNG"),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected error_type)."""
    jpeg = encode(photo(200, 150), "JPEG")
    return {
        "empty.jpg": (b"", "decode.empty"),
        "text-named-as.png": (b"hello, I am not an image\n", "decode.not_an_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "decode.truncated"),
        "garbled.jpg": (jpeg[:20] + bytes(range(256)) * 4, "decode.not_an_image"),
    }


def put_objects(storage: Storage, bucket: str, prefix: str, objects: dict[str, bytes]) -> None:
    client = storage.s3_client
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=prefix + kv[0], Body=kv[1]),
                      objects.items()))


def write_files(folder, objects: dict[str, bytes]) -> None:
    for name, data in objects.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def job(classifier_files, input_uri: str, output_uri: str, **sections):
    cfg = load_job(None, {"input": input_uri, "output": output_uri, **classifier_files})
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def read_back(output_uri: str) -> pa.Table:
    """Plain pyarrow.dataset, as a user would (pyarrow's own S3 client honours AWS_ENDPOINT_URL)."""
    return pads.dataset(output_uri, format="parquet").to_table()


def test_s3_round_trip_mixed_bucket(storage, bucket, classifier_files):
    good, bad = good_images(), bad_images()
    put_objects(storage, bucket, "in/", {**good, **{k: v for k, (v, _) in bad.items()},
                                         "notes.txt": b"not listed: extension filter"})
    summary = run_on_ray(job(classifier_files, f"s3://{bucket}/in/", f"s3://{bucket}/out/"), out=io.StringIO())

    table = read_back(f"s3://{bucket}/out/")
    rows = {r["uri"]: r for r in table.to_pylist()}
    expected = {f"s3://{bucket}/in/{name}" for name in [*good, *bad]}
    assert table.num_rows == len(expected) and set(rows) == expected  # each input exactly once
    for name in good:
        row = rows[f"s3://{bucket}/in/{name}"]
        assert row["error"] is None, (name, row["error"])
        assert row["label"] in {"cat", "dog", "bird", "fish"} and 0 < row["score"] <= 1
        assert len(row["topk_labels"]) == 4 and row["topk_labels"][0] == row["label"]
        assert row["etag"] and row["size"] == len(good[name]) and row["last_modified"] is not None
    for name, (_, error_type) in bad.items():
        row = rows[f"s3://{bucket}/in/{name}"]
        assert row["error_type"] == error_type and row["error"].startswith("decode: ")
        assert row["label"] is None and row["score"] is None
    assert {r["run_id"] for r in rows.values()} == {summary.run_id}
    assert {r["weights"] for r in rows.values()} == {summary.weights} and summary.weights.startswith("sha256:")
    assert summary.skipped_by_extension == 1
    assert (summary.inputs, summary.predicted, summary.errors) == (len(expected), len(good), len(bad))
    written = json.loads(storage.read_bytes(f"s3://{bucket}/out/_summary.json"))
    assert written["errors_by_type"] == dict(Counter(t for _, t in bad.values()))


def test_local_round_trip_readers_see_exactly_the_rows(tmp_path, classifier_files):
    write_files(tmp_path / "in", {**good_images(), **{k: v for k, (v, _) in bad_images().items()}})
    out = tmp_path / "out"
    cfg = job(classifier_files, str(tmp_path / "in"), str(out), output={"rows_per_file": 4})
    summary = run_on_ray(cfg, out=io.StringIO())

    n = len(good_images()) + len(bad_images())
    assert len(summary.files) == -(-n // 4)  # several files, so the globs below really glob
    by_duckdb = duckdb.sql(f"SELECT count(*), count(DISTINCT uri) FROM read_parquet('{out}/**/*.parquet')").fetchall()[0]
    assert by_duckdb == (n, n)
    assert read_back(str(out)).num_rows == n
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporaries left behind
    schema = pq.read_schema(summary.files[0]["uri"])
    assert schema.field("topk_scores").type == pa.list_(pa.float32())
    assert pq.ParquetFile(summary.files[0]["uri"]).metadata.row_group(0).column(0).compression == "ZSTD"
    # Where the run's time went, as the README promises: each step once; the driver's own in the order it
    # reaches them (the first model batch is timed by the ledger actor, in its own process).
    timeline = json.loads((out / "_summary.json").read_text())["timeline_s"]
    driver_steps = ["run_job", "storage_checked", "ray_ready", "model_checked", "output_opened", "first_row",
                    "last_row", "committed"]
    assert set(timeline) == {*driver_steps, "first_model_batch"}
    assert [timeline[step] for step in driver_steps] == sorted(timeline[step] for step in driver_steps)
    assert timeline["output_opened"] <= timeline["first_model_batch"] <= timeline["last_row"] + 5
    assert 0 < summary.model_busy <= 1


def test_predictions_equal_a_direct_model_call(tmp_path, classifier_files):
    images = {f"img{i}.png": encode(photo(60 + 37 * i, 200 - 23 * i, seed=20 + i), "PNG") for i in range(6)}
    write_files(tmp_path / "in", images)
    cfg = job(classifier_files, str(tmp_path / "in"), str(tmp_path / "out"), compute={"batch_size": 4})
    run_on_ray(cfg, out=io.StringIO())
    rows = {os.path.basename(r["uri"]): r for r in read_back(str(tmp_path / "out")).to_pylist()}

    spec = resolve_model(cfg.model, Storage.from_env())
    model = build_model(spec, Storage.from_env())
    names = sorted(images)
    decoded = Decoder(spec.preprocess, 10**8)({
        "uri": np.array(names, dtype=object), "bytes": np.array([images[n] for n in names], dtype=object),
        "error": np.full(len(names), None, dtype=object), "error_type": np.full(len(names), None, dtype=object)})
    mean = torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocess.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(decoded["pixels"]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.inference_mode():
        probabilities = torch.softmax(model(x), dim=1)
    for i, name in enumerate(names):
        top = probabilities[i].topk(4)
        assert rows[name]["label"] == spec.labels[top.indices[0]]
        np.testing.assert_allclose(rows[name]["topk_scores"], top.values.numpy(), atol=1e-4)


def test_manifest_input(tmp_path, storage, bucket, classifier_files):
    """Parquet and CSV manifests, mixing s3:// and local entries, relative paths, and a missing object."""
    put_objects(storage, bucket, "m/", {"remote.jpg": encode(photo(seed=30), "JPEG")})
    write_files(tmp_path / "local", {"a.png": encode(photo(seed=31), "PNG"), "b c.jpg": encode(photo(), "JPEG")})
    uris = [f"s3://{bucket}/m/remote.jpg", f"s3://{bucket}/m/missing.jpg", str(tmp_path / "local" / "a.png"),
            "local/b c.jpg"]
    pq.write_table(pa.table({"uri": uris, "other": [1, 2, 3, 4]}), tmp_path / "list.parquet")
    (tmp_path / "list.csv").write_text("id,uri\n" + "".join(f"{i},{u}\n" for i, u in enumerate(uris)))

    for manifest in ("list.parquet", "list.csv"):
        out = tmp_path / f"out-{manifest}"
        run_locally(job(classifier_files, str(tmp_path / manifest), str(out)), out=io.StringIO())
        rows = {r["uri"]: r for r in read_back(str(out)).to_pylist()}
        assert len(rows) == 4
        assert rows[f"s3://{bucket}/m/missing.jpg"]["error_type"] == "read.not_found"
        assert rows[str(tmp_path / "local" / "b c.jpg")]["error"] is None
        assert sum(r["error"] is None for r in rows.values()) == 3


def test_oversized_objects_are_not_downloaded(storage, bucket, classifier_files, tmp_path):
    put_objects(storage, bucket, "big/", {"small.png": encode(photo(8, 8), "PNG"),
                                          "large.png": encode(photo(400, 400), "PNG")})
    cfg = job(classifier_files, f"s3://{bucket}/big/", str(tmp_path / "out"), input={"max_file_bytes": 2000})
    run_locally(cfg, out=io.StringIO())
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in read_back(str(tmp_path / "out")).to_pylist()}
    assert rows["small.png"]["error"] is None
    assert rows["large.png"]["error_type"] == "read.too_large"


def test_error_rate_threshold_stops_the_job(tmp_path, classifier_files):
    bad = {f"bad{i:02d}.jpg": b"garbage" for i in range(30)}
    write_files(tmp_path / "in", {**bad, "good.jpg": encode(photo(), "JPEG")})
    cfg = job(classifier_files, str(tmp_path / "in"), str(tmp_path / "out"),
              errors={"max_error_rate": 0.5, "min_inputs": 5})
    with pytest.raises(JobStopped, match=r"over errors.max_error_rate=0.5; most common: decode.not_an_image"):
        run_on_ray(cfg, out=io.StringIO())
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["committed_rows"] == 0
    assert not list((tmp_path / "out").glob("**/*.parquet"))  # a stopped run publishes nothing
    # The user fixes the inputs and reruns: the run resumes, and the inputs that failed are read again, not
    # committed from the stopped attempt's staged rows.
    write_files(tmp_path / "in", {name: encode(photo(seed=i), "PNG") for i, name in enumerate(bad)})
    cfg.errors.max_error_rate = 1.0
    printed = io.StringIO()
    resumed = run_on_ray(cfg, out=printed)
    assert resumed.run_id == summary["run_id"] and resumed.resumed == summary["inputs"] - summary["errors"]
    assert resumed.inputs == 31 - resumed.resumed and "inputs that failed are tried again" in printed.getvalue()
    written = read_back(str(tmp_path / "out"))
    assert written.num_rows == 31 and len(set(written["uri"].to_pylist())) == 31
    assert written["error"].null_count == 31
    # The summary of a resumed run counts every row it committed, the resumed ones too.
    assert (resumed.predicted, resumed.errors, resumed.committed_rows) == (31, 0, 31)


def test_overwrite_replaces_earlier_output(tmp_path, classifier_files):
    write_files(tmp_path / "in", {"a.png": encode(photo(), "PNG")})
    cfg = job(classifier_files, str(tmp_path / "in"), str(tmp_path / "out"))
    run_locally(cfg, out=io.StringIO())
    cfg.output.overwrite = True
    second = run_locally(cfg, out=io.StringIO())
    table = read_back(str(tmp_path / "out"))
    assert table.num_rows == 1 and table["run_id"].to_pylist() == [second.run_id]


def test_cli_prints_and_writes_the_summary(tmp_path, classifier_files, capsys):
    write_files(tmp_path / "in", {"a.png": encode(photo(), "PNG"), "b.jpg": b"broken"})
    code = main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--model", classifier_files["model"], "--weights", classifier_files["weights"],
                 "--labels", classifier_files["labels"], "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "inputs      2" in printed and "predicted   1" in printed
    assert "errors      1  (decode.not_an_image 1)" in printed and "images/s" in printed
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (summary["inputs"], summary["predicted"], summary["errors"]) == (2, 1, 1)
    assert summary["status"] == "completed" and summary["elapsed_s"] > 0


def test_listing_streams_page_by_page(storage, bucket):
    """The first block leaves the listing after one page, however many objects follow."""
    put_objects(storage, bucket, "many/", {f"{i:05d}.jpg": b"x" for i in range(1500)})

    class CountingStorage(Storage):
        pages = 0

        def list_pages(self, prefix, **options):
            for page in super().list_pages(prefix, **options):
                CountingStorage.pages += 1
                yield page

    blocks = InputListing(f"s3://{bucket}/many/", CountingStorage.from_env(), ["jpg"]).blocks()
    first = next(blocks)
    assert first.num_rows > 0 and CountingStorage.pages == 1
    assert first.num_rows + sum(b.num_rows for b in blocks) == 1500 and CountingStorage.pages == 2


def test_torchvision_weights_by_name(tmp_path, cached_imagenet_resnet18):
    """`--weights IMAGENET1K_V1`: labels and preprocessing come from torchvision's metadata."""
    write_files(tmp_path / "in", {"a.jpg": encode(photo(320, 240), "JPEG")})
    cfg = load_job(None, {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": "resnet18",
                          "weights": "IMAGENET1K_V1"})
    summary = run_locally(cfg, out=io.StringIO())
    row = read_back(str(tmp_path / "out")).to_pylist()[0]
    assert summary.weights == row["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert row["error"] is None and row["label"] in cached_imagenet_resnet18.meta["categories"]
    assert len(row["topk_labels"]) == 5


def test_predictions_stream_to_the_driver_in_many_batches(tmp_path, storage, bucket, classifier_files):
    """Ray must not merge the work into one block: rows reach the driver while work is still going on.
    Blocks are plan.BLOCK_BYTES of encoded images, about 11 of these photos."""
    from pipeline.ray.adapter import dataset_for
    from pipeline.ray.datasource import ListingTally
    from pipeline.ray.executor import RayExecutor
    from pipeline.run.plan import plan_stages

    put_objects(storage, bucket, "stream/", {f"{i:04d}.jpg": photo_jpeg(i) for i in range(80)})
    cfg = job(classifier_files, f"s3://{bucket}/stream/", str(tmp_path / "out"), compute={"batch_size": 8})
    spec = resolve_model(cfg.model, storage)
    plan = plan_stages(cfg, spec, storage, RayExecutor().pool(cfg.compute))
    batches = [b.num_rows for b in dataset_for(plan, ListingTally.remote()).iter_batches(
        batch_format="pyarrow", batch_size=None)]
    assert sum(batches) == 80
    assert len(batches) >= 4


def test_manifest_on_s3_with_relative_entries(storage, bucket, classifier_files, tmp_path):
    put_objects(storage, bucket, "data/", {"images/x y.png": encode(photo(seed=40), "PNG")})
    buffer = io.BytesIO()
    pq.write_table(pa.table({"uri": ["images/x y.png", f"s3://{bucket}/data/images/x y.png"]}), buffer)
    storage.write_bytes(f"s3://{bucket}/data/manifest.parquet", buffer.getvalue())
    run_locally(job(classifier_files, f"s3://{bucket}/data/manifest.parquet", str(tmp_path / "out")), out=io.StringIO())
    rows = read_back(str(tmp_path / "out")).to_pylist()
    assert [r["uri"] for r in rows] == [f"s3://{bucket}/data/images/x y.png"]  # one input, listed twice: one row
    assert all(r["error"] is None for r in rows)


def test_empty_input_finishes_with_a_hint(tmp_path, classifier_files):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    printed = io.StringIO()
    summary = run_locally(job(classifier_files, str(tmp_path / "in"), str(tmp_path / "out")), out=printed)
    assert (summary.inputs, summary.skipped_by_extension, summary.files) == (0, 1, [])
    assert "nothing to do under" in printed.getvalue()
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["inputs"] == 0


def test_manifest_entries_are_normalised_and_bad_csv_rows_skipped(tmp_path):
    from pipeline.io.manifest import _resolve, read_manifest

    assert _resolve("./cat/1.jpg", "s3://b/dir") == "s3://b/dir/cat/1.jpg"
    assert _resolve("/abs/2.jpg", "s3://b/dir") == "/abs/2.jpg"
    assert _resolve("../x.jpg", "/data/m") == "/data/x.jpg"
    (tmp_path / "m.csv").write_text("uri\na.jpg\nb,c.jpg\n\"d,e.jpg\"\n")
    uris = [o.uri for page in read_manifest(str(tmp_path / "m.csv"), Storage()) for o in page]
    assert uris == [str(tmp_path / "a.jpg"), str(tmp_path / "d,e.jpg")]


def test_manifest_metadata_columns_are_carried_and_drive_incremental_runs(tmp_path, classifier_files):
    write_files(tmp_path / "imgs", {"a.png": encode(photo(seed=1), "PNG"), "b.png": encode(photo(seed=2), "PNG")})
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri,etag,size,last_modified\n"
                        "imgs/a.png,e1,10,2026-11-01T10:00:00Z\n"
                        "imgs/b.png,e2,20,2026-11-01T10:00:00Z\n")
    cfg = job(classifier_files, str(manifest), str(tmp_path / "out"))
    assert run_locally(cfg, out=io.StringIO()).inputs == 2
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in read_back(str(tmp_path / "out")).to_pylist()}
    assert rows["a.png"]["etag"] == "e1" and rows["a.png"]["last_modified"].isoformat() == "2026-11-01T10:00:00+00:00"
    manifest.write_text(manifest.read_text().replace("e2,20", "e3,20"))  # b changed upstream
    again = run_locally(cfg, out=io.StringIO())
    assert again.inputs == 1 and again.already_done == 1


def test_a_new_stage_runs_on_ray_from_its_declarations_alone(tmp_path, classifier_files):
    """The stage test_run.py adds, run by the Ray adapter unchanged: its operator, its batches, its error rows."""
    from pipeline.ray.adapter import dataset_for
    from pipeline.ray.datasource import ListingTally
    from pipeline.ray.executor import RayExecutor
    from pipeline.run.plan import plan_stages
    from test_run import Stamp

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i:02d}.png").write_bytes(encode(photo(seed=i), "PNG"))
    cfg = job(classifier_files, str(folder), str(tmp_path / "out"))
    storage = Storage.from_env()
    executor = RayExecutor()
    executor.start()
    plan = plan_stages(cfg, resolve_model(cfg.model, storage), storage, executor.pool(cfg.compute))
    plan.stages.insert(1, Stamp())
    dataset = dataset_for(plan, ListingTally.remote())
    rows = [row for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None) for row in table.to_pylist()]
    assert len(rows) == 7 and all(row["stamp"] == len(row["uri"]) for row in rows)
    assert [row["uri"].rsplit("/", 1)[1] for row in rows if row["error"]] == ["03.png"]
    assert "Stamp" in dataset.stats()
