"""The one fixed-bucket histogram: children fill it and ship it in heartbeats (no I/O, no labels).

Children keep cumulative counts since they started; the supervisor adds up every child's
latest counts (and the last counts of children that died) into one Prometheus histogram. The
scheduler's order lag is one of them (``LAG_BUCKETS``), filled a batch of orders at a time.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# How late the scheduler sent polls against their due time (seconds).
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Histogram:
    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def observe_many(self, values: Sequence[float]) -> None:
        """``observe`` for a numpy array of values at once."""
        import numpy as np  # only the scheduler observes in batches; the other children need no numpy

        if not len(values):
            return
        found = np.bincount(np.searchsorted(self.bounds, values), minlength=len(self.counts)).tolist()
        self.counts = [have + more for have, more in zip(self.counts, found)]
        self.total += float(np.sum(values))
        self.count += len(values)

    def copy(self) -> Histogram:
        copied = Histogram(self.bounds)
        copied.counts, copied.total, copied.count = list(self.counts), self.total, self.count
        return copied

    def to_wire(self) -> list[float]:
        """Per-bucket (non-cumulative) counts, then sum, then count."""
        return [*self.counts, self.total, self.count]

    @staticmethod
    def add_wire(into: list[float], other: list[float]) -> list[float]:
        if not into:
            return list(other)
        return [a + b for a, b in zip(into, other)]

    @staticmethod
    def quantile(bounds: tuple[float, ...], wire: list[float], q: float) -> float | None:
        """An upper-bound estimate of quantile ``q`` from wire counts (None when empty)."""
        counts = wire[: len(bounds) + 1]
        total = sum(counts)
        if not total:
            return None
        rank = q * total
        running = 0.0
        for bound, count in zip((*bounds, float("inf")), counts):
            running += count
            if running >= rank:
                return bound
        return float("inf")
