"""Which keys a stream has already shown, in bounded memory: a manifest of 100M rows lists each input once.

A set of the keys themselves would hold every URI (~140 bytes each in CPython: 14 GB at 100M). `SeenKeys` holds
a 128-bit BLAKE2b digest per distinct key instead, as two uint64 numpy arrays in sorted runs that merge as they
double (a log-structured set): 16 bytes a key in its arrays; measured over 10M keys the process holds 32.5 bytes
a key and peaks at 43 while the largest runs merge (docs/performance.md, "Growth to 100M inputs"). Two distinct keys share a digest with odds of about 1e-23 at 100M keys. Measured on this 2-core box:
about 1.3 µs a key, most of it hashing.
"""

from __future__ import annotations

import hashlib

import numpy as np


class SeenKeys:
    """`first_seen(keys)`: for each key, whether no earlier call (or earlier position in this call) had it."""

    def __init__(self):
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (high, low) halves, each run sorted by high

    def __len__(self) -> int:
        return sum(len(high) for high, _ in self._runs)

    def first_seen(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        high, low = _digests(keys)
        order = np.lexsort((low, high))
        high, low = high[order], low[order]
        new = ~self._contains(high, low)
        new[1:] &= (high[1:] != high[:-1]) | (low[1:] != low[:-1])  # a repeat within the call: its first stays
        if new.any():
            self._add(high[new], low[new])
        first = np.empty(len(keys), dtype=bool)
        first[order] = new
        return first.tolist()

    def _contains(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        found = np.zeros(len(high), dtype=bool)
        for run_high, run_low in self._runs:
            left = np.searchsorted(run_high, high, "left")
            right = np.searchsorted(run_high, high, "right")
            one = right - left == 1
            found[one] |= run_low[left[one]] == low[one]
            for i in np.flatnonzero(right - left > 1):  # a shared high half: ~never below billions of keys
                found[i] |= bool((run_low[left[i]:right[i]] == low[i]).any())
        return found

    def _add(self, high: np.ndarray, low: np.ndarray) -> None:
        self._runs.append((high, low))
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            (high_b, low_b), (high_a, low_a) = self._runs.pop(), self._runs.pop()
            high, low = np.concatenate([high_a, high_b]), np.concatenate([low_a, low_b])
            order = np.argsort(high, kind="stable")
            self._runs.append((high[order], low[order]))


def _digests(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    joined = b"".join(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=16).digest() for k in keys)
    halves = np.frombuffer(joined, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    return np.ascontiguousarray(halves[:, 0]), np.ascontiguousarray(halves[:, 1])
