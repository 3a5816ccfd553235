"""Runs scored against reviewers' answers (`pipeline report OUTPUT --truth`): for each live run with reviewed
inputs, a classifier's accuracy, per-label precision and recall and its confusion matrix, or a detector's mAP@0.5
(pycocotools' COCOeval, one IoU threshold of 0.5), each with the number of reviewed inputs it rests on; and two runs
compared on the reviewed inputs both predicted. The answers come in as a table of each input's latest answer (uri,
label, boxes): reading the truth table is the review layer's. One pass over the live rows; only reviewed inputs'
predictions are kept."""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.formats import OutputFormat

COLUMNS = ["uri", "frame", "run_id", "error_type", "label", "detections"]


@dataclass
class RunScore:
    """One run against the answers. `reviewed`: reviewed inputs it predicted (the figures rest on these);
    `failed`: reviewed inputs whose row in it is an error (not scored)."""
    run_id: str
    model: str
    task: str = "classification"
    reviewed: int = 0
    failed: int = 0
    correct: int = 0
    confusion: Counter = field(default_factory=Counter)  # (truth label, predicted label) -> inputs
    map50: float | None = None
    ap50: dict[str, tuple[float | None, int]] = field(default_factory=dict)  # label -> (AP@0.5, truth boxes)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.reviewed if self.reviewed else None

    def per_label(self) -> list[tuple[str, float | None, int, float | None, int]]:
        """(label, precision, inputs predicted as it, recall, inputs whose answer is it), most answered first."""
        truth, predicted = Counter(), Counter()
        for (t, p), n in self.confusion.items():
            truth[t] += n
            predicted[p] += n
        labels = sorted(set(truth) | set(predicted), key=lambda label: (-truth[label], label))
        right = lambda label: self.confusion[(label, label)]
        return [(label, right(label) / predicted[label] if predicted[label] else None, predicted[label],
                 right(label) / truth[label] if truth[label] else None, truth[label]) for label in labels]


@dataclass
class Versus:
    """Two runs on the reviewed inputs both predicted: each one's accuracy (or mAP@0.5), and the inputs one gets
    right and the other wrong (classification)."""
    run_id: str
    other_id: str
    inputs: int
    score: float | None
    other_score: float | None
    metric: str
    only_run: int = 0
    only_other: int = 0


@dataclass
class TruthScores:
    reviewed: int  # inputs with an answer
    unpredicted: int  # of them, inputs no live run predicted
    runs: list[RunScore]
    versus: Versus | None = None


def score_runs(table: OutputFormat, truth: pa.Table, run_id: str | None = None,
               against: str | None = None) -> TruthScores:
    """Every live run against `truth` (one latest answer per uri); with `against`, `run_id` (default the latest)
    and that run compared on the reviewed inputs both predicted."""
    answers = {row["uri"]: (row.get("label"), row.get("boxes")) for row in truth.to_pylist()}
    records = table.live()
    predicted = _reviewed_rows(table, [r["run_id"] for r in records], answers)
    runs = [_score(r["run_id"], str(r.get("model", "?")), answers, predicted.get(r["run_id"], {})) for r in records]
    seen = {uri for rows in predicted.values() for uri in rows}
    versus = None
    if against is not None:
        run_id = run_id or records[-1]["run_id"]
        versus = compare(run_id, against, answers, predicted.get(run_id, {}), predicted.get(against, {}))
    return TruthScores(len(answers), len(set(answers) - seen), runs, versus)


def _reviewed_rows(table: OutputFormat, run_ids: list[str], answers: dict) -> dict[str, dict[str, dict]]:
    """run id -> uri -> its row, for reviewed inputs only (a DICOM input: its first frame)."""
    wanted = pa.array(sorted(answers), pa.string())
    found: dict[str, dict[str, dict]] = {}
    if not run_ids:
        return found
    for batch in table.rows(run_ids).batches(table.storage, COLUMNS):
        for row in batch.filter(pc.is_in(batch.column("uri"), value_set=wanted)).to_pylist():
            mine = found.setdefault(row["run_id"], {})
            if row["uri"] not in mine or (row.get("frame") or 0) < (mine[row["uri"]].get("frame") or 0):
                mine[row["uri"]] = row
    return found


def _score(run_id: str, model: str, answers: dict, rows: dict[str, dict]) -> RunScore:
    score = RunScore(run_id, model, _task(rows))
    usable = {}
    for uri, row in rows.items():
        label, boxes = answers[uri]
        if (boxes if score.task == "detection" else label) is None:
            continue  # answered for the other task
        if row.get("error_type"):
            score.failed += 1
        else:
            usable[uri] = row
    score.reviewed = len(usable)
    if score.task == "detection":
        score.map50, score.ap50 = map_at_50({u: answers[u][1] for u in usable},
                                            {u: r.get("detections") or [] for u, r in usable.items()})
        return score
    for uri, row in usable.items():
        score.confusion[(answers[uri][0], row.get("label"))] += 1
    score.correct = sum(n for (t, p), n in score.confusion.items() if t == p)
    return score


def compare(run_id: str, other_id: str, answers: dict, rows: dict, other_rows: dict) -> Versus:
    detection = _task(rows) == "detection"
    both = [u for u in rows if u in other_rows and not rows[u].get("error_type")
            and not other_rows[u].get("error_type") and answers[u][1 if detection else 0] is not None]
    mine = _score(run_id, "", answers, {u: rows[u] for u in both})
    theirs = _score(other_id, "", answers, {u: other_rows[u] for u in both})
    if detection:
        return Versus(run_id, other_id, len(both), mine.map50, theirs.map50, "mAP@0.5")
    right = lambda r, u: r[u].get("label") == answers[u][0]
    return Versus(run_id, other_id, len(both), mine.accuracy, theirs.accuracy, "accuracy",
                  sum(right(rows, u) and not right(other_rows, u) for u in both),
                  sum(right(other_rows, u) and not right(rows, u) for u in both))


def _task(rows: dict[str, dict]) -> str:
    return "detection" if any("detections" in r for r in rows.values()) else "classification"


def map_at_50(truth: dict[str, list[dict]], detections: dict[str, list[dict]]
              ) -> tuple[float | None, dict[str, tuple[float | None, int]]]:
    """mAP@0.5 over the images of `truth` (uri -> boxes; an empty list: nothing there) by pycocotools' COCOeval
    (101-point interpolated AP, the mean over labels with answer boxes), and each label's (AP, answer boxes)."""
    if not truth:
        return None, {}
    from pycocotools.cocoeval import COCOeval

    labels = sorted({b["label"] for boxes in truth.values() for b in boxes}
                    | {d["label"] for uri in truth for d in detections.get(uri, [])})
    ids = {label: i + 1 for i, label in enumerate(labels)}
    images = {uri: i + 1 for i, uri in enumerate(truth)}
    gt = _coco(images, ids, [(images[u], b, None) for u, boxes in truth.items() for b in boxes])
    dt = _coco(images, ids, [(images[u], d, d["score"]) for u in truth for d in detections.get(u, [])])
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.params.iouThrs = np.array([0.5])
        most = max((len(detections.get(u, [])) for u in truth), default=0)
        evaluation.params.maxDets = [1, 10, max(100, most)]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][0, :, :, 0, -1]  # recall thresholds x labels, area all, most boxes
    counts = Counter(b["label"] for boxes in truth.values() for b in boxes)
    per_label = {}
    for label, k in ids.items():
        valid = precision[:, k - 1][precision[:, k - 1] > -1]
        per_label[label] = (float(valid.mean()) if len(valid) else None, counts[label])
    aps = [ap for ap, n in per_label.values() if ap is not None and n]
    return (float(np.mean(aps)) if aps else None), per_label


def _coco(images: dict[str, int], ids: dict[str, int], boxes: list[tuple[int, dict, float | None]]):
    """A pycocotools COCO object of these boxes (x1, y1, x2, y2 to COCO's x, y, width, height)."""
    from pycocotools.coco import COCO

    annotations = []
    for n, (image, box, score) in enumerate(boxes, start=1):
        w, h = box["x2"] - box["x1"], box["y2"] - box["y1"]
        annotations.append({"id": n, "image_id": image, "category_id": ids[box["label"]], "iscrowd": 0,
                            "bbox": [box["x1"], box["y1"], w, h], "area": w * h,
                            **({"score": score} if score is not None else {})})
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in images.values()], "annotations": annotations,
                    "categories": [{"id": i, "name": label} for label, i in ids.items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# --- what is said -------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _ap(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def headline(run: RunScore) -> str:
    """A run's figure in one phrase, with what it rests on."""
    if not run.reviewed:
        return "no reviewed inputs" + (f" ({run.failed} reviewed input(s) failed in it)" if run.failed else "")
    if run.task == "detection":
        boxes = sum(n for _, n in run.ap50.values())
        text = f"mAP@0.5 {_ap(run.map50)} on {run.reviewed} reviewed images ({boxes} answer boxes)"
    else:
        text = f"accuracy {_pct(run.accuracy)} on {run.reviewed} reviewed inputs ({run.correct} right)"
    return text + (f"; {run.failed} reviewed input(s) failed in this run, not scored" if run.failed else "")


def versus_line(v: Versus) -> str:
    show = _ap if v.metric == "mAP@0.5" else _pct
    text = (f"run {v.run_id} against {v.other_id}, on the {v.inputs} reviewed inputs both predicted: {v.metric} "
            f"{show(v.score)} vs {show(v.other_score)}")
    if v.metric == "accuracy":
        text += f"; right only in {v.run_id}: {v.only_run}, right only in {v.other_id}: {v.only_other}"
    return text


def lines(scores: TruthScores) -> list[str]:
    """What `pipeline report --truth` prints: a line per run, and the comparison."""
    said = [f"Truth: {scores.reviewed} reviewed input(s)"
            + (f", {scores.unpredicted} of them predicted by no live run" if scores.unpredicted else "")]
    said += [f"  run {r.run_id} ({r.model}): {headline(r)}" for r in scores.runs]
    if scores.versus is not None:
        said.append("  " + versus_line(scores.versus))
    return said
