"""Pairs of near-duplicates without comparing every pair.

pHash: the pigeonhole bound over blocks of the 64 bits. Split them into B blocks; two hashes within Hamming
distance D differ in at most D blocks, so they agree exactly on at least K = B - D of them. One table per choice
of K blocks keys each hash by those blocks' bits (a mask, then a sort); hashes sharing a key are candidates,
checked by their full distance. Every pair within D is found (no misses), each once: a pair is kept only in the
table of its K lowest-numbered equal blocks. B is chosen to balance the tables' count against the candidates a
short key lets through (`block_count`).

Embeddings: faiss, cosine similarity as the inner product of normalised vectors: an exact flat index up to
`EXACT_ROWS` rows, above that an inverted file (nlist ~ 4 sqrt(n), 8-bit scalar quantised vectors: a quarter of
the memory) trained on the first rows read and searched in `nprobe` of its lists."""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

BITS = 64
EXACT_ROWS = 50_000  # up to here the embedding index is exact (a flat index: n^2 d work, seconds)
NPROBE = 16


def block_edges(blocks: int) -> list[tuple[int, int]]:
    """(low bit, width) of `blocks` near-equal runs covering the 64 bits."""
    edges = np.linspace(0, BITS, blocks + 1).round().astype(int)
    return [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:])]


def block_count(n: int, max_distance: int) -> int:
    """The B (blocks) with the least estimated work for `n` distinct hashes: tables x (a sort of n + the
    candidates that uniformly spread hashes would share a key with)."""
    def work(blocks: int) -> float:
        keep = blocks - max_distance
        pairs = n * n / 2 / 2 ** (BITS * keep / blocks)
        return comb(blocks, keep) * (10 * n + 3 * pairs)

    return min(range(max_distance + 1, max_distance + 9), key=work)


def phash_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for every pair i < j of `hashes` (distinct int64 values) within `max_distance` bits."""
    values = np.ascontiguousarray(hashes, dtype=np.int64).view(np.uint64)
    order = np.argsort(values)
    edges = block_edges(block_count(len(values), max_distance))
    found = [_table_pairs(values[order], edges, chosen, max_distance)
             for chosen in combinations(range(len(edges)), len(edges) - max_distance)]
    a, b, d = (np.concatenate(parts) for parts in zip(*found)) if found else (np.empty(0, np.uint64),) * 3
    i, j = order[np.searchsorted(values[order], a)], order[np.searchsorted(values[order], b)]
    return np.minimum(i, j), np.maximum(i, j), d.astype(np.int32)


def _table_pairs(values: np.ndarray, edges: list[tuple[int, int]], chosen: tuple[int, ...], max_distance: int):
    """The pairs (as values) this table finds that no earlier table keeps: equal on the `chosen` blocks, which
    are their lowest equal blocks, and within `max_distance`. The chosen blocks' bits are moved to the top, so
    one plain sort of the moved values groups equal keys; a bit permutation keeps every Hamming distance."""
    order = list(chosen) + [b for b in range(len(edges)) if b not in chosen]
    moved, widths = _move_blocks(values, edges, order), [edges[b][1] for b in order]
    ranked = np.sort(moved)
    key_bits = sum(widths[:len(chosen)])
    p, q = same_key_pairs(ranked >> np.uint64(BITS - key_bits))
    differ = ranked[p] ^ ranked[q]
    distance = np.bitwise_count(differ)
    keep = distance <= max_distance
    a, b = (_move_back(ranked[x[keep]], edges, order) for x in (p, q))
    equal = np.ones(len(a), bool)
    for block in set(range(chosen[-1])) - set(chosen):  # a lower block also equal: an earlier table has the pair
        lo, width = edges[block]
        equal &= ((a ^ b) >> np.uint64(lo)) & np.uint64((1 << width) - 1) != 0
    return a[equal], b[equal], distance[keep][equal]


def _move_blocks(values: np.ndarray, edges: list[tuple[int, int]], order: list[int]) -> np.ndarray:
    """`values` with their blocks laid out in `order`, the first block at the top."""
    moved, top = np.zeros_like(values), BITS
    for block in order:
        lo, width = edges[block]
        top -= width
        moved |= ((values >> np.uint64(lo)) & np.uint64((1 << width) - 1)) << np.uint64(top)
    return moved


def _move_back(moved: np.ndarray, edges: list[tuple[int, int]], order: list[int]) -> np.ndarray:
    values, top = np.zeros_like(moved), BITS
    for block in order:
        lo, width = edges[block]
        top -= width
        values |= ((moved >> np.uint64(top)) & np.uint64((1 << width) - 1)) << np.uint64(lo)
    return values


def same_key_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (p, q), p < q, of every pair of equal values in sorted `keys`: work in proportion to the pairs."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    lengths = np.diff(np.r_[starts, len(keys)])
    run_end = np.repeat(starts + lengths, lengths)
    position = np.flatnonzero(np.repeat(lengths >= 2, lengths))
    left = run_end[position] - position  # rows from it to its run's end, itself included
    firsts, seconds = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    step = 1
    while True:
        alive = left > step
        position, left = position[alive], left[alive]
        if not len(position):
            break
        firsts.append(position)
        seconds.append(position + step)
        step += 1
    return np.concatenate(firsts), np.concatenate(seconds)


class EmbeddingIndex:
    """Rows' embeddings added a batch at a time; `pairs` then finds every pair at cosine similarity >=
    `min_similarity` (exactly up to EXACT_ROWS rows; above, through the inverted file's `nprobe` nearest lists)."""

    def __init__(self, min_similarity: float, exact_rows: int = EXACT_ROWS):
        self.min_similarity = min_similarity
        self.exact_rows = exact_rows
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._rows: list[np.ndarray] = []  # each added vector's row, in the index's order
        self._index = None

    @property
    def size(self) -> int:
        return sum(len(rows) for rows in self._rows)

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        self._rows.append(np.asarray(rows, dtype=np.int64))
        if self._index is not None:
            self._index.add(vectors)
            return
        self._buffer.append(vectors)
        self._buffered += len(vectors)
        if self._buffered > self.exact_rows:
            self._index = _inverted_file(np.concatenate(self._buffer))
            self._buffer = []

    def pairs(self, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row i, row j, similarity) with i < j."""
        import faiss

        rows = np.concatenate(self._rows) if self._rows else np.empty(0, np.int64)
        index = self._index
        if index is None:
            index = faiss.IndexFlatIP(self._buffer[0].shape[1]) if self._buffer else None
            if index is None:
                return rows[:0], rows[:0], np.empty(0, np.float32)
            index.add(np.concatenate(self._buffer))
        found = [_range(index, start, min(chunk, index.ntotal - start), self.min_similarity)
                 for start in range(0, index.ntotal, chunk)]
        i, j, s = (np.concatenate(parts) for parts in zip(*found))
        keep = i < j
        a, b = rows[i[keep]], rows[j[keep]]
        return np.minimum(a, b), np.maximum(a, b), s[keep]


def _inverted_file(train: np.ndarray):
    import faiss

    nlist = max(16, int(4 * np.sqrt(len(train) * 4)))
    nlist = min(nlist, len(train) // 39)  # faiss wants ~39 training vectors per list
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(train.shape[1]), train.shape[1], nlist,
                                          faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    index.add(train)
    index.nprobe = NPROBE
    index.make_direct_map()
    return index


def _range(index, start: int, count: int, radius: float):
    """Pairs (i, j, similarity) of the `count` vectors from `start` against the whole index."""
    queries = index.reconstruct_n(start, count)
    lims, similarity, found = index.range_search(queries, radius - 1e-6)
    i = np.repeat(np.arange(start, start + count), np.diff(lims).astype(np.int64))
    return i, found.astype(np.int64), similarity.astype(np.float32)
