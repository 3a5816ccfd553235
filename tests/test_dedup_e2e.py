"""End to end: `pipeline run` (the default local executor) over near-duplicate photos in the S3 server, then
`pipeline dedup` in a subprocess, then the dedup table read back by the format's own reader, for each format."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from near_duplicates import near_duplicate_set
from pipeline.job.rows import OUTPUT_SCHEMA
from pipeline.review.tables import SiblingTable
from test_pipeline import put_objects

pytestmark = pytest.mark.skipif("phash" not in OUTPUT_SCHEMA.names,
                                reason="rows have no phash column before the hashes work is merged")


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_run_then_dedup_groups_each_photos_copies(fmt, tmp_path, storage, bucket, classifier_files):
    items = near_duplicate_set(2)  # two unrelated photos, each with its four kinds of copies
    put_objects(storage, bucket, "in/", {name: data for name, data, _ in items})
    output = {"uri": f"s3://{bucket}/out", "format": fmt}
    catalog = None
    if fmt == "iceberg":
        catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db"}
        output["catalog"] = catalog
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": {"uri": f"s3://{bucket}/in/"}, "output": output, "model": {
        "name": classifier_files["model"], "weights": classifier_files["weights"],
        "labels": classifier_files["labels"]}}))
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]

    flags = [f"--catalog=type=sql", f"--catalog=uri={catalog['uri']}"] if catalog else []
    done = subprocess.run([sys.executable, "-m", "pipeline", "dedup", output["uri"], *flags], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("2 near-duplicate group(s), ") and "_dedup" in done.stdout

    table = SiblingTable.for_output(storage, output["uri"], "dedup", catalog=catalog)
    rows = own_reader(table)
    original = {f"s3://{bucket}/in/{name}": o for name, _, o in items}
    groups = {}
    for uri, rep in zip(rows["uri"].to_pylist(), rows["representative"].to_pylist()):
        groups.setdefault(rep, set()).add(uri)
    for rep, members in groups.items():
        assert len({original[u] for u in members}) == 1  # no unrelated photo in a group
        assert rep.endswith(("photo-000.jpg", "photo-001.jpg", "-rotated.jpg", "-reencoded.jpg"))  # full size
    assert sum(len(m) for m in groups.values()) >= 8  # of 10: a 2-5 % crop may stay out


def own_reader(table: SiblingTable):
    if table.format == "delta":
        from deltalake import DeltaTable
        from pipeline.output.delta import storage_options

        return DeltaTable(table.uri, storage_options=storage_options(table.storage, table.uri)).to_pyarrow_table()
    if table.format == "iceberg":
        return table.catalog.load_table(table.identifier).scan().to_arrow()
    import pyarrow.dataset as ds

    fs, path = table.storage.fs(table.uri)
    return ds.dataset(path, filesystem=fs, format="parquet").to_table()
