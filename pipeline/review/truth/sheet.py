"""A CSV of uri,label as pandas, Excel and Google Sheets write it: a BOM, CRLF, quoted fields, `;` (European
Excel) or tab delimiters, Windows-1252 text, an index column, headers such as `path`/`image`/`class`, trailing empty
rows, or no header at all (two columns, the first a path)."""

from __future__ import annotations

import csv
import io

from pipeline.job.errors import UserError
from pipeline.review.truth.answers import Answer, FileFacts, Parsed

URI_NAMES = ("uri", "url", "path", "image", "image_uri", "image_url", "image_path", "file", "file_name", "filename",
             "filepath", "file_path", "key", "s3_uri", "location")
LABEL_NAMES = ("label", "class", "category", "class_name", "label_name", "tag", "choice", "annotation", "truth",
               "ground_truth", "target", "answer")
DELIMITERS = (",", ";", "\t", "|")


def parse(data: bytes, facts: FileFacts) -> Parsed:
    text = _text(data)
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=_delimiter(text)) if any(c.strip() for c in r)]
    if not rows:
        raise UserError("an empty CSV: give one row per input, uri,label")
    uri_at, label_at, header = _columns(rows[0])
    parsed = Parsed()
    for row in rows[1 if header else 0:]:
        uri = row[uri_at].strip() if uri_at < len(row) else ""
        label = row[label_at].strip() if label_at < len(row) else ""
        if not uri or not label:
            parsed.unanswered += 1
            continue
        parsed.answers.append(Answer(uri, label, None, facts.reviewer, facts.file_time))
    return parsed


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # Excel's "CSV (Comma delimited)" on Windows


def _delimiter(text: str) -> str:
    """The delimiter that splits the first line into the most fields (quotes respected)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return max(DELIMITERS, key=lambda d: len(next(csv.reader([first], delimiter=d), [])))


def _columns(first: list[str]) -> tuple[int, int, bool]:
    """(uri column, label column, whether the first row is a header)."""
    names = [cell.strip().lower().replace(" ", "_").replace("-", "_") for cell in first]
    uri_at = next((names.index(n) for n in URI_NAMES if n in names), None)
    label_at = next((names.index(n) for n in LABEL_NAMES if n in names), None)
    if uri_at is not None and label_at is not None:
        return uri_at, label_at, True
    cells = [c.strip() for c in first if c.strip()]
    if uri_at is None and label_at is None and len(cells) == 2 and any(ch in cells[0] for ch in "/.\\:"):
        filled = [i for i, c in enumerate(first) if c.strip()]
        return filled[0], filled[1], False
    raise UserError(f"a CSV without a uri column ({', '.join(URI_NAMES[:6])}, ...) and a label column "
                    f"({', '.join(LABEL_NAMES[:4])}, ...); its first row is: {', '.join(first)[:200]}")
