"""Near-duplicate grouping at scale (issue 31): time, peak memory, and recall/precision of planted pairs.

    python bench/dedup.py phash [--rows 1000000] [--max-distance 8]
    python bench/dedup.py embedding [--rows 200000] [--dim 512] [--min-similarity 0.95]

phash: random 64-bit pHashes, 10 % of rows in planted clusters (a base and 1-3 copies, each 0..D bits flipped).
embedding: random unit vectors, 10 % in planted clusters (a base and 1-3 copies at cosine ~0.98 to it).
Each part runs `pipeline.review.dedup.group` (pairs, then star groups) on rows as `read_rows` keeps them, in its own
process: peak RSS is this process's (ru_maxrss), the input's own size given beside it. A planted pair counts as
found when base and copy end in one group; precision is over every pair put in one group."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.review.dedup import group  # noqa: E402
from pipeline.review.near import EmbeddingIndex  # noqa: E402


def clusters(rows: int, rng: np.random.Generator) -> np.ndarray:
    """Each row's cluster id (-1: unrelated); 10 % of rows in clusters of 2-4 (a base first, then its copies)."""
    cluster = np.full(rows, -1, np.int64)
    at, k = 0, 0
    while at < rows // 10:
        size = int(rng.integers(2, 5))
        cluster[at:at + size] = k
        at, k = at + size, k + 1
    return cluster


def planted_phashes(rows: int, distance: int, rng: np.random.Generator, cluster: np.ndarray) -> np.ndarray:
    hashes = rng.integers(-2 ** 63, 2 ** 63 - 1, size=rows, dtype=np.int64)
    in_cluster = np.flatnonzero(cluster >= 0)
    base = np.r_[True, cluster[in_cluster][1:] != cluster[in_cluster][:-1]]
    base_of = np.maximum.accumulate(np.where(base, np.arange(len(in_cluster)), 0))
    for row, b in zip(in_cluster[~base], base_of[~base]):
        bits = rng.choice(64, int(rng.integers(0, distance + 1)), replace=False)
        hashes[row] = hashes[in_cluster[b]] ^ np.int64(np.uint64(sum(1 << int(x) for x in bits)).view(np.int64))
    return hashes


def compact(rows: int, phash: np.ndarray | None) -> pa.Table:
    columns = {"position": np.arange(rows), "uri": [f"s3://photos/{i:08d}.jpg" for i in range(rows)],
               "run_id": pa.repeat(pa.scalar("run"), rows), "run_order": np.zeros(rows, np.int32),
               "ok": pa.repeat(pa.scalar(True), rows), "area": np.full(rows, 12_000_000), "size": np.full(rows, 3_000_000)}
    if phash is not None:
        columns["phash"] = phash
    return pa.table(columns)


def quality(table: pa.Table, cluster: np.ndarray) -> tuple[float, float, int]:
    """(recall of planted base-copy pairs, precision of grouped pairs, grouped pairs)."""
    uris = table["uri"].to_numpy(zero_copy_only=False)
    rows = np.array([int(u[12:20]) for u in uris], np.int64)
    reps = np.array([int(u[12:20]) for u in table["representative"].to_numpy(zero_copy_only=False)], np.int64)
    group_of = np.full(len(cluster), -1, np.int64)
    group_of[rows] = reps
    in_cluster = np.flatnonzero(cluster >= 0)
    base = np.r_[True, cluster[in_cluster][1:] != cluster[in_cluster][:-1]]
    base_of = in_cluster[np.maximum.accumulate(np.where(base, np.arange(len(in_cluster)), 0))]
    copies, bases = in_cluster[~base], base_of[~base]
    recall = float(np.mean((group_of[copies] >= 0) & (group_of[copies] == group_of[bases])))
    sizes = np.bincount(np.unique(reps, return_inverse=True)[1])
    grouped_pairs = int((sizes * (sizes - 1) // 2).sum())
    members_cluster = cluster[rows]
    same = 0
    for rep in np.unique(reps):  # pairs within one group whose rows share a planted cluster
        c = members_cluster[reps == rep]
        c = c[c >= 0]
        counts = np.bincount(c - c.min()) if len(c) else np.array([0])
        same += int((counts * (counts - 1) // 2).sum())
    return recall, same / max(grouped_pairs, 1), grouped_pairs


def run(part: str, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    cluster = clusters(args.rows, rng)
    if part == "phash":
        rows, index = compact(args.rows, planted_phashes(args.rows, args.max_distance, rng, cluster)), EmbeddingIndex(1)
    else:
        rows, index = compact(args.rows, None), EmbeddingIndex(args.min_similarity)
    input_mb = rows.nbytes / 2 ** 20
    start = time.perf_counter()
    if part == "embedding":
        for at in range(0, args.rows, 32_768):  # as read_rows feeds it: a batch at a time
            n = min(32_768, args.rows - at)
            vectors = rng.normal(size=(n, args.dim)).astype(np.float32)
            owner = cluster[at:at + n]
            vectors = planted_vectors(vectors, owner, args.dim)
            index.add(np.arange(at, at + n), vectors)
    table = group(rows, index, args.max_distance)
    seconds = time.perf_counter() - start
    recall, precision, pairs = quality(table, cluster)
    return {"part": part, "rows": args.rows, "dim": args.dim if part == "embedding" else None,
            "max_distance": args.max_distance, "min_similarity": args.min_similarity, "seconds": round(seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "input_mb": round(input_mb), "groups": len(set(table["group_id"].to_pylist())),
            "rows_in_groups": table.num_rows, "grouped_pairs": pairs, "recall": round(recall, 4),
            "precision": round(precision, 4)}


def planted_vectors(vectors: np.ndarray, owner: np.ndarray, dim: int) -> np.ndarray:
    """Rows of one cluster made copies of its first row (cosine ~0.97): seeded by the cluster id, so a cluster
    split over two batches stays one."""
    for k in np.unique(owner[owner >= 0]):
        base = np.random.default_rng(int(k) + 1).normal(size=dim).astype(np.float32)
        base /= np.linalg.norm(base)
        noise = np.random.default_rng(int(k) + 10 ** 7).normal(size=(int((owner == k).sum()), dim)).astype(np.float32)
        noise[0] = 0  # the cluster's first row is its base
        vectors[owner == k] = base + 0.2 * noise / np.sqrt(dim)
    return vectors


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["phash", "embedding"])
    parser.add_argument("--rows", type=int)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--max-distance", type=int, default=8)
    parser.add_argument("--min-similarity", type=float, default=0.95)
    args = parser.parse_args()
    args.rows = args.rows or (1_000_000 if args.part == "phash" else 200_000)
    print(json.dumps(run(args.part, args)))
