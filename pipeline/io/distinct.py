"""Which keys a stream has already shown, in bounded memory: a manifest of 100M rows lists each input once.

A set of the keys themselves would hold every URI (~140 bytes each in CPython: 14 GB at 100M). `SeenKeys` holds
a 128-bit BLAKE2b digest per distinct key instead, as 'S16' bytes (big-endian: sorting the bytes sorts the numbers):
one sorted array holding nearly all of them, and the recent ones in small sorted runs that merge as they double.
When the runs reach 1/16 of the main array they are appended to it in place (a realloc: the kernel remaps the
pages, nothing is copied) and a stable sort (timsort) merges them, with a buffer the size of the runs. So no step
holds a second copy of the main array: 16 bytes a key, plus 8 for the runs' search keys (1/16 of the keys) and the
merge's buffer; measured over 10M keys, 17-18 bytes a key held and at the peak (docs/performance.md, "Growth to
100M inputs").

Why 16 bytes: a false "seen" silently drops an input, and n distinct keys share a b-bit digest somewhere with odds
of about n²/2^(b+1): 16 bytes, 1.5e-23 at 1e8 keys and 1.5e-21 at 1e9; 12 bytes, 6e-14 and 6e-12 (would also do,
for 4 bytes a key less); 8 bytes, 3e-4 and 3e-2 (not acceptable).
"""

from __future__ import annotations

import hashlib

import numpy as np

DIGEST = "S16"
SPARE = 16  # the recent runs reach 1/SPARE of the main array, then merge into it: a buffer of ~16/SPARE bytes a key
FLOOR = 4096  # below this many recent keys, no merge into the main array


class SeenKeys:
    """`first_seen(keys)`: for each key, whether no earlier call (or earlier position in this call) had it."""

    def __init__(self):
        self._main = np.empty(0, DIGEST)  # sorted, owns its memory: grows in place
        # sorted, each more than twice the next; disjoint, and from `_main`. Beside each run its digests' first 8
        # bytes as native uint64, searched 5 times faster than 'S16' (numpy compares bytes one by one)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._main) + sum(len(run) for run, _ in self._runs)

    def first_seen(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        digests = _digests(keys)
        order = np.argsort(digests, kind="stable")  # equal digests keep their order: the first comes first
        digests = digests[order]
        new = ~self._contains(digests)
        new[1:] &= digests[1:] != digests[:-1]  # a repeat within the call: its first stays
        if new.any():
            self._add(digests[new])
        first = np.empty(len(keys), dtype=bool)
        first[order] = new
        return first.tolist()

    def _contains(self, digests: np.ndarray) -> np.ndarray:
        found = _within(self._main, digests)
        high = _high(digests)
        for run, run_high in self._runs:
            at = np.searchsorted(run_high, high).clip(max=len(run) - 1)
            hit = run[at] == digests
            unsure = np.flatnonzero(~hit & (run_high[at] == high))  # a shared high half: ~never below 1e9 keys
            hit[unsure] = _within(run, digests[unsure])
            found |= hit
        return found

    def _add(self, digests: np.ndarray) -> None:
        self._runs.append((digests, _high(digests)))
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            last = self._runs.pop()[0]
            merged = np.concatenate([self._runs.pop()[0], last])
            del last
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in one pass
            self._runs.append((merged, _high(merged)))
        recent = sum(len(run) for run, _ in self._runs)
        if recent >= max(FLOOR, len(self._main) // SPARE):
            self._absorb(recent)

    def _absorb(self, recent: int) -> None:
        """Append the runs to the main array in place and merge them in (a buffer of the runs' size)."""
        at = len(self._main)
        self._main.resize(at + recent)  # raises rather than copy if anything else refers to the array
        while self._runs:
            run = self._runs.pop()[0]
            self._main[at:at + len(run)] = run
            at += len(run)
            del run  # freed before the sort, not held through it
        self._main.sort(kind="stable")


def _within(run: np.ndarray, digests: np.ndarray) -> np.ndarray:
    if not len(run):
        return np.zeros(len(digests), dtype=bool)
    return run[np.searchsorted(run, digests).clip(max=len(run) - 1)] == digests


def _high(digests: np.ndarray) -> np.ndarray:
    return digests.view(">u8")[::2].astype(np.uint64)


def _digests(keys: list[str]) -> np.ndarray:
    joined = b"".join(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=16).digest() for k in keys)
    return np.frombuffer(joined, dtype=DIGEST)
