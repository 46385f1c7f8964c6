"""Maglev ring benchmark: build time, disruption, balance (lb/maglev.py at 65537 slots).

    .venv/bin/python -m bench.bench_maglev [--smoke]     (or: python bench/bench_maglev.py)

Figures, merged into bench/results/controlplane.json:

- ``maglev_ms[N][equal|weighted]``: median ms of ``build_ring`` for N endpoints, equal
  weights or weights drawn from 1..MAX_WEIGHT (seeded). Every run names a fresh set of
  endpoints, so the identity hashes are never cached: the cost of a pool never seen before.
  N = 1000 and 4096 exceed 655 (100 slots each) and are built with ``strict=False``.
- ``remove_1_of_100_changed_pct``: % of slots that change owner when one of 100 equal
  endpoints leaves, averaged over removing each of them in turn (ideal: 1.0).
- ``balance_max_min[N]``: most / fewest slots of one endpoint, equal weights.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, merge_results
from lb.maglev import (
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
    return [
        Endpoint(f"2001:db8:{pool:x}::{i:x}", weights.randint(1, MAX_WEIGHT) if weights else 1)
        for i in range(n)
    ]


def fresh_pool(n: int, weights: random.Random | None, run: int) -> list[Endpoint]:
    """The pool of run `run`: its own identities, so no hash is cached yet."""
    return endpoints(n, run, weights)


def build(eps: list[Endpoint]) -> Ring:
    """build_ring at the default size, pools past 100 slots per endpoint allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaglevBalanceWarning)
        return build_ring(eps, DEFAULT_RING_SIZE, strict=False)


def median_ms(runs: int, make: Callable[[int], list[Endpoint]]) -> tuple[float, float]:
    """Median ms of building `make(run)` fresh each run, and of rebuilding the last pool."""
    cold, warm = [], []
    for run in range(runs):
        eps = make(run)
        t0 = time.perf_counter()
        build(eps)
        t1 = time.perf_counter()
        build(eps)
        t2 = time.perf_counter()
        cold.append((t1 - t0) * 1e3)
        warm.append((t2 - t1) * 1e3)
    return statistics.median(cold), statistics.median(warm)


def build_times(runs: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """maglev_ms (fresh identities) and the same with cached identity hashes."""
    cold: dict[str, dict[str, float]] = {}
    warm: dict[str, dict[str, float]] = {}
    build(endpoints(10, 0xFFFF, None))  # imports, inverse table, allocator
    for n in BUILD_SIZES:
        cold[str(n)], warm[str(n)] = {}, {}
        for kind in ("equal", "weighted"):
            rng = random.Random(WEIGHT_SEED + n) if kind == "weighted" else None
            c, w = median_ms(runs, functools.partial(fresh_pool, n, rng))
            cold[str(n)][kind] = round(c, 3)
            warm[str(n)][kind] = round(w, 3)
    return cold, warm


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


def table(figures: dict[str, Any], warm: dict[str, dict[str, float]], worst: float) -> str:
    """The figures as a human-readable table."""
    lines = [
        f"Maglev ring of {DEFAULT_RING_SIZE} slots (lb/maglev.py, C fill)",
        f"{'N':>6} {'equal ms':>10} {'weighted ms':>12} {'cached ids ms':>15}  (target "
        f"{TARGET_MS:g} ms)",
    ]
    for n, row in figures["maglev_ms"].items():
        cached = f"{warm[n]['equal']:.2f} / {warm[n]['weighted']:.2f}"
        lines.append(f"{n:>6} {row['equal']:>10.2f} {row['weighted']:>12.2f} {cached:>15}")
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
    cold, warm = build_times(runs)
    mean_pct, worst_pct = disruption(DISRUPTION_SIZE)
    figures: dict[str, Any] = {
        "maglev_ms": cold,
        "remove_1_of_100_changed_pct": round(mean_pct, 3),
        "balance_max_min": {str(n): round(balance(n), 4) for n in BALANCE_SIZES},
        "env": environment(),
    }
    path = merge_results(RESULTS_NAME, figures)
    print(table(figures, warm, worst_pct))
    print(f"(median of {runs} runs; merged into {path})")
    summary = [
        {"name": f"build N={n} {kind}", "value": ms, "unit": "ms", "note": f"{runs} runs"}
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
