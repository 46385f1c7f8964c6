"""Latency histograms kept in memory, exported by `/metrics` (xlb_api.timing_metrics).

Dependency-free, so every layer may record into one (it is cross-cutting, like lb.errors):
the control plane its apply phases and Maglev ring builds, the health manager its probes,
the API its requests. The bucket bounds of each are named here, once; the API turns a
`Histogram.snapshot()` into a Prometheus histogram at scrape time.

Labels are fixed per histogram and their values must come from small sets (a phase, a check
type, a route template): never an address or a raw path.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

#: Upper bounds (seconds) of a control-plane apply, whole or one phase: 100 us .. 10 s.
APPLY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds (seconds) of one REST request, received to answered: 1 ms .. 10 s.
REST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds (seconds) of one health probe's round trip: 100 us .. 5 s.
PROBE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 5.0)
#: Upper bounds (seconds) of one Maglev ring build: 100 us .. 5 s.
RING_BUCKETS = PROBE_BUCKETS


@dataclass(frozen=True)
class Series:
    """One label set's observations: per-bucket counts (the last is +Inf), sum, count."""

    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """Observations in all."""
        return sum(self.counts)

    def cumulative(self, bounds: Sequence[float]) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) pairs, ending with infinity."""
        out: list[tuple[float, int]] = []
        total = 0
        for le, n in zip((*bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((le, total))
        return out


class Histogram:
    """Observations counted into fixed buckets, per label values; safe from any thread."""

    def __init__(self, bounds: Sequence[float], labels: Sequence[str] = ()) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"bucket bounds must be increasing and distinct; got {bounds!r}")
        self.bounds = tuple(float(b) for b in bounds)
        self.labels = tuple(labels)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, seconds: float, *values: str) -> None:
        """Count one observation of `seconds` under these label values."""
        if len(values) != len(self.labels):
            raise ValueError(f"expected label values for {self.labels}; got {values!r}")
        i = bisect.bisect_left(self.bounds, seconds)  # a bucket holds what is <= its bound
        with self._lock:
            counts = self._counts.get(values)
            if counts is None:
                counts = self._counts[values] = [0] * (len(self.bounds) + 1)
                self._sums[values] = 0.0
            counts[i] += 1
            self._sums[values] += seconds

    @contextmanager
    def time(self, *values: str) -> Iterator[None]:
        """Observe the wall time the block takes (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start, *values)

    def snapshot(self) -> dict[tuple[str, ...], Series]:
        """Every label set seen so far, with its observations."""
        with self._lock:
            return {k: Series(tuple(c), self._sums[k]) for k, c in self._counts.items()}
