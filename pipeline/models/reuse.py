"""Exact duplicates not recomputed, in the model process: a row whose `content_hash` this process already predicted
(a bounded cache of recent predictions) or that an earlier batch row shares is copied, not predicted; one whose hash
the same model identity predicted before (a committed run, or an interrupted attempt's staged rows: `known`), or
that another model process of the run claimed first (`ClaimBook`, in Ray's ledger actor), is left for the driver to
fill (`reused_from` = COMMITTED; run/reuse.py). Each leaves the model uncalled for the row.
Why and what it keeps: README ("Exact duplicates").
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

import numpy as np

from pipeline.job.rows import error_columns

COMMITTED = ""  # `reused_from` of a row the driver fills from an earlier row with the same content
MODEL_SECONDS = "model_seconds"  # per predicted row: its share of its batch's model time (not an output column)
DUPLICATE_FAILED = "model.duplicate_failed"
CACHE_ENTRIES = 65_536  # recent predictions kept per process: a few hundred bytes each
CLAIMS_KEPT = 500_000  # contents whose first claimant a run's ledger remembers: ~150 bytes each


class ContentReuse:
    """Decides per batch which rows are copies (`mark`), and copies into them once the model has run (`fill`).

    `known`: sorted 16-byte digests (numpy "S16") of content the model identity already predicted without error."""

    def __init__(self, known: np.ndarray, capacity: int = CACHE_ENTRIES):
        self.known = known
        self.capacity = capacity
        self.cache: OrderedDict[str, tuple[str, dict]] = OrderedDict()  # content hash -> (uri, its predictions)
        self.claim: Callable[[list[str], list[str]], list[bool]] | None = None  # ClaimBook.claim, across processes

    def is_known(self, content: str) -> bool:
        if not len(self.known):
            return False
        key = np.array([bytes.fromhex(content)], dtype="S16")
        at = min(int(np.searchsorted(self.known, key)[0]), len(self.known) - 1)
        return self.known[at] == key[0]

    def mark(self, batch: dict) -> list[tuple[int, int | str]]:
        """Sets `reused_from` for the rows not to predict; returns (row, source): a row of this batch, or a cached
        content hash. Rows left to the driver (COMMITTED) are not in the list."""
        errors, _ = error_columns(batch)
        hashes = batch.get("content_hash", np.full(len(errors), None, dtype=object))
        reused = np.full(len(errors), None, dtype=object)
        first: dict[str, int] = {}
        copies: list[tuple[int, int | str]] = []
        for i, content in enumerate(hashes):
            if errors[i] is not None or not isinstance(content, str):
                continue
            if content in first:
                reused[i], source = batch["uri"][first[content]], first[content]
            elif content in self.cache:
                self.cache.move_to_end(content)
                reused[i], source = self.cache[content][0], content
            elif self.is_known(content):
                reused[i] = COMMITTED
                continue
            else:
                first[content] = i
                continue
            copies.append((i, source))
        if self.claim is not None and first:
            copies = self._claim(batch, first, reused, copies)
        batch["reused_from"] = reused
        return copies

    def _claim(self, batch: dict, first: dict[str, int], reused: np.ndarray,
               copies: list[tuple[int, int | str]]) -> list[tuple[int, int | str]]:
        """Claims the contents this batch would predict; those another process claimed first, and this batch's
        copies of them, are left to the driver (it copies that process's row). Returns the copies still made here."""
        mine = self.claim(list(first), [batch["uri"][i] for i in first.values()])
        lost = {row for row, won in zip(first.values(), mine) if not won}
        for row in lost:
            reused[row] = COMMITTED
        for row, source in copies:
            if source in lost:
                reused[row] = COMMITTED
        return [(row, source) for row, source in copies if source not in lost]

    def fill(self, batch: dict, copies: list[tuple[int, int | str]], columns: list[str]) -> None:
        """Copies the model's `columns` into each copy row (a failed source: an error row saying so), and caches
        the predictions of this batch's rows that others may repeat."""
        errors, error_types = error_columns(batch)
        for row, source in copies:
            if isinstance(source, str):
                for column, value in self.cache[source][1].items():
                    batch[column][row] = value
            elif errors[source] is not None:
                errors[row] = f"model: the input with the same content ({batch['uri'][source]}) failed"
                error_types[row] = DUPLICATE_FAILED
            else:
                for column in columns:
                    batch[column][row] = batch[column][source]
        batch.update(error=errors, error_type=error_types)
        for i, content in enumerate(batch.get("content_hash", ())):  # after the copies: keeping may evict
            if isinstance(content, str) and errors[i] is None and batch["reused_from"][i] is None:
                self._keep(content, batch["uri"][i], {c: _copy(batch[c][i]) for c in columns})

    def _keep(self, content: str, uri: str, values: dict) -> None:
        self.cache[content] = (uri, values)
        self.cache.move_to_end(content)
        if len(self.cache) > self.capacity:
            self.cache.popitem(last=False)


class ClaimBook:
    """Which input of a run predicts each content, across its model processes: the first to claim it (or that same
    input again, its batch rerun after its process died). Bounded: a content forgotten is predicted again."""

    def __init__(self, capacity: int = CLAIMS_KEPT):
        self.capacity = capacity
        self.owners: OrderedDict[bytes, int] = OrderedDict()  # 16-byte content hash -> hash of its claimant's uri

    def claim(self, contents: list[str], uris: list[str]) -> list[bool]:
        """Per content: whether `uris`' input predicts it."""
        mine = []
        for content, uri in zip(contents, uris):
            owner = self.owners.setdefault(bytes.fromhex(content), hash(uri))
            mine.append(owner == hash(uri))
            if len(self.owners) > self.capacity:
                self.owners.popitem(last=False)
        return mine


def _copy(value):
    return value.copy() if isinstance(value, np.ndarray) else value


def timed(model, batch: dict) -> dict:
    """The model's batch, with MODEL_SECONDS: its time shared among the rows it predicted (NaN elsewhere)."""
    errors, _ = error_columns(batch)
    reused = batch.get("reused_from", np.full(len(errors), None, dtype=object))
    predicted = np.array([e is None and r is None for e, r in zip(errors, reused)], dtype=bool)
    start = time.perf_counter()
    batch = model(batch)
    seconds = np.full(len(predicted), np.nan)
    seconds[predicted] = (time.perf_counter() - start) / max(1, int(predicted.sum()))
    batch[MODEL_SECONDS] = seconds
    return batch
