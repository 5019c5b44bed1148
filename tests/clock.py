"""A clock for tests: seconds since the epoch that move only when a test moves them."""

from __future__ import annotations

START = 1_750_000_000.0


class Clock:
    """Called like ``time.time``; ``advance`` moves it."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
