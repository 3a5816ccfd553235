"""Crash points for the kill tests: `PIPELINE_FAILPOINTS=chunk_written:3` SIGKILLs this process the third
time the driver passes `hit("chunk_written")`. Unset (always, outside tests), `hit` does nothing.

The points: batch_drained (rows reached the driver, not yet staged), chunk_written (a chunk is durable),
part_written (mid-publish), committed (commit record written, staging not yet dropped).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter[str] = Counter()


def hit(name: str) -> None:
    spec = os.environ.get("PIPELINE_FAILPOINTS")
    if not spec:
        return
    _seen[name] += 1
    for point in spec.split(","):
        point_name, _, count = point.partition(":")
        if point_name == name and _seen[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
