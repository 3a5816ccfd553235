"""Label Studio's JSON export ("JSON", the full format): a list of tasks, each with its `annotations`.

The input is the task's `data.uri` (what `pipeline export` writes), else `data.image` without its query string (a
presigned URL's signature). Of a task's annotations, skipped or cancelled ones are ignored and the latest
(`updated_at`, else `created_at`) answers; `choices` give the label, `rectanglelabels` the boxes, from percent of
the image to its original pixels (`original_width`/`original_height`), a rotated box as the box around it."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from pipeline.job.errors import UserError
from pipeline.review.truth.answers import Answer, Box, FileFacts, Parsed, utc


def parse(tasks: object, facts: FileFacts) -> Parsed:
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise UserError("not a Label Studio JSON export (a list of tasks); export the project as \"JSON\"")
    if tasks and not any("annotations" in t for t in tasks):
        raise UserError("a list without `annotations`: export the Label Studio project as \"JSON\" (the full "
                        "format), not JSON_MIN or CSV")
    detection = any(r.get("type") == "rectanglelabels" for t in tasks for r in _results(t))
    parsed = Parsed()
    for task in tasks:
        annotation = _latest_annotation(task)
        answer = _answer(task, annotation, detection, facts) if annotation is not None else None
        if answer is None:
            parsed.unanswered += 1
        else:
            parsed.answers.append(answer)
    return parsed


def _results(task: dict) -> list[dict]:
    return [r for group in ("annotations", "predictions") for a in task.get(group) or [] if isinstance(a, dict)
            for r in a.get("result") or [] if isinstance(r, dict)]


def _latest_annotation(task: dict) -> dict | None:
    done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    return max(done, key=lambda a: utc(a.get("updated_at")) or utc(a.get("created_at")) or oldest, default=None)


def _answer(task: dict, annotation: dict, detection: bool, facts: FileFacts) -> Answer | None:
    uri = task_uri(task)
    results = [r for r in annotation.get("result") or [] if isinstance(r, dict)]
    choices = [c for r in results if r.get("type") == "choices" for c in (r.get("value") or {}).get("choices", [])]
    boxes = tuple(_box(r, task) for r in results if r.get("type") == "rectanglelabels")
    if not choices and not detection:
        return None  # submitted without a choice
    when = utc(annotation.get("updated_at")) or utc(annotation.get("created_at")) or facts.file_time
    return Answer(uri, choices[0] if choices else None, boxes if detection else None,
                  _reviewer(annotation) or facts.reviewer, when)


def task_uri(task: dict) -> str:
    data = task.get("data") or {}
    uri = data.get("uri") or str(data.get("image") or "").split("?", 1)[0]
    if not uri:
        raise UserError(f"Label Studio task {task.get('id')} has neither data.uri nor data.image")
    return str(uri)


def _reviewer(annotation: dict) -> str | None:
    """Who completed it: the export's user (an id, or an object with an email), or `created_username`."""
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        return str(who.get("email") or who.get("id"))
    named = annotation.get("created_username")
    if named:
        return str(named).split(",")[0].strip()
    return None if who is None else f"label-studio user {who}"


def _box(result: dict, task: dict) -> Box:
    """A rectangle from percent to original pixels; rotated (degrees clockwise about its top-left corner, as
    Label Studio turns it), the axis-aligned box around it."""
    value = result.get("value") or {}
    width, height = result.get("original_width"), result.get("original_height")
    if not width or not height:
        raise UserError(f"Label Studio task {task.get('id')}: a rectangle without original_width/original_height")
    x, y = value["x"] * width / 100, value["y"] * height / 100
    w, h = value["width"] * width / 100, value["height"] * height / 100
    angle = math.radians(value.get("rotation") or 0)
    cos, sin = math.cos(angle), math.sin(angle)
    xs = [x + dx * cos - dy * sin for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    ys = [y + dx * sin + dy * cos for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    label = (value.get("rectanglelabels") or [None])[0]
    return (label, min(xs), min(ys), max(xs), max(ys))
