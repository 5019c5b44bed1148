"""Timing shared by the benchmarks: the best of several passes.

On a shared machine a pass is slowed by whatever else runs and by cold caches; the least
time over a few passes is the cost of the work itself (as ``timeit`` advises), and it is
taken the same way on both sides of every ratio a benchmark prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def best_of(
    passes: int, run: Callable[[], T], clock: Callable[[], float] = time.perf_counter
) -> tuple[float, T]:
    """The least *clock* time of *passes* calls of *run*, and the last call's result."""
    best = math.inf
    for _ in range(passes):
        started = clock()
        result = run()
        best = min(best, clock() - started)
    return best, result
