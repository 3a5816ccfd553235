"""When a contender's first output row reaches storage: a poll in a thread (standard library only, so the
contenders that run under another venv, bench/daft_contender.py, share it)."""

from __future__ import annotations

import threading
import time


class FirstFile:
    """Notes when the first output row reaches storage, polling in a thread."""

    def __init__(self, exists):
        self.exists = exists
        self.seconds = None
        self.done = threading.Event()

    def start(self, started: float) -> None:
        def poll() -> None:
            while not self.done.is_set() and self.seconds is None:
                try:
                    if self.exists():
                        self.seconds = time.monotonic() - started
                except (OSError, FileNotFoundError):
                    pass
                self.done.wait(0.1)

        threading.Thread(target=poll, daemon=True).start()

    def stop(self) -> float | None:
        self.done.set()
        return self.seconds
