"""lb.timing's histograms: buckets by upper bound, labels fixed, the named bounds sane."""

from __future__ import annotations

import math
import threading

import pytest

from lb.timing import APPLY_BUCKETS, PROBE_BUCKETS, REST_BUCKETS, RING_BUCKETS, Histogram


def test_an_observation_on_a_bound_counts_in_that_bound_bucket() -> None:
    h = Histogram((0.001, 0.01))
    for v in (0.001, 0.005, 0.01, 3.0):
        h.observe(v)
    (series,) = h.snapshot().values()
    assert series.counts == (1, 2, 1), "a bucket holds what is <= its bound"
    assert series.cumulative(h.bounds) == [(0.001, 1), (0.01, 3), (math.inf, 4)]
    assert series.count == 4 and series.sum == pytest.approx(3.016)


def test_label_values_must_match_the_labels() -> None:
    h = Histogram((1.0,), ("phase",))
    with pytest.raises(ValueError, match="label values"):
        h.observe(0.5)
    h.observe(0.5, "maps")
    assert set(h.snapshot()) == {("maps",)}


@pytest.mark.parametrize("bounds", [(), (0.1, 0.1), (1.0, 0.5)], ids=["empty", "dup", "down"])
def test_bounds_must_increase(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram(bounds)


def test_time_counts_a_block_that_raises() -> None:
    h = Histogram(APPLY_BUCKETS, ("phase",))
    with pytest.raises(RuntimeError), h.time("store"):
        raise RuntimeError("store failed")
    assert h.snapshot()[("store",)].count == 1


def test_observations_from_many_threads_are_all_counted() -> None:
    h = Histogram(REST_BUCKETS, ("route",))

    def work() -> None:
        for _ in range(2_000):
            h.observe(0.002, "/v1/vips")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.snapshot()[("/v1/vips",)].count == 8_000


@pytest.mark.parametrize("bounds,low,high", [
    (APPLY_BUCKETS, 0.0001, 10.0), (REST_BUCKETS, 0.001, 10.0),
    (PROBE_BUCKETS, 0.0001, 5.0), (RING_BUCKETS, 0.0001, 5.0),
], ids=["apply", "rest", "probe", "ring"])
def test_named_bounds_span_their_range(bounds: tuple[float, ...], low: float, high: float) -> None:
    assert (bounds[0], bounds[-1]) == (low, high)
    assert list(bounds) == sorted(set(bounds))
