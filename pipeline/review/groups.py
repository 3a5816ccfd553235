"""Near-duplicate groups that never chain: stars around representatives.

Rows are taken in order of preference (the largest image, then the largest file, then the earliest uri). A row
not yet in a group that has neighbours not yet in a group becomes a representative, and those neighbours join
its group. So every member is within the threshold of its representative itself, never only through another
member: A ~ B and B ~ C, with A and C unrelated, make at most {A, B} and leave C to a group of its own."""

from __future__ import annotations

import numpy as np


class Neighbours:
    """Who is near whom: pHash pairs between distinct hash values (rows sharing a value are at distance 0) and
    embedding pairs between rows, each kept as a CSR adjacency."""

    def __init__(self, value_of_row: np.ndarray, value_pairs: tuple[np.ndarray, np.ndarray],
                 row_pairs: tuple[np.ndarray, np.ndarray], rows: int):
        """`value_of_row`: each row's index into the distinct pHash values, -1 for a row without one."""
        self.value_of_row = value_of_row
        has = value_of_row >= 0
        values = int(value_of_row.max()) + 1 if has.any() else 0
        self.rows_of_value = _csr(value_of_row[has], np.flatnonzero(has), values)
        self.near_values = _csr(*_both_ways(*value_pairs), values)
        self.near_rows = _csr(*_both_ways(*row_pairs), rows)

    def of(self, row: int) -> np.ndarray:
        """Rows near `row` (itself included where it has a pHash)."""
        parts = [_row(self.near_rows, row)]
        value = self.value_of_row[row]
        if value >= 0:
            for v in np.r_[value, _row(self.near_values, value)]:
                parts.append(_row(self.rows_of_value, v))
        return np.concatenate(parts)

    def candidates(self) -> np.ndarray:
        """Rows that have any neighbour (a shared or near pHash value, or a near embedding)."""
        rows_starts, _ = self.rows_of_value
        shared = np.diff(rows_starts) >= 2
        near = np.diff(self.near_values[0]) > 0
        value = self.value_of_row
        has = value >= 0
        mask = np.zeros(len(value), bool)
        mask[has] = shared[value[has]] | near[value[has]]
        return np.flatnonzero(mask | (np.diff(self.near_rows[0]) > 0))


def star_groups(neighbours: Neighbours, preference: np.ndarray) -> np.ndarray:
    """Each row's representative (a row index), or -1 for a row in no group; `preference`: rows, best first."""
    rep = np.full(len(preference), -1, dtype=np.int64)
    candidate = np.zeros(len(preference), bool)
    candidate[neighbours.candidates()] = True
    for row in preference[candidate[preference]]:
        if rep[row] >= 0:
            continue
        members = neighbours.of(row)
        members = members[(rep[members] < 0) & (members != row)]
        if len(members):
            rep[row] = row
            rep[members] = row
    return rep


def _both_ways(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([a, b]), np.concatenate([b, a])


def _csr(source: np.ndarray, target: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, targets): the targets of node k are targets[starts[k]:starts[k + 1]]."""
    order = np.argsort(source, kind="stable")
    starts = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(np.bincount(source, minlength=size), out=starts[1:])
    return starts, target[order].astype(np.int64)


def _row(csr: tuple[np.ndarray, np.ndarray], k: int) -> np.ndarray:
    starts, targets = csr
    return targets[starts[k]:starts[k + 1]] if k < len(starts) - 1 else targets[:0]
