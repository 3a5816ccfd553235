"""Reviewers' answers read as the tools write them (Label Studio's JSON export, COCO checked by pycocotools, CVAT for
images 1.1, CSVs from pandas, Excel and Google Sheets), kept append-only with the latest answer winning, and runs
scored against them with hand-computed figures (mAP@0.5 also against COCOeval run on COCO files). Local outputs
written by tests/output_driver.py: no Ray, no S3. (tests/test_truth_cli.py: through `pipeline run` on S3.)"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import Counter
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from output_driver import run_once
from pipeline.cli.commands import main
from pipeline.io.storage import Storage
from pipeline.job.errors import UserError
from pipeline.report.outputs import open_output_for_reading
from pipeline.report.scores import RunScore, compare, map_at_50, score_runs
from pipeline.review.tables import SiblingTable
from pipeline.review.truth import detect, import_truth, parse, read_truth
from pipeline.review.truth.answers import FileFacts, latest, to_table

FILE_TIME = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
FACTS = FileFacts("ann@example.com", FILE_TIME)
URIS = [f"s3://photos/img-{i:05d}.jpg" for i in range(10)]


def parsed(source: str, data: bytes):
    return parse(source, data, "answers", FACTS)


# --- Label Studio ------------------------------------------------------------------------------------------------
def annotation(result: list[dict], updated: str, cancelled: bool = False, completed_by: object = 7) -> dict:
    """An annotation as Label Studio 1.23's "JSON" export writes it (https://labelstud.io/guide/task_format)."""
    return {"id": abs(hash(updated)) % 1000, "completed_by": completed_by, "result": result,
            "was_cancelled": cancelled, "ground_truth": False, "created_at": "2026-12-01T08:00:00.000000Z",
            "updated_at": updated, "draft_created_at": None, "lead_time": 4.2, "prediction": {},
            "result_count": len(result), "unique_id": "c0ffee", "import_id": None, "last_action": None, "task": 1,
            "project": 3, "updated_by": completed_by, "parent_prediction": 11, "parent_annotation": None,
            "last_created_by": None}


def choice(label: str) -> dict:
    return {"id": "Xy12", "type": "choices", "value": {"choices": [label]}, "origin": "manual", "to_name": "image",
            "from_name": "choice"}


def rectangle(label: str, x: float, y: float, w: float, h: float, rotation: float = 0) -> dict:
    return {"id": "Ab34", "type": "rectanglelabels", "origin": "manual", "to_name": "image", "from_name": "label",
            "original_width": 200, "original_height": 100, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def task(uri: str, annotations: list[dict], image: str | None = None, predictions: list[dict] = ()) -> dict:
    return {"id": 1, "annotations": annotations, "file_upload": None, "drafts": [], "predictions": list(predictions),
            "data": {"image": image or uri, "uri": uri, "run_id": "20261201T000000Z-abcd"}, "meta": {},
            "created_at": "2026-12-01T07:00:00.000000Z", "updated_at": "2026-12-01T08:00:00.000000Z", "inner_id": 1,
            "total_annotations": len(annotations), "cancelled_annotations": 0, "total_predictions": 0,
            "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 3,
            "updated_by": None, "comment_authors": []}


def test_label_studio_export_the_latest_kept_annotation_answers_with_who_and_when():
    tasks = [
        task(URIS[0], [annotation([choice("cat")], "2026-12-02T10:00:00.123456Z")]),
        task(URIS[1], [annotation([choice("cat")], "2026-12-02T11:00:00Z", completed_by={"id": 9, "email": "bo@x.org"}),
                       annotation([choice("dog")], "2026-12-02T10:00:00Z")]),  # the later one answers
        task(URIS[2], [annotation([choice("dog")], "2026-12-02T12:00:00Z", cancelled=True)]),  # skipped
        task(URIS[3], [], predictions=[{"model_version": "r1 resnet", "score": 0.4, "result": [choice("cat")]}]),
        task("", [annotation([choice("fox")], "2026-12-02T10:00:00Z")],
             image=f"https://s3.example.com/photos/img-00004.jpg?X-Amz-Signature=abc&X-Amz-Expires=3600"),
    ]
    tasks[4]["data"].pop("uri")
    result = parsed("label-studio", json.dumps(tasks).encode())
    got = {a.uri: (a.label, a.boxes, a.reviewer, a.reviewed_at) for a in result.answers}
    assert got == {
        URIS[0]: ("cat", None, "label-studio user 7", datetime(2026, 12, 2, 10, 0, 0, 123456, timezone.utc)),
        URIS[1]: ("cat", None, "bo@x.org", datetime(2026, 12, 2, 11, tzinfo=timezone.utc)),
        "https://s3.example.com/photos/img-00004.jpg": ("fox", None, "label-studio user 7",
                                                        datetime(2026, 12, 2, 10, tzinfo=timezone.utc))}
    assert result.unanswered == 2  # the cancelled one and the one never annotated


def test_label_studio_rectangles_come_back_in_original_pixels():
    tasks = [task(URIS[0], [annotation([rectangle("car", 10, 20, 30, 40), rectangle("bus", 50, 20, 20, 60, 90)],
                                       "2026-12-02T10:00:00Z")]),
             task(URIS[1], [annotation([], "2026-12-02T10:00:00Z")])]  # reviewed: nothing there
    answers = {a.uri: a for a in parsed("label-studio", json.dumps(tasks).encode()).answers}
    car, bus = answers[URIS[0]].boxes
    assert car == pytest.approx(("car", 20, 20, 80, 60))
    # 40 x 60 px at (100, 20), turned 90° clockwise about its top-left corner: 60 wide to the left, 40 high down
    assert bus == pytest.approx(("bus", 40, 20, 100, 60))
    assert answers[URIS[1]].boxes == () and answers[URIS[1]].label is None


# --- COCO and CVAT -----------------------------------------------------------------------------------------------
def coco_file(tmp_path, annotations: list[dict], images: int = 3) -> bytes:
    """A COCO file, proven loadable by pycocotools itself."""
    from pycocotools.coco import COCO

    data = {"info": {"description": "reviewed"}, "licenses": [],
            "images": [{"id": i + 1, "file_name": URIS[i], "width": 200, "height": 100} for i in range(images)],
            "categories": [{"id": 1, "name": "cat", "supercategory": ""}, {"id": 2, "name": "dog"}],
            "annotations": annotations}
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        assert len(COCO(str(path)).getImgIds()) == images
    return path.read_bytes()


def test_coco_classification_and_detection(tmp_path):
    labels = coco_file(tmp_path, [{"id": 1, "image_id": 1, "category_id": 2}, {"id": 2, "image_id": 2,
                                                                                 "category_id": 1}])
    result = parsed("coco", labels)
    assert [(a.uri, a.label, a.boxes) for a in result.answers] == [(URIS[0], "dog", None), (URIS[1], "cat", None)]
    assert result.unanswered == 1 and {(a.reviewer, a.reviewed_at) for a in result.answers} == {
        ("ann@example.com", FILE_TIME)}
    exported = coco_file(tmp_path, [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 200, 100],
                                     "area": 20000, "iscrowd": 0, "score": 0.41}])  # `pipeline export`'s label
    assert [(a.uri, a.label, a.boxes) for a in parsed("coco", exported).answers] == [(URIS[0], "dog", None)]
    boxes = coco_file(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40],
                                  "area": 1200, "iscrowd": 0}])
    answers = {a.uri: a.boxes for a in parsed("coco", boxes).answers}
    assert answers == {URIS[0]: (("cat", 10.0, 20.0, 40.0, 60.0),), URIS[1]: (), URIS[2]: ()}


CVAT = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task><id>4</id><name>review</name><size>3</size><mode>annotation</mode>
      <labels><label><name>car</name><color>#fa3253</color><type>any</type><attributes/></label></labels>
    </task>
    <dumped>2026-12-03 08:15:00.123456+00:00</dumped>
  </meta>
  <image id="0" name="{0}" width="200" height="100">
    <box label="car" source="manual" occluded="0" xtl="10.00" ytl="20.00" xbr="50.00" ybr="40.00" z_order="0">
    </box>
    <box label="car" source="manual" occluded="0" xtl="100.00" ytl="40.00" xbr="140.00" ybr="60.00" rotation="90.0"
      z_order="0"></box>
  </image>
  <image id="1" name="{1}" width="200" height="100">
  </image>
</annotations>
"""


def test_cvat_for_images_boxes_and_tags(tmp_path):
    answers = {a.uri: a for a in parsed("cvat", CVAT.format(URIS[0], URIS[1]).encode()).answers}
    first, turned = answers[URIS[0]].boxes
    assert first == ("car", 10.0, 20.0, 50.0, 40.0)
    assert turned == pytest.approx(("car", 110, 30, 130, 70))  # 40 x 20 about its centre (120, 50): 20 x 40
    assert answers[URIS[1]].boxes == ()
    assert answers[URIS[0]].reviewed_at == datetime(2026, 12, 3, 8, 15, 0, 123456, timezone.utc)
    tags = CVAT.replace('<box label="car"', '<tag label="dog"').replace("</box>", "</tag>")
    tagged = parsed("cvat", tags.format(URIS[0], URIS[1]).encode())
    assert [(a.uri, a.label, a.boxes) for a in tagged.answers] == [(URIS[0], "dog", None)]
    assert tagged.unanswered == 1


# --- CSV ---------------------------------------------------------------------------------------------------------
ROWS = [(URIS[0], "cat"), ('s3://photos/a, "quoted".jpg', "dog"), (URIS[2], "café au lait")]


def pandas_default(path):
    pd.DataFrame(ROWS, columns=["uri", "label"]).to_csv(path)  # an unnamed index column first


def pandas_semicolons(path):
    pd.DataFrame(ROWS, columns=["path", "class"]).to_csv(path, sep=";", index=False)


def excel_utf8(path):
    """Excel's "CSV UTF-8": a BOM, CRLF line ends, quotes where needed, empty rows kept at the end."""
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f, dialect="excel")
        writer.writerows([("Image", "Class"), *ROWS, ("", ""), ("", "")])


def excel_european(path):
    """A European Excel's "CSV (semicolon delimited)": Windows-1252 text, `;`, CRLF, trailing empty rows."""
    with open(path, "w", newline="", encoding="cp1252") as f:
        writer = csv.writer(f, dialect="excel", delimiter=";")
        writer.writerows([("file_name", "Label", "Notes"), *[(u, l, "") for u, l in ROWS], ("", "", "")])


def google_sheets(path):
    """Google Sheets' download as CSV: CRLF, no BOM, every column, no trailing newline."""
    text = io.StringIO()
    csv.writer(text, dialect="excel").writerows([("image_url", "reviewer", "label"),
                                                 *[(u, "bo", l) for u, l in ROWS]])
    path.write_bytes(text.getvalue().rstrip("\r\n").encode())


def headerless(path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(ROWS)


@pytest.mark.parametrize("write", [pandas_default, pandas_semicolons, excel_utf8, excel_european, google_sheets,
                                   headerless])
def test_csv_as_pandas_excel_and_sheets_write_it(write, tmp_path):
    path = tmp_path / "answers.csv"
    write(path)
    data = path.read_bytes()
    assert detect(data, "answers.csv") == "csv"
    result = parsed("csv", data)
    assert [(a.uri, a.label) for a in result.answers] == ROWS
    assert {(a.reviewer, a.reviewed_at) for a in result.answers} == {("ann@example.com", FILE_TIME)}


def test_the_format_is_told_from_the_content(tmp_path):
    assert detect(b"\xef\xbb\xbf  [{\"id\": 1}]", "f") == "label-studio"
    assert detect(b'{"images": []}', "f") == "coco"
    assert detect(CVAT.encode(), "f") == "cvat"
    assert detect(b"uri,label\r\n", "f") == "csv"


@pytest.mark.parametrize("source, data, says", [
    ("label-studio", b"[{oops", "not valid JSON"),
    ("label-studio", b'[{"image": "s3://a/b.jpg", "choice": "cat"}]', "not JSON_MIN"),
    ("coco", b'{"images": [{"id": 1, "file_name": "a"}], "annotations": [{"id": 5, "image_id": 1, '
             b'"category_id": 3}], "categories": []}', "category_id 3"),
    ("cvat", b"<annotations><version>1.1</version>", "not a CVAT XML file"),
    ("cvat", b"<annotations><track id='0' label='car'/></annotations>", "CVAT for images 1.1"),
    ("csv", b"name,score\r\nx,1\r\n", "a CSV without a uri column"),
    ("yaml", b"x", "--from yaml: give one of label-studio, coco, cvat, csv"),
])
def test_a_bad_file_says_what_is_wrong(source, data, says):
    with pytest.raises(UserError, match=says):
        parsed(source, data)


# --- the table ---------------------------------------------------------------------------------------------------
def test_the_latest_answer_per_input_is_its_truth():
    t0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
    from pipeline.review.truth.answers import Answer

    first = to_table([Answer("a", "cat", None, "x", t0 + timedelta(hours=2)), Answer("b", "cat", None, "x", t0),
                      Answer("c", "cat", None, "x", None)], "csv", "i1", t0)
    second = to_table([Answer("a", "dog", None, "y", t0 + timedelta(hours=1)),  # reviewed earlier: not the truth
                       Answer("b", "dog", None, "y", t0), Answer("c", "dog", None, "y", t0)], "csv", "i2",
                      t0 + timedelta(days=1))
    truth = latest(pa_concat(first, second))
    assert dict(zip(truth["uri"].to_pylist(), truth["label"].to_pylist())) == {"a": "cat", "b": "dog", "c": "dog"}


def pa_concat(*tables):
    import pyarrow as pa

    return pa.concat_tables(tables)


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_imports_append_beside_a_local_output_in_its_format(fmt, tmp_path):
    storage, output = Storage.from_env(), str(tmp_path / "out")
    run_once(output, fmt, 10, storage=storage)  # labels: dog, cat, dog, cat, dog per chunk of 5
    (tmp_path / "a.csv").write_text("uri,label\n" + "".join(f"{u},cat\n" for u in URIS[:4]) + "s3://photos/x.jpg,cat\n")
    (tmp_path / "b.csv").write_text(f"uri,label\n{URIS[0]},dog\n")
    done = import_truth(storage, output, str(tmp_path / "a.csv"), reviewer="ann")
    assert (done.answers, done.unknown, done.source) == (5, 1, "csv")
    import_truth(storage, output, str(tmp_path / "b.csv"))
    kept = SiblingTable.for_output(storage, output, "truth").read()
    imports = Counter(kept["import_id"].to_pylist())
    assert kept.num_rows == 6 and imports[done.import_id] == 5 and len(imports) == 2
    truth = read_truth(storage, output)
    assert truth.num_rows == 5
    scores = score_runs(open_output_for_reading(storage, output), truth)
    (run,) = scores.runs
    # answers: 0 dog (the later import), 1 cat, 2 cat, 3 cat; predictions: 0 dog, 1 cat, 2 dog, 3 cat
    assert (run.reviewed, run.correct, run.accuracy, scores.unpredicted) == (4, 3, 0.75, 1)
    if fmt == "delta":
        from deltalake import DeltaTable

        assert DeltaTable(output + "_truth").to_pyarrow_table().num_rows == 6  # a Delta table a reader opens
    if fmt == "iceberg":
        table = open_output_for_reading(storage, output).catalog.load_table("default.predictions_truth")
        assert table.location() == output + "_truth" and len(table.scan().to_arrow()) == 6


# --- scores ------------------------------------------------------------------------------------------------------
def test_accuracy_precision_recall_and_confusion_by_hand():
    run = RunScore("r", "m")
    for truth, predicted in [("cat", "cat"), ("cat", "dog"), ("dog", "dog"), ("dog", "dog"), ("bird", "cat")]:
        run.confusion[(truth, predicted)] += 1
    run.reviewed, run.correct = 5, 3
    assert run.accuracy == 0.6
    assert run.per_label() == [("cat", 0.5, 2, 0.5, 2), ("dog", 2 / 3, 3, 1.0, 2), ("bird", None, 0, 0.0, 1)]


def test_two_runs_on_the_reviewed_inputs_both_predicted():
    answers = {u: ("cat", None) for u in "abcde"}
    row = lambda label, error=None: {"label": label, "error_type": error}
    new = {"a": row("cat"), "b": row("cat"), "c": row("dog"), "d": row("cat"), "e": row(None, "decode.truncated")}
    old = {"a": row("cat"), "b": row("dog"), "c": row("cat"), "e": row("cat")}
    v = compare("new", "old", answers, new, old)
    assert (v.inputs, v.score, v.other_score, v.only_run, v.only_other) == (3, 2 / 3, 2 / 3, 1, 1)


def box(label, x1, y1, x2, y2, score=None):
    return {"label": label, "x1": x1, "y1": y1, "x2": x2, "y2": y2, **({"score": score} if score else {})}


TRUTH_BOXES = {URIS[0]: [box("cat", 0, 0, 10, 10)], URIS[1]: [box("dog", 0, 0, 10, 10)], URIS[2]: []}
DETECTIONS = {URIS[0]: [box("cat", 1, 1, 10, 10, 0.9), box("cat", 50, 50, 60, 60, 0.8)],
              URIS[1]: [box("dog", 50, 50, 60, 60, 0.9), box("dog", 0, 0, 10, 11, 0.8)],
              URIS[2]: [box("dog", 5, 5, 20, 20, 0.3)]}


def test_two_detectors_on_the_reviewed_images_both_predicted():
    answers = {uri: (None, boxes) for uri, boxes in TRUTH_BOXES.items()}
    new = {uri: {"detections": found, "error_type": None} for uri, found in DETECTIONS.items()}
    old = {uri: {"detections": found[:1], "error_type": None} for uri, found in DETECTIONS.items() if uri != URIS[2]}
    v = compare("new", "old", answers, new, old)  # on URIS[0:2]: new's dog ranks a miss first (AP 0.5), old's misses
    assert (v.inputs, v.metric, v.score, v.other_score) == (2, "mAP@0.5", pytest.approx(0.75), pytest.approx(0.5))


def test_map_at_50_by_hand_and_as_cocoeval_reads_coco_files(tmp_path):
    """cat: its one box found first (AP 1); dog: a miss scored above the hit and one in an empty image below it
    (precision 1/2 at recall 1: AP 0.5); mAP 0.75. COCOeval itself, on files, gives the same AP@0.5."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    mean, per_label = map_at_50(TRUTH_BOXES, DETECTIONS)
    assert mean == pytest.approx(0.75) and per_label == {"cat": (pytest.approx(1.0), 1), "dog": (0.5, 1)}
    ids, cats = {u: i + 1 for i, u in enumerate(TRUTH_BOXES)}, {"cat": 1, "dog": 2}
    coco_box = lambda b: [b["x1"], b["y1"], b["x2"] - b["x1"], b["y2"] - b["y1"]]
    gt = {"images": [{"id": i, "width": 100, "height": 100} for i in ids.values()],
          "categories": [{"id": i, "name": n} for n, i in cats.items()],
          "annotations": [{"id": n + 1, "image_id": ids[u], "category_id": cats[b["label"]], "bbox": coco_box(b),
                           "area": 100, "iscrowd": 0} for n, (u, b) in
                          enumerate((u, b) for u, bs in TRUTH_BOXES.items() for b in bs)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = [{"image_id": ids[u], "category_id": cats[b["label"]], "bbox": coco_box(b), "score": b["score"]}
               for u, bs in DETECTIONS.items() for b in bs]
    (tmp_path / "dt.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        evaluation = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert evaluation.stats[1] == pytest.approx(mean)  # AP at IoU 0.5, every area, 100 detections


def test_truth_import_and_report_through_the_command_in_process(tmp_path, capsys):
    """`pipeline truth import` then `report --truth`; a file whose answers miss the output is said; bad files and
    flags are one line, exit 2."""
    output = str(tmp_path / "out")
    run_once(output, "parquet", 5, storage=Storage.from_env())
    (tmp_path / "a.csv").write_text("uri,label\n" + "".join(f"{u},dog\n" for u in URIS[:5]) +
                                    "".join(f"s3://elsewhere/{i}.jpg,dog\n" for i in range(7)))
    assert main(["truth", "import", output, str(tmp_path / "a.csv"), "--reviewer", "ann"]) == 0
    assert "7 of 12 answers name inputs the output does not have" in capsys.readouterr().out
    assert main(["report", output, "--truth", "-o", str(tmp_path / "r.html")]) == 0
    printed = capsys.readouterr().out
    assert "accuracy 60.0% on 5 reviewed inputs (3 right)" in printed  # predictions: dog cat dog cat dog
    page = (tmp_path / "r.html").read_text()
    assert 'id="truth"' in page and "<th>answer \\ prediction</th>" in page
    first = printed.split("Report on run ")[1].split()[0]
    second = run_once(output, "parquet", 5, changed=3, storage=Storage.from_env())["run_id"]  # redoes 3 inputs
    assert main(["report", output, "--truth", "--against", first, "-o", str(tmp_path / "r2.html")]) == 0
    assert (f"run {second} against {first}, on the 3 reviewed inputs both predicted: accuracy 66.7% vs 66.7%; "
            f"right only in {second}: 0, right only in {first}: 0") in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{not json")
    for args, says in [([str(tmp_path / "bad.json")], "not valid JSON"),
                       ([str(tmp_path / "none.csv")], "no such file"),
                       ([str(tmp_path / "a.csv"), "--from", "xml"], "--from xml")]:
        assert main(["truth", "import", output, *args]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert main(["report", str(tmp_path / "out2"), "--truth"]) == 2
    empty = str(tmp_path / "empty")
    run_once(empty, "parquet", 2, storage=Storage.from_env())
    assert main(["report", empty, "--truth", "-o", str(tmp_path / "e.html")]) == 2
    assert "no reviewed answers at" in capsys.readouterr().err


def detection_output(output: str, detections: dict[str, list[dict]]) -> None:
    """A committed detection run with these boxes, written through the output's own front door (no model)."""
    import pyarrow as pa
    from output_driver import IDENTITY, MODIFIED, job
    from pipeline.job.rows import output_schema
    from pipeline.output import RunPolicy, open_output

    cfg, storage, schema = job(output, "parquet"), Storage.from_env(), output_schema("detection")
    with open_output(cfg.output, RunPolicy.of(cfg), storage, IDENTITY, schema, io.StringIO()) as side:
        sink = side.sink({"model": "boxes", "weights": "sha256:0", "run_id": side.run_id}, checkpoint_rows=10)
        sink.add(pa.table({"uri": list(detections), "etag": ["e"] * len(detections), "size": [1] * len(detections),
                           "last_modified": [MODIFIED] * len(detections), "detections": list(detections.values()),
                           "num_detections": [len(d) for d in detections.values()],
                           "error": pa.nulls(len(detections), pa.string())}))
        sink.flush()
        side.on_write_complete(sink)


def test_a_detector_s_map_at_50_through_the_command(tmp_path, capsys):
    """The boxes of the hand case above, answered in CVAT's XML: `report --truth` prints mAP@0.5 0.750."""
    output = str(tmp_path / "boxes")
    detection_output(output, DETECTIONS)
    cvat_box = '<box label="{label}" xtl="{x1}" ytl="{y1}" xbr="{x2}" ybr="{y2}" occluded="0" source="manual"/>'
    images = "".join(f'<image id="{i}" name="{uri}" width="100" height="100">'
                     + "".join(cvat_box.format(**b) for b in boxes) + "</image>"
                     for i, (uri, boxes) in enumerate(TRUTH_BOXES.items()))
    (tmp_path / "annotations.xml").write_text(f"<annotations><version>1.1</version>{images}</annotations>")
    assert main(["truth", "import", output, str(tmp_path / "annotations.xml")]) == 0
    assert "Imported 3 answer(s) (cvat)" in capsys.readouterr().out
    assert main(["report", output, "--truth", "-o", str(tmp_path / "r.html")]) == 0
    assert "mAP@0.5 0.750 on 3 reviewed images (2 answer boxes)" in capsys.readouterr().out
    assert "<th>AP@0.5</th>" in (tmp_path / "r.html").read_text()
