"""`pipeline dedup OUTPUT`: near-duplicate groups over an output's live rows, written beside it as the
`<output>_dedup` table (tables.py) in one overwrite.

The rows are read once, a batch at a time, only the columns needed (a few tens of bytes a row are kept, the
embeddings go straight into their index); the latest row of each uri counts, and a uri whose latest row is an error
is left out. Pairs come from near.py (pHash blocks, a faiss index for embeddings), groups from groups.py (stars
around a representative: no chaining). No Ray, no torch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.job.errors import UserError
from pipeline.output.formats import OutputFormat
from pipeline.report.outputs import find_run
from pipeline.review.groups import Neighbours, star_groups
from pipeline.review.near import EmbeddingIndex, phash_pairs
from pipeline.review.tables import SiblingTable, sibling_of

MAX_DISTANCE = 8  # of 64 bits: resized, re-encoded and rotated copies are within 2, crops of 2-5 % mostly within 8
MIN_SIMILARITY = 0.95
COLUMNS = ["uri", "error", "phash", "embedding", "image_width", "image_height", "size", "run_id"]
DEDUP_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False), pa.field("group_id", pa.string(), nullable=False),
    pa.field("representative", pa.string(), nullable=False), pa.field("method", pa.string(), nullable=False),
    pa.field("distance", pa.int32()), pa.field("similarity", pa.float32()), pa.field("run_id", pa.string()),
])


@dataclass(frozen=True)
class DedupResult:
    groups: int
    rows_in_groups: int
    rows: int  # live rows considered
    table: SiblingTable


def dedup(output: OutputFormat, run_id: str | None = None, max_distance: int = MAX_DISTANCE,
          min_similarity: float = MIN_SIMILARITY) -> DedupResult:
    """Group the output's (or one run's) live rows and overwrite its dedup table with the groups."""
    if not 0 <= max_distance <= 32:
        raise UserError(f"--max-distance {max_distance}: give a number of bits from 0 to 32 (default {MAX_DISTANCE})")
    if not -1 <= min_similarity <= 1:
        raise UserError(f"--min-similarity {min_similarity}: give a cosine similarity from -1 to 1")
    runs = [find_run(output, run_id)["run_id"]] if run_id else [r["run_id"] for r in output.live()]
    if not runs:
        find_run(output, None)  # one line: nothing committed yet
    index = EmbeddingIndex(min_similarity)
    rows = live_rows(read_rows(output, runs, index))
    if "phash" not in rows.column_names and not index.size:
        raise UserError(f"{output.uri} has no phash column (nor embeddings): its rows were written before pHashes "
                        "were computed; run the job again with --overwrite to hash them")
    groups = group(rows, index, max_distance)
    table = sibling_of(output, "dedup")
    table.overwrite(groups)
    return DedupResult(len(set(groups["group_id"].to_pylist())), groups.num_rows, rows.num_rows, table)


def read_rows(output: OutputFormat, runs: list[str], index: EmbeddingIndex) -> pa.Table:
    """The compact columns of every row of `runs` (position, run order, uri, error, phash, area, size, run_id);
    embeddings go into `index` under their row's position."""
    order = {run: k for k, run in enumerate(runs)}
    parts, position = [], 0
    for batch in output.rows(runs).batches(output.storage, COLUMNS):
        n = batch.num_rows
        positions = np.arange(position, position + n)
        position += n
        if "embedding" in batch.schema.names:
            ok = pc.and_(pc.is_valid(batch["embedding"]), _no_error(batch)).to_numpy(zero_copy_only=False)
            if ok.any():
                vectors = batch["embedding"].filter(pa.array(ok))
                index.add(positions[ok], np.stack(vectors.to_numpy(zero_copy_only=False)))
        parts.append(_compact(batch, positions, order))
    return pa.concat_tables(parts) if parts else pa.table({"position": pa.array([], pa.int64())})


def _compact(batch: pa.RecordBatch, positions: np.ndarray, order: dict[str, int]) -> pa.Table:
    names = batch.schema.names
    width = batch["image_width"] if "image_width" in names else pa.nulls(batch.num_rows, pa.int32())
    height = batch["image_height"] if "image_height" in names else pa.nulls(batch.num_rows, pa.int32())
    columns = {
        "position": pa.array(positions), "uri": batch["uri"], "run_id": batch["run_id"],
        "run_order": pa.array([order.get(r, -1) for r in batch["run_id"].to_pylist()], pa.int32()),
        "ok": _no_error(batch),
        "area": pc.fill_null(pc.multiply(pc.cast(width, pa.int64()), pc.cast(height, pa.int64())), 0),
        "size": pc.fill_null(batch["size"], 0) if "size" in names else pa.repeat(pa.scalar(0, pa.int64()), batch.num_rows),
    }
    if "phash" in names:
        columns["phash"] = pc.cast(batch["phash"], pa.int64())
    return pa.table(columns)


def _no_error(batch: pa.RecordBatch) -> pa.Array:
    if "error" not in batch.schema.names:
        return pa.repeat(pa.scalar(True), batch.num_rows)
    return pc.is_null(batch["error"])


def live_rows(rows: pa.Table) -> pa.Table:
    """The latest row of each uri (the latest run's, then the last read), where it is not an error."""
    if not rows.num_rows:
        return rows
    order = pc.sort_indices(rows, [("uri", "ascending"), ("run_order", "descending"), ("position", "descending")])
    rows = rows.take(order)
    uris = rows["uri"]
    first = np.r_[True, pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1)).to_numpy(zero_copy_only=False)]
    rows = rows.filter(pa.array(first))
    return rows.filter(rows["ok"])


def group(rows: pa.Table, index: EmbeddingIndex, max_distance: int) -> pa.Table:
    """The dedup table's rows: one per row in a group of two or more, its representative's included."""
    values, value_index = hash_values(rows)
    a, b, _ = phash_pairs(values, max_distance)
    ei, ej, similarity = index.pairs()
    row_of = row_of_position(rows["position"].to_numpy(), rows.num_rows)
    ei, ej = row_of(ei), row_of(ej)
    live = (ei >= 0) & (ej >= 0)
    ei, ej, similarity = ei[live], ej[live], similarity[live]
    neighbours = Neighbours(value_index, (a, b), (ei, ej), rows.num_rows)
    preference = pc.sort_indices(rows, [("area", "descending"), ("size", "descending"), ("uri", "ascending")])
    rep = star_groups(neighbours, preference.to_numpy())
    members = np.flatnonzero(rep >= 0)
    return members_table(rows, members, rep[members], values, value_index, (ei, ej, similarity), max_distance)


def hash_values(rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct pHash values, each row's index into them or -1 for a row without a pHash)."""
    index = np.full(rows.num_rows, -1, np.int64)
    if "phash" not in rows.column_names:
        return np.empty(0, np.int64), index
    has = pc.is_valid(rows["phash"]).to_numpy(zero_copy_only=False)
    hashes = pc.fill_null(rows["phash"], 0).to_numpy().astype(np.int64)  # no nulls: no float detour
    values, inverse = np.unique(hashes[has], return_inverse=True)
    index[has] = inverse
    return values, index


def row_of_position(positions: np.ndarray, n: int):
    """A function mapping read positions to row indices of the live rows (-1: not live)."""
    order = np.argsort(positions)
    ranked = positions[order]

    def row_of(wanted: np.ndarray) -> np.ndarray:
        at = np.clip(np.searchsorted(ranked, wanted), 0, max(n - 1, 0))
        return np.where((n > 0) & (ranked[at] == wanted), order[at], -1) if n else np.full(len(wanted), -1)

    return row_of


def members_table(rows: pa.Table, members: np.ndarray, reps: np.ndarray, values: np.ndarray,
                  value_index: np.ndarray, similar: tuple[np.ndarray, np.ndarray, np.ndarray],
                  max_distance: int) -> pa.Table:
    """One row per group member: its representative, the Hamming distance and cosine similarity to it, and
    which of the two put it there ('phash' when within the distance; a representative: its group's way)."""
    phash = np.where(value_index >= 0, values[np.maximum(value_index, 0)] if len(values) else 0, 0)
    both = (value_index[members] >= 0) & (value_index[reps] >= 0)
    distance = np.bitwise_count((phash[members] ^ phash[reps]).view(np.uint64)).astype(np.int32)
    by_phash = both & (distance <= max_distance)
    similarity = pair_lookup(similar, members, reps)
    is_rep = members == reps
    similarity[is_rep] = np.where(np.isin(reps[is_rep], reps[~is_rep & ~by_phash]), 1.0, np.nan)
    by_phash[is_rep] = np.isin(reps[is_rep], reps[~is_rep & by_phash])
    uris = rows["uri"].take(pa.array(members))
    return pa.table({
        "uri": uris, "group_id": [group_id(u) for u in rows["uri"].take(pa.array(reps)).to_pylist()],
        "representative": rows["uri"].take(pa.array(reps)),
        "method": np.where(by_phash, "phash", "embedding").tolist(),
        "distance": pa.array(distance, mask=~both), "similarity": pa.array(similarity, mask=np.isnan(similarity)),
        "run_id": rows["run_id"].take(pa.array(members)),
    }, schema=DEDUP_SCHEMA)


def pair_lookup(similar: tuple[np.ndarray, np.ndarray, np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The similarity of each pair (a, b) among the embedding pairs found, NaN where it is not one of them."""
    i, j, similarity = similar
    size = np.int64(max(int(i.max(initial=0)), int(j.max(initial=0)), int(a.max(initial=0)),
                        int(b.max(initial=0))) + 1)
    keys = np.minimum(i, j) * size + np.maximum(i, j)
    order = np.argsort(keys)
    wanted = np.minimum(a, b) * size + np.maximum(a, b)
    at = np.clip(np.searchsorted(keys[order], wanted), 0, max(len(keys) - 1, 0))
    found = (len(keys) > 0) & (keys[order][at] == wanted) if len(keys) else np.zeros(len(a), bool)
    return np.where(found, similarity[order][at] if len(keys) else 0, np.nan).astype(np.float32)


def group_id(representative: str) -> str:
    """A group's id, stable across runs of `pipeline dedup` while its representative stays."""
    return hashlib.blake2b(representative.encode(), digest_size=8).hexdigest()
