"""`pipeline search OUTPUT "a dog on a beach"`: the output's images ranked by how well their embeddings match a
text, encoded by the model that made them (an open_clip job with `outputs: [predictions, embedding]`). The rows are
read a batch at a time through the output's format and only the best `limit` are kept: the table is
never loaded whole. No Ray."""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError
from pipeline.output.formats import OutputFormat
from pipeline.report.facts import Sample
from pipeline.report.thumbnails import thumbnails


@dataclass(frozen=True)
class Hit:
    uri: str
    frame: int | None
    score: float  # cosine similarity of the text's and the image's embeddings
    label: str | None


def search(table: OutputFormat, text: str, limit: int) -> tuple[dict, list[Hit]]:
    """(the record of the run whose model encoded the text, the best `limit` rows, best first)."""
    record = _searchable_run(table)
    runs = [r["run_id"] for r in table.live() if r.get("model_key") == record["model_key"]]
    model = ModelConfig.model_validate(record["model_config"])
    from pipeline.models.resolve import source_module  # torch and the model's library: only for a search

    query = source_module(model.source).encode_texts(model, table.storage, [text])[0]
    return record, best_rows(table, runs, query, limit)


def _searchable_run(table: OutputFormat) -> dict:
    """The latest live run whose rows have embeddings from a model with a text encoder."""
    from pipeline.models.resolve import source_module

    for record in reversed(table.live()):
        model = record.get("model_config")
        if not model or "embedding" not in model.get("outputs", []):
            continue
        if hasattr(source_module(model.get("source", "torchvision")), "encode_texts"):
            return record
    raise UserError(f"{table.uri} has no run with image embeddings from a model that also encodes text; run an "
                    "open_clip job with model.outputs: [predictions, embedding] into it first")


def best_rows(table: OutputFormat, runs: list[str], query: np.ndarray, limit: int) -> list[Hit]:
    """Rows by cosine similarity to `query`, best first: a batch at a time, keeping the best `limit`."""
    query = query / np.linalg.norm(query)
    best: list[Hit] = []
    columns = ["uri", "frame", "embedding", "label"]
    for batch in table.rows(runs).batches(table.storage, columns):
        scores, rows = _scores(batch, query)
        for i in rows[np.argsort(-scores[rows], kind="stable")[:limit]]:
            best.append(Hit(batch["uri"][i].as_py(), _frame(batch, i), float(scores[i]), _label(batch, i)))
        best = sorted(best, key=lambda hit: -hit.score)[:limit]
    return best


def _scores(batch: pa.RecordBatch, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's cosine similarity, and the rows that have an embedding (an error row has none)."""
    column = batch["embedding"]
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    scores = np.full(len(batch), -np.inf, dtype=np.float32)
    present = np.flatnonzero(valid)
    if not len(present):
        return scores, present
    values = column.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
    vectors = values.reshape(len(present), -1).astype(np.float32, copy=False)
    norms = np.linalg.norm(vectors, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    scores[present[usable]] = vectors[usable] @ query.astype(np.float32) / norms[usable]
    return scores, present[usable]


def _frame(batch: pa.RecordBatch, i: int) -> int | None:
    return batch["frame"][i].as_py() if "frame" in batch.schema.names else None


def _label(batch: pa.RecordBatch, i: int) -> str | None:
    return batch["label"][i].as_py() if "label" in batch.schema.names else None


def results_page(table: OutputFormat, text: str, record: dict, hits: list[Hit]) -> str:
    """A self-contained HTML page: the query, and each hit's thumbnail, score and label."""
    samples = [Sample(hit.uri, hit.frame, f"{hit.score:.3f}") for hit in hits]
    shown = thumbnails(table.storage, samples)
    cells = "".join(
        f'<figure><img src="{shown[s] or ""}" alt=""><figcaption>{html.escape(f"{h.score:.3f}")} '
        f'{html.escape(h.label or "")}<br><small>{html.escape(h.uri)}</small></figcaption></figure>'
        for s, h in zip(samples, hits))
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(text)}</title>"
            "<style>body{font-family:sans-serif}figure{display:inline-block;width:170px;vertical-align:top;"
            "margin:6px}img{max-width:160px;max-height:160px}small{word-break:break-all;color:#555}</style>"
            f"<h1>{html.escape(text)}</h1><p>{len(hits)} best of {html.escape(table.uri)}, by "
            f"{html.escape(str(record.get('model')))} (run {html.escape(record['run_id'])})</p>{cells}")
