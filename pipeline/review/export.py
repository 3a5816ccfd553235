"""`pipeline export OUTPUT --to label-studio|coco|cvat`: the rows of a committed run people should look at, in a
review tool's import format, written to a file (local or in a store) or, for Label Studio, into a new project on
its server. Reads the output as any reader would (pipeline/report/outputs.py), a batch at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow.compute as pc

from pipeline.io.storage import Storage, is_remote, is_s3
from pipeline.io.uris import split_s3
from pipeline.job.errors import UserError
from pipeline.output.formats import OutputFormat
from pipeline.report.outputs import find_run, run_rows
from pipeline.review import documents
from pipeline.review.documents import Review
from pipeline.review.label_studio import LabelStudio
from pipeline.review.selection import Selection, rows_of, select
from pipeline.review.tables import sibling_of

FORMATS = ("label-studio", "coco", "cvat")
COLUMNS = ["uri", "frame", "error_type", "label", "score", "topk_labels", "topk_scores", "detections",
           "image_width", "image_height", "model", "run_id"]


@dataclass(frozen=True)
class ExportRequest:
    """The command line's choices, checked."""
    to: str
    selection: Selection
    run_id: str | None = None
    presign_s: int | None = None
    destination: str | None = None  # a file (local or in a store), or Label Studio's http(s):// URL

    def __post_init__(self):
        if self.to not in FORMATS:
            raise UserError(f"--to {self.to}: give one of {', '.join(FORMATS)}")
        if self.presign_s is not None and not 1 <= self.presign_s <= 7 * 24 * 3600:
            raise UserError(f"--presign {self.presign_s}: give the URLs' lifetime in seconds, 1 to 604800 (a week)")
        if self.to_server and self.to != "label-studio":
            raise UserError(f"-o {self.destination}: only --to label-studio goes to a server; give a file for "
                            f"{self.to}")

    @property
    def to_server(self) -> bool:
        return (self.destination or "").startswith(("http://", "https://"))


def export(table: OutputFormat, request: ExportRequest) -> str:
    """Selects, converts and delivers; returns what was done, in a line or two."""
    run_id = find_run(table, request.run_id)["run_id"]
    seen = Seen()
    selector = select(seen.rows(run_rows(table, run_id, COLUMNS)), request.selection, skip=near_duplicates(table))
    rows = selector.chosen()
    review = Review(rows, references(table.storage, rows, request.presign_s), sorted(seen.labels), seen.detector,
                    presigned=request.presign_s is not None)
    return deliver(table, review, request, run_id, _what(review, selector, request.selection, run_id))


def _what(review: Review, selector, selection: Selection, run_id: str) -> str:
    how = [selection.describe()]
    if selection.kind != "random":
        how.append("boxes scored %g to %g" % selection.band if review.detector else f"by {selection.measure}")
    if selector.collapsed:
        how.append(f"{selector.collapsed} near-duplicates left out")
    return f"{len(review.rows)} of {selector.seen} eligible rows of run {run_id} ({', '.join(how)})"


def near_duplicates(table: OutputFormat) -> set[str]:
    """The uris to leave out: members of a near-duplicate group other than its representative, from the
    `<output>_dedup` table when `pipeline dedup` has written one (empty otherwise)."""
    groups = sibling_of(table, "dedup").read()
    if "representative" not in groups.column_names:
        return set()
    return set(groups.filter(pc.not_equal(groups["uri"], groups["representative"]))["uri"].to_pylist())


class Seen:
    """What the run's rows showed on their way to the selection: every label predicted (the review tool's label
    choices) and whether a detector wrote them."""

    def __init__(self):
        self.labels: set[str] = set()
        self.detector = False

    def rows(self, batches) -> Iterator[dict]:
        for batch in batches:
            if "detections" in batch.column_names:
                self.detector = True
                self.labels.update(batch["detections"].combine_chunks().flatten().field("label").unique().to_pylist())
            elif "topk_labels" in batch.column_names:
                self.labels.update(batch["topk_labels"].combine_chunks().flatten().unique().to_pylist())
            yield from rows_of([batch])
        self.labels.discard(None)


def references(storage: Storage, rows: list[dict], presign_s: int | None) -> list[str]:
    """What a reviewer's browser loads for each row: its URI (Label Studio resolves s3:// and gs:// through the
    project's cloud storage), or with --presign a presigned https URL (S3 only)."""
    if presign_s is None:
        return [row["uri"] for row in rows]
    refs = []
    for row in rows:
        if not is_s3(row["uri"]):
            raise UserError(f"--presign: {row['uri']} is not in S3; presigned URLs are made for s3:// inputs only "
                            "(leave --presign out to export the URIs)")
        bucket, key = split_s3(row["uri"])
        try:
            refs.append(storage.s3_client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=presign_s))
        except Exception as exc:  # noqa: BLE001 - no credentials to sign with, in one line
            raise UserError(f"--presign: cannot sign a URL for {row['uri']} ({type(exc).__name__}: {exc})") from None
    return refs


def deliver(table: OutputFormat, review: Review, request: ExportRequest, run_id: str, what: str) -> str:
    title = f"{table.uri} run {run_id}"
    if request.to_server:
        server = LabelStudio(request.destination)
        project = server.create_project(f"Review of run {run_id}"[:50], documents.labeling_config(review))
        imported = server.import_tasks(project, documents.label_studio_tasks(review))
        return f"Exported {what}: {imported} tasks in Label Studio project {project}, {server.project_url(project)}"
    path = request.destination or f"review-{run_id}.{'xml' if request.to == 'cvat' else 'json'}"
    if request.to == "label-studio":
        config = path.rsplit(".", 1)[0] + ".label_config.xml"
        _write(table.storage, path, documents.to_json(documents.label_studio_tasks(review)))
        _write(table.storage, config, documents.labeling_config(review).encode())
        return f"Exported {what} to {path} (Label Studio tasks; the labeling config that fits them: {config})"
    if request.to == "coco":
        _write(table.storage, path, documents.to_json(documents.coco(review, title)))
    else:
        _write(table.storage, path, documents.cvat(review, title).encode())
    return f"Exported {what} to {path} ({request.to})"


def _write(storage: Storage, uri: str, data: bytes) -> None:
    try:
        storage.write_bytes(uri, data)
    except OSError as exc:
        raise UserError(f"-o {uri}: cannot write the export ({exc.strerror or exc}); choose a writable path") from None
    except Exception as exc:  # noqa: BLE001 - a store's refusal (missing bucket, denied), in one line
        if not is_remote(uri):
            raise
        raise UserError(f"-o {uri}: cannot write the export ({type(exc).__name__}: {exc})") from None
