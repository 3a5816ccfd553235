"""The report's charts, drawn by matplotlib as inline SVG: vector, no script, no network, text kept as text
(searchable, and sized by the page's font). Each function takes plain counts and returns an <svg> string.

Labels are data: matplotlib would read a label with two `$` in it as maths (`cost $5 to $10` drawn in italics,
`$\\foo$` an error), so every Text the charts make is plain text (text.parse_math off, no TeX)."""

from __future__ import annotations

import io
import re

import numpy as np

WIDTH_IN = 7.5
BAR_COLOUR = "#4363d8"
ERROR_COLOUR = "#e6194b"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
                                "axes.spines.right": False, "svg.hashsalt": "pipeline",
                                "text.parse_math": False, "text.usetex": False})
    import matplotlib.pyplot as plt

    return plt


def _svg(figure) -> str:
    plt = _pyplot()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]  # the XML prolog and doctype do not belong inside HTML
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)


def bars(counts: list[tuple[str, int]], title: str, colour: str = BAR_COLOUR) -> str:
    """Horizontal bars, largest first (label distribution, errors by type)."""
    plt = _pyplot()
    names = [name for name, _ in counts][::-1]
    values = [value for _, value in counts][::-1]
    figure, axes = plt.subplots(figsize=(WIDTH_IN, 0.6 + 0.26 * len(counts)))
    axes.barh(range(len(values)), values, color=colour)
    axes.set_yticks(range(len(names)), names)
    for i, value in enumerate(values):
        axes.text(value, i, f" {value:,}", va="center")
    axes.set_title(title, loc="left")
    axes.set_xlim(0, max(values or [1]) * 1.15)
    axes.xaxis.get_major_locator().set_params(integer=True)  # counts: no 0.2 of an image
    return _svg(figure)


def score_distributions(scores: dict[str, np.ndarray], labels: list[str]) -> str:
    """Per label, the share of its rows in each score bin, as small multiples on a shared 0..1 axis."""
    plt = _pyplot()
    rows = max(1, len(labels))
    figure, axes = plt.subplots(rows, 1, figsize=(WIDTH_IN, 0.55 * rows + 0.6), sharex=True, squeeze=False)
    for axis, label in zip(axes[:, 0], labels):
        counts = scores.get(label, np.zeros(20))
        edges = np.linspace(0, 1, len(counts) + 1)
        axis.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color=BAR_COLOUR)
        axis.set_yticks([])
        axis.set_ylabel(label, rotation=0, ha="right", va="center")
        axis.spines["left"].set_visible(False)
    axes[-1, 0].set_xlim(0, 1)
    axes[-1, 0].set_xlabel("score")
    axes[0, 0].set_title("score distribution per label", loc="left")
    return _svg(figure)


def throughput(samples: list[list[float]], title: str = "rows written over the run") -> str | None:
    """Rows written against seconds since the run (or its last attempt) started, as recorded: the driver's count
    at each (seconds, rows) sample, which climbs in steps as blocks of rows reach it, and the average rate as a
    dashed line. Rates between two samples are not drawn: a block that arrives at once is not a burst of work."""
    if len(samples) < 2:
        return None
    plt = _pyplot()
    points = np.array(samples, dtype=np.float64)
    seconds, rows = points[:, 0], points[:, 1]
    end = max(seconds[-1], 1e-9)
    figure, axes = plt.subplots(figsize=(WIDTH_IN, 2.4))
    axes.step(seconds, rows, where="post", color=BAR_COLOUR, linewidth=1.5, label="rows written")
    axes.plot(seconds, rows, "o", color=BAR_COLOUR, markersize=2.5)
    axes.plot([0, end], [0, rows[-1]], color="#888", linestyle="--", linewidth=1,
              label=f"average: {rows[-1] / end:,.1f} images/s")
    axes.set_xlabel("seconds since the run started")
    axes.set_ylabel("rows")
    axes.set_ylim(bottom=0)
    axes.set_xlim(0, end)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.legend(frameon=False, loc="upper left")
    axes.set_title(title, loc="left")
    return _svg(figure)
