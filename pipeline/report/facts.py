"""What a report says about a run, gathered in one pass over its rows a batch at a time: memory grows with
the number of labels and error types, never with the rows (a 10M-row night reads like a 10k-row one).

Samples (thumbnails per label, examples per error type, changed inputs) are the rows with the smallest hash
of their key: the same rows whatever order the files are read in, and spread over the whole run rather than
its first files."""

from __future__ import annotations

import hashlib
import heapq
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

SCORE_BINS = 20
COLUMNS = ["uri", "frame", "error", "error_type", "label", "score", "topk_labels", "topk_scores", "detections",
           "num_detections", "image_width", "image_height", "modality"]
NO_DETECTION = "(nothing detected)"


@dataclass(frozen=True)
class Sample:
    """One row shown as a thumbnail: which input (and DICOM frame), and what to write and draw on it."""
    uri: str
    frame: int | None
    caption: str
    size: tuple[int, int] | None = None  # the upright image's (width, height), which boxes are in
    boxes: tuple = ()  # (label, score, x1, y1, x2, y2)


class Reservoir:
    """The k items with the smallest key hash, per group."""

    def __init__(self, k: int):
        self.k = k
        self.heaps: dict[str, list[tuple[int, str, object]]] = defaultdict(list)

    def offer(self, group: str, key: str, item: object) -> None:
        rank = -int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        heap = self.heaps[group]
        if len(heap) < self.k:
            heapq.heappush(heap, (rank, key, item))
        elif rank > heap[0][0]:
            heapq.heapreplace(heap, (rank, key, item))

    def items(self, group: str) -> list:
        return [item for _, _, item in sorted(self.heaps.get(group, []), reverse=True)]


@dataclass
class RunFacts:
    task: str  # classification | detection
    rows: int = 0
    inputs: int = 0
    errors: int = 0
    dicom: bool = False
    labels: Counter = field(default_factory=Counter)  # rows per label (detection: boxes per label)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # label -> counts per score bin
    images_with_detections: int = 0
    errors_by_type: Counter = field(default_factory=Counter)
    error_examples: Reservoir = field(default_factory=lambda: Reservoir(3))
    samples: Reservoir = field(default_factory=lambda: Reservoir(6))

    def top_labels(self, n: int) -> list[str]:
        return [label for label, _ in self.labels.most_common(n)]


def gather(tables: Iterable[pa.Table], samples_per_label: int = 6) -> RunFacts:
    facts: RunFacts | None = None
    frames_seen: set[str] = set()  # a DICOM input has a row per frame: inputs are its distinct URIs
    for table in tables:
        if facts is None:
            facts = RunFacts("detection" if "detections" in table.column_names else "classification",
                             dicom="frame" in table.column_names, samples=Reservoir(samples_per_label))
        for row in table.to_pylist():
            _add_row(facts, row, frames_seen)
    facts = facts or RunFacts("classification")
    facts.inputs = len(frames_seen) if facts.dicom else facts.rows
    return facts


def _add_row(facts: RunFacts, row: dict, frames_seen: set[str]) -> None:
    facts.rows += 1
    if facts.dicom:
        frames_seen.add(row["uri"])
    key = f"{row['uri']}#{row.get('frame')}"
    if row.get("error_type"):
        facts.errors += 1
        facts.errors_by_type[row["error_type"]] += 1
        facts.error_examples.offer(row["error_type"], key, (row["uri"], row.get("error") or ""))
        return
    if facts.task == "detection":
        _add_detections(facts, row, key)
    elif row.get("label") is not None:
        _count(facts, row["label"], row.get("score"))
        caption = f"{row['label']} {row['score']:.2f}" if row.get("score") is not None else row["label"]
        facts.samples.offer(row["label"], key, Sample(row["uri"], row.get("frame"), caption, _size(row)))


def _add_detections(facts: RunFacts, row: dict, key: str) -> None:
    found = row.get("detections") or []
    boxes = tuple((d["label"], d["score"], d["x1"], d["y1"], d["x2"], d["y2"]) for d in found)
    facts.images_with_detections += bool(found)
    for d in found:
        _count(facts, d["label"], d["score"])
    labels = sorted({d["label"] for d in found}) or [NO_DETECTION]
    for label in labels:
        mine = [b for b in boxes if b[0] == label]
        caption = f"{label} ×{len(mine)}" if mine else label
        facts.samples.offer(label, key, Sample(row["uri"], row.get("frame"), caption, _size(row), boxes))


def _count(facts: RunFacts, label: str, score: float | None) -> None:
    facts.labels[label] += 1
    if score is not None and score == score:
        if label not in facts.scores:
            facts.scores[label] = np.zeros(SCORE_BINS, dtype=np.int64)
        facts.scores[label][min(int(score * SCORE_BINS), SCORE_BINS - 1)] += 1


def _size(row: dict) -> tuple[int, int] | None:
    return (row["image_width"], row["image_height"]) if row.get("image_width") and row.get("image_height") else None


# --- two runs compared ---------------------------------------------------------------------------------------
@dataclass
class Changes:
    """Inputs of both runs and how their label moved: (old label, new label) -> count."""
    compared: int = 0
    same_top1: int = 0
    new_in_old_topk: int = 0  # inputs whose label changed to one of the old run's top-k (classification)
    has_topk: bool = False
    pairs: Counter = field(default_factory=Counter)
    only_old: int = 0
    only_new: int = 0
    samples: Reservoir = field(default_factory=lambda: Reservoir(4))  # per "old → new" pair

    def top_pairs(self, n: int) -> list[tuple[tuple[str, str], int]]:
        return self.pairs.most_common(n)


def row_label(row: dict) -> str:
    """A row's one label: the classifier's top-1, a detector's highest-scoring box, or what went wrong."""
    if row.get("error_type"):
        return f"error: {row['error_type']}"
    if "detections" in row:
        found = row.get("detections") or []
        return max(found, key=lambda d: d["score"])["label"] if found else NO_DETECTION
    return row.get("label") or "?"


def compare(old: Iterable[pa.Table], new: Iterable[pa.Table]) -> Changes:
    """The old run's labels held by a digest of each input (a dict of the old run's inputs, labels interned: the
    one part that grows with rows), then the new run streamed against it."""
    before: dict[bytes, tuple[str, tuple]] = {}
    for table in old:
        for row in table.to_pylist():
            label, topk = row_label(row), row.get("topk_labels") or ()
            before[_row_key_digest(row)] = (sys.intern(label), tuple(sys.intern(t) for t in topk))
    changes = Changes()
    for row in _rows(new):
        key = f"{row['uri']}#{row.get('frame')}"
        earlier = before.pop(_row_key_digest(row), None)
        if earlier is None:
            changes.only_new += 1
            continue
        (old_label, old_topk), label = earlier, row_label(row)
        changes.compared += 1
        changes.has_topk = changes.has_topk or bool(old_topk)
        if label == old_label:
            changes.same_top1 += 1
            continue
        changes.new_in_old_topk += label in old_topk
        changes.pairs[(old_label, label)] += 1
        changes.samples.offer(f"{old_label} → {label}", key,
                              Sample(row["uri"], row.get("frame"), f"{old_label} → {label}", _size(row)))
    changes.only_old = len(before)
    return changes


def _row_key_digest(row: dict) -> bytes:
    """An input's key in 8 bytes (a URI is ~40-200): collisions are ~1 in 10^7 at 1M inputs."""
    return hashlib.blake2b(f"{row['uri']}#{row.get('frame')}".encode(), digest_size=8).digest()


def _rows(tables: Iterable[pa.Table]) -> Iterator[dict]:
    for table in tables:
        yield from table.to_pylist()
