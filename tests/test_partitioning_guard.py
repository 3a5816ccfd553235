"""An output partitioned otherwise than the job is refused when the output opens, before any input is read, in
every format: one line, exit 2, nothing staged, the output as it was (it used to be refused at the commit, after
the night's inference, or for the folder not at all, mixing layouts that hive readers then refuse)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import encode, photo
from pipeline.cli.commands import main
from test_cli_errors import assert_one_line

pytestmark = pytest.mark.usefixtures("ray_session")


def run(tmp_path: Path, fmt: str, *flags: str) -> int:
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"model": {"name": "counting_model:build",
                                          "preprocess": {"resize_size": 64, "crop_size": 64}},
                                "compute": {"min_actors": 1, "max_actors": 1}}))
    return main(["run", str(spec), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--format", fmt, *flags])


def staged_chunks(out: Path) -> list[Path]:
    return [p for p in (out / "_staging").rglob("*") if p.is_file() and not p.name.startswith("_")]


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_a_table_partitioned_otherwise_is_refused_when_the_output_opens(tmp_path, capsys, fmt):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photo(seed=1), "PNG"))
    assert run(tmp_path, fmt) == 0
    before = sorted(str(p) for p in (tmp_path / "out").rglob("*.parquet"))
    (tmp_path / "in" / "b.png").write_bytes(encode(photo(seed=2), "PNG"))
    capsys.readouterr()

    assert run(tmp_path, fmt, "--partitioning", "label") == 2
    assert_one_line(capsys.readouterr().err, "partitioned by", "label")
    assert staged_chunks(tmp_path / "out") == []  # refused before the input was read, not at the commit
    assert sorted(str(p) for p in (tmp_path / "out").rglob("*.parquet")) == before
