"""Crash points for the kill tests: `PIPELINE_FAILPOINTS=chunk_written:3` SIGKILLs this process the third
time the driver passes `hit("chunk_written")`; `chunk_published@0.5` sleeps half a second at every pass
(a slow publish, for readers polling the output meanwhile). Unset (always, outside tests), `hit` does nothing.

The points: batch_drained (rows reached the driver, not yet staged), chunk_written (a chunk is durable),
chunk_published (a chunk handed to the output format mid-commit), part_written (the folder format wrote a
part), record_written (its commit record), committed (the run committed, its staging not yet dropped).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_seen: Counter[str] = Counter()


def hit(name: str) -> None:
    spec = os.environ.get("PIPELINE_FAILPOINTS")
    if not spec:
        return
    _seen[name] += 1
    for point in spec.split(","):
        if "@" in point:
            point_name, _, seconds = point.partition("@")
            if point_name == name:
                time.sleep(float(seconds))
            continue
        point_name, _, count = point.partition(":")
        if point_name == name and _seen[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
