"""A cheap fixed-bucket histogram for hot paths (ACK latency per channel, store commit time).

``observe`` is a bisect and two additions, no lock: each histogram is written by one thread (the
reactor, or the store's writer) and read by the metrics endpoint, which tolerates a count read
between two additions. ``/metrics`` turns a snapshot into a Prometheus histogram.
"""
from __future__ import annotations

from bisect import bisect_left

#: seconds; from a commit on a fast disk to an ACK held up by a slow database
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(upper bound, count)`` pairs ending with ``+Inf``, and the sum."""
        out, total = [], 0
        for bound, n in zip([*map(repr, map(float, self.bounds)), "+Inf"], list(self.counts)):
            total += n
            out.append((bound, total))
        return out, self.sum
