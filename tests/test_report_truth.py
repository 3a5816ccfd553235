"""What the report and `pipeline runs` say holds, checked without Ray: labels are drawn as the text they are, the
throughput samples cover a run to its end, `--against`'s top-k share counts what it names, and each table run
names the version a reader travels to. (tests/test_report.py checks the same through real jobs.)"""

from __future__ import annotations

import contextlib
import html
import io
import re

import numpy as np
import pyarrow as pa
import pytest

from output_driver import job, run_once
from pipeline.cli.commands import main
from pipeline.output import make_format
from pipeline.run.progress import ProgressSamples
from pipeline.report import against_section, charts
from pipeline.report.facts import compare
from pipeline.job.rows import OUTPUT_SCHEMA

DOLLAR_LABELS = ["price_$_tag_$", "$\\foo$", "cost $5 to $10"]


def svg_texts(svg: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]


def test_labels_with_dollar_signs_are_drawn_as_their_text():
    """matplotlib reads text between two `$` as maths: `$\\foo$` raised, `cost $5 to $10` came out in italics."""
    bars = charts.bars([(label, 3 - i) for i, label in enumerate(DOLLAR_LABELS)], "rows per label")
    scores = charts.score_distributions({label: np.ones(20, np.int64) for label in DOLLAR_LABELS}, DOLLAR_LABELS)
    for svg in (bars, scores):
        assert set(DOLLAR_LABELS) <= set(svg_texts(svg))


def test_progress_samples_keep_when_rows_arrived_and_reach_the_run_end():
    samples = ProgressSamples()
    samples.observe(8.1, 32)
    samples.observe(11.2, 96)
    samples.observe(11.6, 960)  # within a second of the last sample: it used to be dropped
    progress = samples.record(12.4, 960)["progress"]
    assert progress[0] == [0.0, 0] and [11.6, 960] in progress and progress[-1] == [12.4, 960]

    quiet_end = ProgressSamples()
    quiet_end.observe(5.0, 100)  # the last rows; then the commit took 25 s
    assert quiet_end.record(30.0, 100)["progress"][-1] == [30.0, 100]


def test_progress_samples_of_a_long_run_stay_few_and_spread_over_it():
    samples, rows, rng = ProgressSamples(limit=60), 0, np.random.default_rng(0)
    times = np.sort(np.concatenate([rng.uniform(0, 60, 5000), rng.uniform(60, 36_000, 2000)]))  # a busy start
    for t in times:
        rows += 8
        samples.observe(float(t), rows)
    progress = samples.record(36_000.0, rows)["progress"]
    assert len(progress) <= 62 and progress[-1] == [36_000.0, rows]
    seconds = [s for s, _ in progress]
    assert seconds == sorted(seconds) and max(np.diff(seconds)) <= 2 * 36_000 / 60 * 2
    assert sum(s < 3_600 for s in seconds) <= 10  # the busy first minute does not crowd out the night


def rows(labels: list[tuple[str, str, list[str]]]) -> list[pa.Table]:
    return [pa.table({"uri": [u for u, _, _ in labels], "frame": pa.nulls(len(labels), pa.int32()),
                      "error_type": pa.nulls(len(labels), pa.string()), "label": [label for _, label, _ in labels],
                      "topk_labels": [topk for _, _, topk in labels]})]


def test_against_counts_new_labels_in_the_old_top_k_among_the_changed_inputs():
    old = rows([("a", "cat", ["cat", "dog"]), ("b", "cat", ["cat", "dog"]), ("c", "cat", ["cat", "dog"]),
                ("d", "dog", ["dog", "cat"]), ("e", "dog", ["dog", "fox"])])
    new = rows([("a", "cat", ["cat", "dog"]), ("b", "cat", ["cat", "dog"]), ("c", "cat", ["cat", "dog"]),
                ("d", "cat", ["cat", "dog"]), ("e", "owl", ["owl", "dog"])])  # d: in its old top-k; e: not
    changes = compare(old, new)
    facts = dict(against_section(("r1", changes), lambda items: [])["facts"])
    assert changes.new_in_old_topk == 1
    assert facts["of the 2 changed, new label in the old top-k"] == "50.0%"  # not 4 of 5 compared


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_runs_names_each_runs_table_version_and_the_metadata_file(fmt, tmp_path, storage):
    """The README's time-travel SQL needs a Delta version, or an Iceberg snapshot id and metadata file."""
    output = str(tmp_path / f"{fmt}-out")
    runs = [run_once(output, fmt, 5, storage=storage)["run_id"], run_once(output, fmt, 8, storage=storage)["run_id"]]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["runs", output, "--no-listing"]) == 0
    text = printed.getvalue()
    if fmt == "delta":
        versions = {run: str(v) for v, run in enumerate(runs)}
        assert f"delta_scan('{output}', version => 1)" in text
    else:
        table = make_format(job(output, fmt).output, storage, OUTPUT_SCHEMA)
        versions = {r["run_id"]: str(r["snapshot_id"]) for r in table.committed()}
        assert {s.snapshot_id for s in table.load().snapshots()} == {int(v) for v in versions.values()}
        assert f"metadata file: {table.metadata_location}\n" in text
    assert re.search(r"run id .*fmt\s+(version|snapshot id)\n", text)
    for run in runs:
        assert re.search(rf"{run} .* 1\s+{versions[run]}\n", text)
