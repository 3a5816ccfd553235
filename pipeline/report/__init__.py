"""`pipeline report OUTPUT`: one self-contained HTML page about a committed run (its facts and provenance,
labels and scores, errors with examples, a contact sheet of thumbnails, its throughput, and with `--against`
the inputs whose label changed since another run). Reads the output as any reader would, without Ray. The
modules: pipeline/ARCHITECTURE.md; why matplotlib and jinja2: docs/design-notes.md."""

from __future__ import annotations

from datetime import datetime, timezone

from pipeline.output.formats import OutputFormat
from pipeline.report import charts
from pipeline.report.facts import COLUMNS, Changes, RunFacts, Sample, compare, gather
from pipeline.report.outputs import find_run, run_rows
from pipeline.report.scores import TruthScores, headline, versus_line
from pipeline.report.thumbnails import thumbnails

SHEET_LABELS = 12  # labels on the contact sheet and in the score chart; the bar chart shows LABEL_BARS
LABEL_BARS = 25
CHANGE_PAIRS = 20
CONFUSION_LABELS = 15  # labels a confusion matrix shows by name; the rest are "(other)"


def build_report(table: OutputFormat, run_id: str | None = None, against: str | None = None,
                 scores: TruthScores | None = None) -> tuple[str, str]:
    """(the run id reported, the page's HTML): the report on `run_id`, the latest committed run by default;
    `scores` (pipeline/report/scores.py) adds the runs scored against reviewers' answers."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    record = find_run(table, run_id)
    facts = gather(run_rows(table, record["run_id"], COLUMNS))
    changes = None
    if against is not None:
        earlier = find_run(table, against, flag="--against")
        columns = ["uri", "frame", "error_type", "label", "topk_labels", "detections", "image_width", "image_height"]
        changes = (earlier["run_id"], compare(run_rows(table, earlier["run_id"], columns),
                                              run_rows(table, record["run_id"], columns)))
    env = Environment(loader=PackageLoader("pipeline", "report"), autoescape=select_autoescape(["j2", "html"]))
    shown = page(table, record, facts, changes)
    shown["truth"] = truth_section(scores) if scores is not None else None
    return record["run_id"], env.get_template("report.html.j2").render(**shown)


def page(table: OutputFormat, record: dict, facts: RunFacts, changes: tuple[str, Changes] | None) -> dict:
    withheld = bool(record.get("pseudonyms"))
    sheet_labels = facts.top_labels(SHEET_LABELS)
    samples = [s for label in sheet_labels for s in facts.samples.items(label)]
    if changes is not None:
        samples += [s for (old, new), _ in changes[1].top_pairs(6) for s in changes[1].samples.items(f"{old} → {new}")]
    shown = {} if withheld else thumbnails(table.storage, samples)
    missing = "withheld: the output is pseudonymised" if withheld else "input unavailable or unreadable"

    def thumbs(items: list[Sample]) -> list[dict]:
        return [{"src": shown.get(s), "caption": s.caption, "name": _name(s), "missing": missing} for s in items]

    other = len(facts.labels) - LABEL_BARS
    return {
        "run": record, "task": facts.task + (" (DICOM)" if facts.dicom else ""), "output": table.uri,
        "output_format": table.name, "facts": run_facts(record, facts), "provenance": provenance(table, record),
        "labels_chart": charts.bars(facts.labels.most_common(LABEL_BARS),
                                    "boxes per label" if facts.task == "detection" else "rows per label")
        if facts.labels else None,
        "other_labels": f"and {other:,} more labels, {sum(n for _, n in facts.labels.most_common()[LABEL_BARS:]):,} "
                        "rows" if other > 0 else None,
        "scores_chart": charts.score_distributions(facts.scores, [l for l in sheet_labels if l in facts.scores])
        if facts.scores else None,
        "errors": [{"type": kind, "count": f"{n:,}", "examples": facts.error_examples.items(kind)}
                   for kind, n in facts.errors_by_type.most_common()],
        "errors_chart": charts.bars(facts.errors_by_type.most_common(15), "rows per error type", charts.ERROR_COLOUR)
        if facts.errors_by_type else None,
        "sheet": [{"label": label, "count": f"{facts.labels[label]:,}" if label in facts.labels else "",
                   "thumbs": thumbs(facts.samples.items(label))} for label in sheet_labels],
        "sheet_note": sheet_note(facts, withheld, len(sheet_labels)),
        **throughput_section(record),
        "throughput_note": "This run recorded no progress samples (runs before this version, or too short).",
        "against": against_section(changes, thumbs) if changes else None,
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def sheet_note(facts: RunFacts, withheld: bool, labels: int) -> str:
    if facts.rows == 0:
        return ("This run wrote no rows: every input it listed was already done (an incremental run with nothing "
                "new). `pipeline runs` lists the runs; `--run RUN_ID` reports one of them.")
    if withheld:
        return "Thumbnails are withheld: this output is pseudonymised, so its rows name no input to fetch."
    return (f"Up to {facts.samples.k} inputs per label, for the {labels} most frequent labels, chosen by a hash of "
            "their URI (the same ones on every report of this run).")


def run_facts(record: dict, facts: RunFacts) -> list[tuple[str, str]]:
    shown = [("inputs", f"{facts.inputs:,}"), ("predicted", f"{facts.rows - facts.errors:,}"),
             ("errors", f"{facts.errors:,}"), ("rows", f"{facts.rows:,}")]
    if facts.task == "detection":
        shown += [("boxes", f"{sum(facts.labels.values()):,}"),
                  ("images with boxes", f"{facts.images_with_detections:,}")]
    tries = attempts(record)
    if len(tries) > 1:
        shown += [("attempts", f"{len(tries)}")]
        if tries[-1]["rows"] is not None:
            resumed = record.get("rows", facts.rows) - tries[-1]["rows"]
            shown += [("rows resumed from interrupted attempts", f"{resumed:,}")]
        timed = [a for a in tries if a["rows"] is not None and a["elapsed_s"]]
        seconds = sum(a["elapsed_s"] for a in timed)
        if seconds:
            shown += [(f"elapsed, {len(timed)} attempts", f"{seconds:,.1f} s"),
                      (f"images/s over {len(timed)} attempts", f"{sum(a['rows'] for a in timed) / seconds:,.1f}")]
    elif record.get("elapsed_s") is not None:
        shown += [("elapsed", f"{record['elapsed_s']:,.1f} s"), ("images/s", f"{record.get('images_per_s', 0):,.1f}")]
    return shown


def throughput_section(record: dict) -> dict:
    """The chart of rows over the run (its last attempt's), and a resumed run's attempts as table rows."""
    tries = attempts(record)
    title = "rows written over the run" if len(tries) == 1 else f"rows written by the last of {len(tries)} attempts"
    shown = [{**a, "rows": "–" if a["rows"] is None else f"{a['rows']:,}",
              "elapsed_s": "–" if a["elapsed_s"] is None else f"{a['elapsed_s']:,.1f} s"} for a in tries]
    return {"throughput_chart": charts.throughput(record.get("progress") or [], title),
            "attempts": shown if len(tries) > 1 else None}


def attempts(record: dict) -> list[dict]:
    """Each attempt of the run, oldest first: its start, the rows it wrote (None where its record does not say),
    seconds, images/s and how it ended. Earlier attempts were interrupted and resumed by the next one; a run
    committed before attempts were recorded gives only their starts."""
    starts = record.get("attempts") or [record.get("started_at")]
    earlier = record.get("interrupted_attempts") or []
    progress = record.get("progress") or []
    last = {"started_at": starts[-1], "rows": progress[-1][1] if progress else None,
            "elapsed_s": record.get("elapsed_s"), "ended": "committed"}
    tries = [{"rows": None, "elapsed_s": None, **(earlier[i] if i < len(earlier) else {"started_at": start}),
              "ended": "interrupted"} for i, start in enumerate(starts[:-1])] + [last]
    for attempt in tries:
        rate = attempt["rows"] / attempt["elapsed_s"] if attempt["rows"] is not None and attempt["elapsed_s"] else None
        attempt["images_per_s"] = f"{rate:,.1f}" if rate is not None else "–"
    return tries


def provenance(table: OutputFormat, record: dict) -> list[tuple[str, str]]:
    keys = [("run id", "run_id"), ("input", "input"), ("model", "model"), ("weights", "weights"),
            ("model key", "model_key"), ("job key", "job_key"), ("mode", "mode"), ("started", "started_at"),
            ("committed", "committed_at"), ("pseudonym key id", "pseudonyms"), ("record format", "format")]
    shown = [(name, str(record[key])) for name, key in keys if record.get(key) is not None]
    shown.insert(3, ("output", f"{table.uri} ({table.name})"))
    if len(record.get("attempts") or []) > 1:
        shown.append(("attempts", ", ".join(record["attempts"])))
    return shown


def against_section(changes: tuple[str, Changes], thumbs) -> dict:
    run_id, c = changes
    changed = sum(c.pairs.values())
    facts = [("inputs in both runs", f"{c.compared:,}"), ("same label", _share(c.same_top1, c.compared)),
             ("label changed", f"{changed:,}")]
    if c.has_topk:  # among the changed inputs only: an unchanged label is in the old top-k by definition
        facts.append((f"of the {changed:,} changed, new label in the old top-k", _share(c.new_in_old_topk, changed)))
    facts += [("only in this run", f"{c.only_new:,}"), (f"only in {run_id}", f"{c.only_old:,}")]
    return {"run_id": run_id, "facts": facts,
            "pairs": [(old, new, f"{n:,}") for (old, new), n in c.top_pairs(CHANGE_PAIRS)],
            "sheet": [{"label": f"{old} → {new}", "count": f"{n:,}", "thumbs": thumbs(c.samples.items(f"{old} → {new}"))}
                      for (old, new), n in c.top_pairs(6)]}


def truth_section(scores: TruthScores) -> dict:
    """Each live run against the answers: its figure, per-label precision and recall (a detector: AP@0.5) with
    the inputs each rests on, and a classifier's confusion matrix; the comparison of two runs."""
    runs = []
    for run in scores.runs:
        shown = {"run_id": run.run_id, "model": run.model, "task": run.task, "headline": headline(run)}
        if run.reviewed and run.task == "detection":
            shown["ap"] = [(label, "–" if ap is None else f"{ap:.3f}", f"{n:,}")
                           for label, (ap, n) in sorted(run.ap50.items(), key=lambda item: -item[1][1])]
        elif run.reviewed:
            per_label = run.per_label()
            shown["labels"] = [(label, _percent(p), f"{n_pred:,}", _percent(r), f"{n_true:,}")
                               for label, p, n_pred, r, n_true in per_label]
            shown["confusion"] = confusion(run, [label for label, *_ in per_label])
        runs.append(shown)
    return {"reviewed": f"{scores.reviewed:,}", "unpredicted": scores.unpredicted, "runs": runs,
            "versus": versus_line(scores.versus) if scores.versus is not None else None}


def confusion(run, labels: list[str]) -> dict:
    """The confusion matrix (answer by row, prediction by column) of the most answered labels, the rest as one."""
    named = labels[:CONFUSION_LABELS]
    other = "(other)" if len(labels) > CONFUSION_LABELS else None
    columns = named + ([other] if other else [])
    cells = {(t if t in named else other, p if p in named else other): 0 for t in columns for p in columns}
    for (t, p), n in run.confusion.items():
        cells[(t if t in named else other, p if p in named else other)] += n
    return {"columns": columns, "rows": [(t, [cells[(t, p)] for p in columns]) for t in columns]}


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "–"


def _name(sample: Sample) -> str:
    """The input's whole URI (a pseudonymised row's token), and its DICOM frame: shown on hover and under the
    thumbnail, where it wraps."""
    return sample.uri + (f" · frame {sample.frame}" if sample.frame is not None else "")
