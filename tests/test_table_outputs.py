"""Jobs that write a Delta or Iceberg table, end to end on the test S3 server: nightly runs, each one table
version; a model upgrade; the README's time-travel queries run as written; and bad table settings in one line."""

from __future__ import annotations

import io
import re
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from conftest import encode, photo
from pipeline.cli.commands import main
from pipeline.local.executor import run_locally
from readers import duckdb_connection
from test_pipeline import job, put_objects

ROOT = Path(__file__).parent.parent
# What the README's Iceberg queries show where a user puts what their runs' summaries print.
ICEBERG_METADATA = "s3://bucket/preds/metadata/00002-7d3c1c2e-9f1a-4b8e-a6f0-2b7b6f4c9e11.metadata.json"
ICEBERG_PREVIOUS = "5318008412345678901"
ICEBERG_CURRENT = "8675309123456789012"


def images(*seeds: int) -> dict[str, bytes]:
    return {f"img{s:02d}.jpg": encode(photo(seed=s), "JPEG") for s in seeds}


def readme_queries(fmt: str) -> list[str]:
    """The SQL blocks of the README's time-travel section for this format, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Time travel and model upgrades", 1)[1].split("\n## ", 1)[0]
    return [q for q in re.findall(r"```sql\n(.*?)```", section, flags=re.S) if f"{fmt}_scan" in q]


def upgraded_weights(tmp_path) -> str:
    torch.manual_seed(1)
    path = tmp_path / "resnet18-v2.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_nightly_runs_and_a_model_upgrade_into_a_table(fmt, tmp_path, storage, bucket, classifier_files):
    put_objects(storage, bucket, "in/", images(0, 1, 2, 3, 4, 5))
    output = f"s3://{bucket}/preds"
    settings = {"format": fmt, "partitioning": "run_date"}
    if fmt == "iceberg":
        settings["catalog"] = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db"}
    cfg = job(classifier_files, f"s3://{bucket}/in/", output, output=settings)
    printed = io.StringIO()
    first = run_locally(cfg, out=printed)
    assert first.inputs == 6
    assert ("Delta table version 0" if fmt == "delta" else "Iceberg snapshot") in printed.getvalue()

    # The next night: two new photos and a model upgrade, so every input again, appended. (Incremental runs
    # into each format are tests/test_output.py's.)
    put_objects(storage, bucket, "in/", images(6, 7))
    cfg.model.weights = upgraded_weights(tmp_path)
    upgrade = run_locally(cfg, out=io.StringIO())
    assert upgrade.inputs == 8

    con = duckdb_connection(storage, fmt)
    source = f"delta_scan('{output}')" if fmt == "delta" else f"iceberg_scan('{upgrade.metadata_location}')"
    rows = con.execute(f"SELECT run_id, uri, label, run_date FROM {source}").fetchall()
    assert len(rows) == 6 + 8 and {r[0] for r in rows} == {first.run_id, upgrade.run_id}
    assert {str(r[3]) for r in rows} == {first.started_at[:10], upgrade.started_at[:10]}
    # Polars as its users call it: the endpoint of an S3-compatible store over http must be allowed.
    # (Polars hands Iceberg's options to pyiceberg, whose names they take.)
    polars = (pl.read_delta(output, storage_options={"aws_endpoint_url": storage.endpoint_url, "aws_allow_http": "true",
                                                     "aws_region": storage.region}) if fmt == "delta" else
              pl.scan_iceberg(upgrade.metadata_location, storage_options={"s3.endpoint": storage.endpoint_url,
                                                                          "s3.region": storage.region}).collect())
    assert polars.height == 14

    # The README's queries: the table as of the first night, and the labels the upgrade changed.
    before = {r[1]: r[2] for r in rows if r[0] == first.run_id}
    after = {r[1]: r[2] for r in rows if r[0] == upgrade.run_id}
    as_of, changed = readme_queries(fmt)
    # The README's placeholders: the table's path, and (Iceberg) the metadata file and snapshot ids the
    # summaries print; Delta's versions are as written there (0 and 1 for these two runs).
    if fmt == "delta":
        assert (first.table_version, upgrade.table_version) == (0, 1)
    for placeholder, value in [(ICEBERG_METADATA, upgrade.metadata_location or ""),
                               (ICEBERG_PREVIOUS, str(first.table_version)),
                               (ICEBERG_CURRENT, str(upgrade.table_version)), ("s3://bucket/preds", output)]:
        as_of, changed = as_of.replace(placeholder, value), changed.replace(placeholder, value)
    assert con.execute(as_of).fetchall() == [(6,)]
    expected = sorted((uri, before[uri], after[uri]) for uri in before if before[uri] != after[uri])
    assert con.execute(changed).fetchall() == expected and expected  # random weights: some labels differ

    # The report on the upgrade, against the first night: the same changes, counted per (old, new) label pair.
    catalog = ["--catalog", "type=sql", "--catalog", f"uri=sqlite:///{tmp_path}/catalog.db"] if fmt == "iceberg" else []
    page = tmp_path / "upgrade.html"
    assert main(["report", output, *catalog, "--against", first.run_id, "-o", str(page)]) == 0
    html = page.read_text()
    pairs: dict[tuple[str, str], int] = {}
    for _, old, new in expected:
        pairs[(old, new)] = pairs.get((old, new), 0) + 1
    for (old, new), n in pairs.items():
        assert f"<tr><td>{old}</td><td>{new}</td><td class=\"n\">{n}</td></tr>" in html
    assert html.count('<img src="data:image/jpeg') >= 6  # thumbnails fetched from the bucket


def test_bad_table_settings_are_one_line_exit_2(tmp_path, bucket, classifier_files, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(images(0)["img00.jpg"])
    args = ["run", "--input", str(folder), "--model", classifier_files["model"], "--weights",
            classifier_files["weights"], "--labels", classifier_files["labels"]]
    assert main([*args, "--output", f"s3://{bucket}/t", "--format", "iceberg"]) == 2
    assert "output.catalog: an Iceberg output in an object store needs a catalog" in capsys.readouterr().err
    plain = tmp_path / "plain"  # a folder of Parquet files, not a Delta table
    plain.mkdir()
    pq.write_table(pa.table({"uri": ["x"]}), plain / "part-0.parquet")
    assert main([*args, "--output", str(plain), "--format", "delta"]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("error:")]  # (Ray may log to stderr too)
    assert len(ours) == 1 and ours[0].startswith("error: output.uri:") and "no Delta table" in ours[0]
    assert "Traceback" not in err
