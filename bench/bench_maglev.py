"""Maglev ring benchmark: build time, disruption, balance (lb/control/maglev.py at 65537 slots).

    .venv/bin/python -m bench.bench_maglev [--smoke]     (or: python bench/bench_maglev.py)

Figures, merged into bench/results/controlplane.json:

- ``maglev_ms[N][equal|weighted]``: median ms of ``build_ring`` for N endpoints, equal
  weights or weights drawn from 1..MAX_WEIGHT (seeded). Every run names a fresh set of
  endpoints, so the identity hashes are never cached: the cost of a pool never seen before.
  N = 1000 and 4096 exceed 655 (100 slots each) and are built with ``strict=False``.
  Timed as CPU time of the building thread (``time.thread_time``): the build is
  single-threaded, so on an idle machine that is its wall time, and on a busy one (tests
  running next to it) the time other processes hold the CPU is left out. The table also
  prints the wall-clock medians.
- ``remove_1_of_100_changed_pct``: % of slots that change owner when one of 100 equal
  endpoints leaves, averaged over removing each of them in turn (ideal: 1.0).
- ``balance_max_min[N]``: most / fewest slots of one endpoint, equal weights.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, merge_results
from lb.control.maglev import (
    DEFAULT_RING_SIZE,
    MAX_WEIGHT,
    Endpoint,
    MaglevBalanceWarning,
    Ring,
    build_ring,
    changed_slots,
    ring_to_values,
)

RESULTS_NAME = "controlplane"
BUILD_SIZES = (10, 100, 1000, 4096)
BALANCE_SIZES = (10, 100, 1000)
DISRUPTION_SIZE = 100
WEIGHT_SEED = 20160316  # NSDI '16
# The bar for one build on this machine.
TARGET_MS = 5.0


def endpoints(n: int, pool: int, weights: random.Random | None) -> list[Endpoint]:
    """n endpoints named by IPv6 addresses unique to `pool`; weight 1, or drawn from `weights`."""
    prefix = f"2001:db8:{pool >> 16:x}:{pool & 0xFFFF:x}::"
    return [
        Endpoint(f"{prefix}{i:x}", weights.randint(1, MAX_WEIGHT) if weights else 1)
        for i in range(n)
    ]


_POOLS = itertools.count(1)


def fresh_pool(n: int, weights: random.Random | None) -> list[Endpoint]:
    """A pool of identities no earlier pool used, so no hash of them is cached yet."""
    return endpoints(n, next(_POOLS), weights)


def build(eps: list[Endpoint]) -> Ring:
    """build_ring at the default size, pools past 100 slots per endpoint allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaglevBalanceWarning)
        return build_ring(eps, DEFAULT_RING_SIZE, strict=False)


class Timing(NamedTuple):
    """Medians (ms) of one pool size and kind."""

    cold: float  # thread CPU time, fresh identities
    warm: float  # thread CPU time, the same pool rebuilt (identity hashes cached)
    wall: float  # wall clock, fresh identities


def median_ms(runs: int, make: Callable[[], list[Endpoint]]) -> Timing:
    """Medians of building a pool from `make()` each run, and of rebuilding that pool."""
    cold, warm, wall = [], [], []
    for _ in range(runs):
        eps = make()
        w0, t0 = time.perf_counter(), time.thread_time()
        build(eps)
        w1, t1 = time.perf_counter(), time.thread_time()
        build(eps)
        t2 = time.thread_time()
        cold.append((t1 - t0) * 1e3)
        warm.append((t2 - t1) * 1e3)
        wall.append((w1 - w0) * 1e3)
    return Timing(*(round(statistics.median(x), 3) for x in (cold, warm, wall)))


def build_times(runs: int) -> dict[str, dict[str, Timing]]:
    """Timings per pool size and kind (equal, weighted)."""
    times: dict[str, dict[str, Timing]] = {}
    build(endpoints(10, 0, None))  # imports, inverse table, allocator
    for n in BUILD_SIZES:
        times[str(n)] = {}
        for kind in ("equal", "weighted"):
            rng = random.Random(WEIGHT_SEED + n) if kind == "weighted" else None
            times[str(n)][kind] = median_ms(runs, functools.partial(fresh_pool, n, rng))
    return times


def disruption(n: int) -> tuple[float, float]:
    """Mean and worst % of slots changing owner when one of n equal endpoints leaves."""
    eps = endpoints(n, 0, None)
    index_of = {e.identity: k for k, e in enumerate(eps, 1)}
    before = ring_to_values(build(eps), index_of)
    moved = []
    for gone in range(n):
        after = ring_to_values(build(eps[:gone] + eps[gone + 1 :]), index_of)
        moved.append(100 * len(changed_slots(before, after)) / len(before))
    return statistics.mean(moved), max(moved)


def balance(n: int) -> float:
    """Most / fewest slots held by one of n equal endpoints."""
    counts = build(endpoints(n, 0, None)).slot_counts().values()
    return max(counts) / min(counts)


def table(figures: dict[str, Any], times: dict[str, dict[str, Timing]], worst: float) -> str:
    """The figures as a human-readable table."""
    lines = [
        f"Maglev ring of {DEFAULT_RING_SIZE} slots (lb/control/maglev.py, C fill), median ms "
        f"(target {TARGET_MS:g} ms)",
        f"{'N':>6} {'equal':>8} {'weighted':>9} {'cached ids':>15} {'wall clock':>15}",
    ]
    for n, row in times.items():
        eq, wt = row["equal"], row["weighted"]
        cached = f"{eq.warm:.2f} / {wt.warm:.2f}"
        wall = f"{eq.wall:.2f} / {wt.wall:.2f}"
        lines.append(f"{n:>6} {eq.cold:>8.2f} {wt.cold:>9.2f} {cached:>15} {wall:>15}")
    pct = figures["remove_1_of_100_changed_pct"]
    lines.append(
        f"remove 1 of {DISRUPTION_SIZE}: {pct:.2f}% of slots change owner "
        f"(worst {worst:.2f}%, ideal {100 / DISRUPTION_SIZE:.2f}%)"
    )
    lines.append(
        "balance max/min: "
        + ", ".join(f"N={n} {r:.4f}" for n, r in figures["balance_max_min"].items())
    )
    return "\n".join(lines)


def main(smoke: bool = False) -> dict[str, Any]:
    """Measure, merge into bench/results/controlplane.json, print a table, return figures."""
    runs = 11 if smoke else 31
    times = build_times(runs)
    cold = {n: {kind: t.cold for kind, t in row.items()} for n, row in times.items()}
    mean_pct, worst_pct = disruption(DISRUPTION_SIZE)
    figures: dict[str, Any] = {
        "maglev_ms": cold,
        "remove_1_of_100_changed_pct": round(mean_pct, 3),
        "balance_max_min": {str(n): round(balance(n), 4) for n in BALANCE_SIZES},
        "env": environment(),
    }
    path = merge_results(RESULTS_NAME, figures)
    print(table(figures, times, worst_pct))
    print(f"(median of {runs} runs; merged into {path})")
    summary = [
        {"name": f"build N={n} {kind}", "value": ms, "unit": "ms", "note": f"CPU, {runs} runs"}
        for n, row in cold.items()
        for kind, ms in row.items()
    ]
    summary.append(
        {"name": "remove 1 of 100", "value": figures["remove_1_of_100_changed_pct"], "unit": "%"}
    )
    summary += [
        {"name": f"balance N={n}", "value": r, "unit": "max/min"}
        for n, r in figures["balance_max_min"].items()
    ]
    return {**figures, "summary": summary}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="11 runs per figure instead of 31")
    main(parser.parse_args().smoke)
