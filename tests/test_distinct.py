"""`io/distinct.SeenKeys`, the manifest's repeat filter, against a Python set: the first occurrence of each key wins,
within a call and across calls, through every merge (runs of very different sizes, runs into the main array)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from pipeline.io import distinct
from pipeline.io.distinct import SeenKeys


def expected(calls: list[list[str]]) -> list[list[bool]]:
    seen: set[str] = set()
    out = []
    for keys in calls:
        out.append([k not in seen and not seen.add(k) for k in keys])
    return out


def check(calls: list[list[str]]) -> SeenKeys:
    seen = SeenKeys()
    assert [seen.first_seen(keys) for keys in calls] == expected(calls)
    assert len(seen) == len({k for keys in calls for k in keys})
    return seen


@pytest.mark.unit
def test_repeats_within_one_call_keep_the_first():
    assert SeenKeys().first_seen(["a", "b", "a", "c", "b", "a"]) == [True, True, False, True, False, False]


@pytest.mark.unit
def test_empty_calls_change_nothing():
    seen = SeenKeys()
    assert seen.first_seen([]) == [] and len(seen) == 0
    assert seen.first_seen(["a", ""]) == [True, True]
    assert seen.first_seen([]) == [] and len(seen) == 2
    assert seen.first_seen(["", "a"]) == [False, False] and len(seen) == 2


@pytest.mark.unit
@pytest.mark.parametrize("floor", [1, 64, distinct.FLOOR])
def test_many_small_calls_match_a_set(monkeypatch, floor):
    """Thousands of calls of 0 to 40 keys from a pool that repeats: runs merge and reach the main array often."""
    monkeypatch.setattr(distinct, "FLOOR", floor)
    rng = random.Random(floor)
    calls = [[f"s3://b/{rng.randrange(30_000)}.jpg" for _ in range(rng.randrange(41))] for _ in range(3_000)]
    seen = check(calls)
    assert len(seen._main) > 0


@pytest.mark.unit
def test_runs_of_very_different_sizes_and_repeats_straddling_them(monkeypatch):
    """One large call, then single keys (runs of 1 beside a main array of 20,000), then calls that mix keys from
    the main array, from the small runs and new ones; each old key is again not first."""
    monkeypatch.setattr(distinct, "FLOOR", 256)
    calls = [[f"k{i}" for i in range(20_000)]]
    calls += [[f"n{i}"] for i in range(3_000)]
    calls += [[f"k{i}", f"n{i}", f"m{i}", f"m{i}", f"n{i + 1}"] for i in range(0, 3_000, 7)]
    calls += [[f"k{i}" for i in range(19_990, 20_010)] + [f"n{i}" for i in range(2_990, 3_010)]]
    check(calls)


@pytest.mark.unit
def test_a_key_is_hashed_as_written():
    """Unicode, a lone surrogate (a file name that was not UTF-8), spellings that differ by one character."""
    assert SeenKeys().first_seen(["ü/é", "u\u0308/é", "\udcff.jpg", "\udcff.jpg", "a.jpg", "a.jpg ", "A.jpg"]) == [
        True, True, True, False, True, True, True]


@pytest.mark.unit
def test_the_main_array_grows_in_place_and_stays_sorted(monkeypatch):
    monkeypatch.setattr(distinct, "FLOOR", 100)
    seen = SeenKeys()
    for start in range(0, 50_000, 1_000):
        seen.first_seen([f"x{i}" for i in range(start, start + 1_000)])
        main = seen._main
        assert main.flags.owndata and (main[1:] > main[:-1]).all()
        assert len(seen) - len(main) < max(distinct.FLOOR, len(main) // distinct.SPARE)
        del main  # resize refuses an array something else refers to
    assert len(seen) == 50_000


@pytest.mark.unit
def test_digests_sharing_their_first_half_are_told_apart(monkeypatch):
    """The runs are searched by their digests' first 8 bytes; where those are equal, by the whole 16."""
    def halved(keys: list[str]) -> np.ndarray:
        tails = (hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys)
        return np.frombuffer(b"".join(b"\x00" * 7 + b"\x01" + t for t in tails), dtype=distinct.DIGEST)

    monkeypatch.setattr(distinct, "_digests", halved)
    monkeypatch.setattr(distinct, "FLOOR", 50)
    rng = random.Random(7)
    check([[str(rng.randrange(2_000)) for _ in range(rng.randrange(30))] for _ in range(500)])
