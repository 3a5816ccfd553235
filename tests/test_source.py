"""The listing's counts, as the summary reports them."""

from __future__ import annotations

import json

import pytest

from conftest import encode, photo
from pipeline.cli.commands import main

pytestmark = pytest.mark.usefixtures("ray_session")


def test_own_output_inside_the_input_is_not_counted_as_skipped(tmp_path, capsys):
    """With input.extensions null nothing is skipped by extension, even once the output folder (inside the
    input folder) holds Parquet parts, commit records and a summary. (The listing is what is tested: the tiny
    counting model and one model actor keep the two runs cheap.)"""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photo(), "PNG"))
    (tmp_path / "job.yaml").write_text("input: {extensions: null}\ncompute: {min_actors: 1, max_actors: 1}\n")
    args = ["run", str(tmp_path / "job.yaml"), "--input", str(tmp_path / "in"), "--output",
            str(tmp_path / "in" / "preds"), "--model", "counting_model:build"]
    for inputs, unchanged in ((1, 0), (0, 1)):
        assert main(args) == 0
        summary = json.loads((tmp_path / "in" / "preds" / "_summary.json").read_text())
        assert (summary["inputs"], summary["already_done"], summary["skipped_by_extension"]) == (inputs, unchanged, 0)
        assert "skipped by input.extensions" not in capsys.readouterr().out
    assert list((tmp_path / "in" / "preds").glob("**/*.parquet"))  # there was output to miscount
