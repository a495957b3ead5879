"""A latency histogram kept by the gateway itself and exported at scrape time (the
collector in :mod:`gateway.metrics` reads it): fixed buckets, one bisect and two
additions per observation."""

from __future__ import annotations

import bisect

#: upper bounds in seconds (Prometheus's ``le``); the last bucket is +Inf
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyHistogram:
    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations at or below it), +Inf last, as Prometheus has them."""
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out
