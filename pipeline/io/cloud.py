"""What the gs:// and az:// stores share: many requests at once from a thread pool (their libraries' clients are
thread-safe and block), a failed read returned as the caller's row instead of raised."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

THREADS = 32


def each_concurrently(call: Callable[[str], object], uris: list[str]) -> list:
    """call(uri) for every uri, THREADS at a time; an exception raised is returned in its place."""
    def guarded(uri: str):
        try:
            return call(uri)
        except Exception as exc:  # noqa: BLE001 - a failed read is the caller's row, not an exception
            return exc

    if not uris:
        return []
    with ThreadPoolExecutor(min(THREADS, len(uris))) as pool:
        return list(pool.map(guarded, uris))


def raise_first(results: list) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise result
