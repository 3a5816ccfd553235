"""What `pipeline export` selects, on rows made here: the uncertainty measures, a detector's band, per-label quotas,
random:N seeded by the run id, errors never; and its mistakes as one line, exit 2 (on a local output written by
tests/output_driver.py, without Ray or a model). tests/test_export.py exports real runs' outputs."""

from __future__ import annotations

import math
import random

import pytest

from output_driver import run_once
from pipeline.cli.commands import main
from pipeline.review.selection import Selection, box_uncertainty, select, uncertainty


def row(uri: str, scores: list[float], label: str = "cat", error: str | None = None) -> dict:
    return {"uri": uri, "run_id": "run-1", "label": label, "score": scores[0], "topk_scores": scores,
            "error_type": error}


def chosen(rows: list[dict], spec: str, **options) -> list[str]:
    return [r["uri"] for r in select(rows, Selection.parse(spec, **options)).chosen()]


def test_the_three_measures_from_the_top_k():
    assert uncertainty([0.6, 0.3, 0.1], "least-confidence") == pytest.approx(0.4)
    assert uncertainty([0.6, 0.3, 0.1], "margin") == pytest.approx(0.7)
    assert uncertainty([0.3, 0.2, 0.1], "entropy") == pytest.approx(-sum(p * math.log(p) for p in (.5, 1 / 3, 1 / 6)))
    rows = [row("a", [0.5, 0.45, 0.05]), row("b", [0.4, 0.2, 0.2]), row("c", [0.9, 0.05, 0.05])]
    assert chosen(rows, "uncertain:2", measure="least-confidence") == ["b", "a"]
    assert chosen(rows, "uncertain:1", measure="margin") == ["a"]  # the closest call between the top two
    assert chosen(rows, "uncertain:1", measure="entropy") == ["b"]  # the most spread out


def test_rows_with_errors_are_never_chosen():
    rows = [row("bad", [0.1], error="decode.truncated"), row("ok", [0.99])]
    assert chosen(rows, "uncertain:5") == ["ok"] and chosen(rows, "random:5") == ["ok"]


def test_per_label_quotas_put_rare_labels_in_view():
    rows = [row(f"cat{i}", [0.4 + i / 100]) for i in range(20)] + [row("fish", [0.95], "fish")]
    assert "fish" not in chosen(rows, "uncertain:5")
    picked = chosen(rows, "uncertain:5", per_label=1)
    assert len(picked) == 5 and picked[:4] == ["cat0", "cat1", "cat2", "cat3"] and picked[-1] == "fish"


def test_random_is_seeded_by_the_run_id_not_the_row_order():
    rows = [row(f"img{i}", [0.5]) for i in range(200)]
    first = chosen(rows, "random:10")
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert chosen(shuffled, "random:10") == first
    other_run = [{**r, "run_id": "run-2"} for r in rows]
    assert set(chosen(other_run, "random:10")) != set(first)


def test_a_detector_s_boxes_in_the_band_and_label_selection():
    def boxes(*scored):
        return [{"label": label, "score": score} for label, score in scored]

    assert box_uncertainty(boxes(("red", 0.8)), (0.3, 0.7)) == (0.0, None)
    assert box_uncertainty(boxes(("red", 0.5), ("blue", 0.7)), (0.3, 0.7)) == (1.5, "red")
    rows = [{"uri": u, "run_id": "r", "detections": d, "error_type": None} for u, d in [
        ("sure", boxes(("red", 0.9))), ("one", boxes(("red", 0.6))), ("two", boxes(("red", 0.6), ("cat", 0.4)))]]
    assert chosen(rows, "uncertain:5") == ["two", "one"]
    assert chosen(rows, "label=cat") == ["two"]


@pytest.mark.parametrize("args, words", [
    (["--to", "yolo"], "--to yolo: give one of label-studio, coco, cvat"),
    (["--to", "coco", "--select", "uncertain:0"], "--select uncertain:0: give uncertain:N"),
    (["--to", "coco", "--select", "sharpest:3"], "--select sharpest:3"),
    (["--to", "coco", "--by", "variance"], "--by variance: give one of"),
    (["--to", "coco", "--band", "0.8:0.2"], "--band 0.8:0.2: give LO:HI"),
    (["--to", "coco", "--presign", "0"], "--presign 0: give the URLs' lifetime in seconds"),
    (["--to", "coco", "--run", "nope"], "--run nope: no such committed run"),
    (["--to", "coco", "-o", "http://127.0.0.1:9"], "only --to label-studio goes to a server"),
    (["--to", "label-studio", "-o", "http://127.0.0.1:9"], "set LABEL_STUDIO_API_KEY"),
    (["--to", "label-studio", "-o", "http://127.0.0.1:9", "KEY"], "cannot reach Label Studio"),
])
def test_mistakes_are_one_line(tmp_path, capsys, monkeypatch, args, words):
    output = str(tmp_path / "out")
    run_once(output, "parquet", 3)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    if args[-1] == "KEY":
        args = args[:-1]
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-key-1")
    monkeypatch.chdir(tmp_path)
    code = main(["export", output, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert "secret-key-1" not in err
