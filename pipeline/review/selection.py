"""Which rows of a run people should look at: `--select uncertain:N|random:N|label=NAME`, `--by`, `--per-label K`,
`--band LO:HI`. Streams the run's rows once, keeping only the best N (and K per predicted label) in heaps, so
memory stays bounded by what is exported, whatever the run's size. Rows with an error are never selected."""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from pipeline.job.errors import UserError

MEASURES = ("least-confidence", "margin", "entropy")
DEFAULT_BAND = (0.3, 0.7)


@dataclass(frozen=True)
class Selection:
    """What to export, parsed from the command line."""
    kind: str  # "uncertain", "random" or "label"
    count: int | None  # None: every row that qualifies (label=NAME)
    label: str | None = None
    measure: str = "least-confidence"
    per_label: int = 0
    band: tuple[float, float] = DEFAULT_BAND

    @classmethod
    def parse(cls, select: str, measure: str = "least-confidence", per_label: int | None = None,
              band: str | None = None) -> "Selection":
        kind, sep, value = select.partition("=" if select.startswith("label=") else ":")
        if kind == "label" and sep and value:
            return cls("label", None, value, measure, per_label or 0, parse_band(band))
        if kind in ("uncertain", "random") and sep and value.isdigit() and int(value) > 0:
            return cls(kind, int(value), None, measure, per_label or 0, parse_band(band))
        raise UserError(f"--select {select}: give uncertain:N, random:N (N a number above 0) or label=NAME")

    def describe(self) -> str:
        what = f"label={self.label}" if self.kind == "label" else f"{self.kind}:{self.count}"
        return what + (f", {self.per_label} per label first" if self.per_label else "")


def parse_band(band: str | None) -> tuple[float, float]:
    if band is None:
        return DEFAULT_BAND
    try:
        low, high = (float(part) for part in band.split(":"))
    except ValueError:
        low, high = 1.0, 0.0
    if not 0.0 <= low < high <= 1.0:
        raise UserError(f"--band {band}: give LO:HI, two detection scores with 0 <= LO < HI <= 1, e.g. 0.3:0.7")
    return low, high


def uncertainty(scores: list[float], measure: str) -> float:
    """How unsure a classifier was, from its top-k scores (best first): higher is less sure. Least confidence is
    1 - p1, margin 1 - (p1 - p2), entropy that of the top k renormalised to sum to 1."""
    if not scores:
        return 0.0
    if measure == "least-confidence":
        return 1.0 - scores[0]
    if measure == "margin":
        return 1.0 - (scores[0] - (scores[1] if len(scores) > 1 else 0.0))
    total = sum(scores)
    return -sum(p / total * math.log(p / total) for p in scores if p > 0) if total > 0 else 0.0


def box_uncertainty(detections: list[dict], band: tuple[float, float]) -> tuple[float, str | None]:
    """A detector's image: each box scored inside the band counts 0.5, plus up to 0.5 more the nearer its score is
    to the band's middle, so more and more doubtful boxes rank higher; and the label of its most doubtful box.
    (0, None) when no box falls in the band."""
    low, high = band
    middle, half = (low + high) / 2, (high - low) / 2
    total, doubt, label = 0.0, -1.0, None
    for box in detections:
        if low <= box["score"] <= high:
            this = 0.5 + 0.5 * (1.0 - abs(box["score"] - middle) / half)
            total += this
            if this > doubt:
                doubt, label = this, box["label"]
    return total, label


def random_rank(run_id: str, uri: str, frame) -> int:
    """A row's place in a random:N sample, seeded by the run id: the same export twice picks the same rows."""
    key = f"{run_id}\0{uri}\0{'' if frame is None else frame}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


@dataclass(order=True)
class Ranked:
    priority: float
    tiebreak: tuple = field(compare=True)
    row: dict = field(compare=False)


class Selector:
    """Keeps the N best rows, and the K best of each predicted label, as rows stream by."""

    def __init__(self, selection: Selection):
        self.selection = selection
        self.best: list[Ranked] = []  # min-heaps: the worst kept row is dropped first
        self.per_label: dict[str, list[Ranked]] = {}
        self.seen = 0
        self.collapsed = 0  # rows left out as near-duplicates of their group's representative

    def add(self, row: dict, priority: float, label: str | None) -> None:
        self.seen += 1
        heaps = [(self.best, self.selection.count)]
        if self.selection.per_label and label is not None:
            heaps.append((self.per_label.setdefault(label, []), self.selection.per_label))
        ranked = None
        for heap, size in heaps:
            if size is not None and len(heap) >= size and priority < heap[0].priority:
                continue  # below every kept row: most rows of a large run stop here, cheaply
            ranked = ranked or Ranked(priority, _tiebreak(row), row)
            if size is None:
                heap.append(ranked)
            else:
                _push(heap, ranked, size)

    def chosen(self) -> list[dict]:
        """K per label first (rare labels seen), then the rest of the N best, in order of priority."""
        quota = {id(r.row): r for heap in self.per_label.values() for r in heap}
        rest = sorted((r for r in self.best if id(r.row) not in quota), reverse=True)
        room = len(rest) if self.selection.count is None else max(0, self.selection.count - len(quota))
        return [r.row for r in sorted([*quota.values(), *rest[:room]], reverse=True)]


def _push(heap: list[Ranked], ranked: Ranked, size: int) -> None:
    if len(heap) < size:
        heapq.heappush(heap, ranked)
    elif ranked > heap[0]:
        heapq.heapreplace(heap, ranked)


def _tiebreak(row: dict) -> tuple:
    # Reversed so that, at equal priority, the smaller uri ranks higher (sorted(..., reverse=True) puts it first).
    return tuple(-b for b in row["uri"].encode()[:64]) + (-(row.get("frame") or 0),)


def select(rows: Iterable[dict], selection: Selection, skip: set[str] | None = None) -> Selector:
    """Feeds every eligible row to a `Selector`: no error, not a near-duplicate of another (`skip`), for
    uncertain:N a detector's image with a box in the band, for label=NAME a row predicting NAME."""
    selector = Selector(selection)
    for row in rows:
        if row.get("error_type") is not None:
            continue
        if skip and row["uri"] in skip:
            selector.collapsed += 1
            continue
        scored = _priority(row, selection, "detections" in row)
        if scored is not None:
            selector.add(row, *scored)
    return selector


def _priority(row: dict, selection: Selection, detector: bool) -> tuple[float, str | None] | None:
    if detector:
        doubt, label = box_uncertainty(row.get("detections") or [], selection.band)
        label = label or next((box["label"] for box in row.get("detections") or []), None)
    else:
        scores = row.get("topk_scores") or ([row["score"]] if row.get("score") is not None else [])
        doubt, label = uncertainty(scores, selection.measure), row.get("label")
    if selection.kind == "random":
        return float(random_rank(row["run_id"], row["uri"], row.get("frame"))), label
    if selection.kind == "label":
        predicted = {box["label"] for box in row.get("detections") or []} if detector else {row.get("label")}
        return (doubt, label) if selection.label in predicted else None
    if detector and doubt == 0.0:
        return None
    return doubt, label


def rows_of(batches: Iterable) -> Iterator[dict]:
    """Arrow tables as rows (dicts), a batch at a time."""
    for batch in batches:
        yield from batch.to_pylist()
