"""Repeated timings and their summary: median, min and max."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """Seconds of repeated runs of one measurement."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)

    @property
    def maximum(self) -> float:
        return max(self.seconds)

    @property
    def runs(self) -> int:
        return len(self.seconds)


def timed(function: Callable[[], object]) -> float:
    """Return the seconds one call of `function` takes."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def repeat(function: Callable[[], object], runs: int, warmup: int = 1) -> Sample:
    """Time `runs` calls of `function` after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    return Sample(tuple(timed(function) for _ in range(runs)))


def repeat_each(function: Callable[[], float], runs: int) -> Sample:
    """Collect `runs` results of `function`, which times its own critical part."""
    return Sample(tuple(function() for _ in range(runs)))
