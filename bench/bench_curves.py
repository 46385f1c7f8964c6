"""Cost curves: ns per packet above the floor as the connection table fills and as a VIP's
backends grow, xlb and (with KATRAN_SRC) Katran side by side.

    .venv/bin/python -m bench.bench_curves [--smoke]

Same harness as bench/bench_dataplane.py (BPF_PROG_TEST_RUN, one call per packet, the
kernel's durations, medians of interleaved runs, bench/xdp/floor.c measured in the same
rounds), the same two VIPs, and two paths: ack_v4_shuffled (200,000 known flows in shuffled
order: a table hit) and syn_v4 (new flows: ring, insert, encapsulation).

- fill: the table holds 0, 10, 50 and 100% of its capacity in background flows (written from
  user space before the known flows are SYNed in: lb.dataplane.conntab's vectorised
  insert_many for xlb, a batch update of the LRU hash for Katran). xlb's capacity is its
  8,388,608 slots; Katran's is the per-CPU LRU the measuring CPU uses (8,000,000 / CPUs
  entries, as KatranLb sizes them). xlb's sets of 8 cannot all be filled by hashing alone,
  so "100%" offers 1.5x the capacity and the achieved occupancy is reported.
- backends: VIP 0's ring is rebuilt from 10, 100 and 1000 backends (lb.control.maglev) and
  the known flows are SYNed in again, so their entries spread over that many backends. This
  curve runs after the fill curve, so both tables are full: a SYN then evicts (in Katran's
  LRU hash that is what makes its SYNs cost more as the table fills).

Results merge into bench/results/curves.json as {"fill": {"levels": [...], "xlb": {path:
[ns above floor per level]}, "katran": {...}, "occupancy": {...}}, "backends": {...}}.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_dataplane as dp
from bench.common import XDP_DIR, environment, merge_results
from lb.config import DataplaneConfig
from lb.dataplane.loader import compile_program
from lb.dataplane.testrun import TestRunner

RESULTS_NAME = "curves"
FILL_LEVELS = (0.0, 0.1, 0.5, 1.0)
BACKEND_COUNTS = (10, 100, 1000)
PATHS = ("ack_v4_shuffled", "syn_v4")
PACKETS, RUNS = 100_000, 3
SMOKE = {"packets": 5_000, "runs": 1, "fill": (0.0, 0.5), "backends": (10, 100)}
# The smoke run's table (the full run's is bench_dataplane's 8,000,000).
SMOKE_TABLE = 262_144
# "100%" offers this many flows per slot (sets of 8 fill unevenly, insert_many never evicts).
FULL_OFFER = 1.5
# Background flows: clients from 198.20.0.0 (apart from the known flows' 198.19.0.0/16).
BG_BASE = int(ipaddress.IPv4Address("198.20.0.0"))
BG_PORTS = 50_000
# Backends of the curve: indices from 1000 up (apart from the two VIPs' 1..200).
CURVE_FIRST_IDX = 1000
CURVE_REAL_BASE = int(ipaddress.IPv4Address("198.18.64.0"))


def _bg_flows(start: int, stop: int) -> tuple[Any, Any]:
    """Background flow ids start..stop as (client address ints, source ports)."""
    ids = np.arange(start, stop, dtype=np.int64)
    return BG_BASE + ids // BG_PORTS, 1024 + ids % BG_PORTS


def _xlb_fill(subj: dp.XlbSubject, start: int, stop: int) -> int:
    from lb.dataplane.conntab import ConnTable
    from lb.dataplane.flowhash import Flows

    src, sport = _bg_flows(start, stop)
    flows = Flows.v4(src, int(dp.VIP4), sport, 80, socket.IPPROTO_TCP)
    with ConnTable(subj.balancer) as table:
        return int(table.insert_many(flows, 1, 0))


def _katran_keys(start: int, stop: int) -> bytes:
    src, sport = _bg_flows(start, stop)
    n = len(src)
    key = np.zeros(n, dtype=[("src", ">u4"), ("src_pad", "V12"), ("dst", ">u4"),
                             ("dst_pad", "V12"), ("sport", ">u2"), ("dport", ">u2"),
                             ("proto", "u1"), ("pad", "V3")])
    key["src"] = src
    key["dst"] = int(dp.VIP4)
    key["sport"] = sport
    key["dport"] = 80
    key["proto"] = socket.IPPROTO_TCP
    return key.tobytes()


def _occupancy(subj: dp.XlbSubject) -> float:
    from lb.dataplane.conntab import ConnTable

    with ConnTable(subj.balancer) as table:
        return round(table.count() / subj.balancer.config.conn_capacity, 4)


def _curve_reals(n: int) -> dict[int, ipaddress.IPv4Address]:
    return {CURVE_FIRST_IDX + i: ipaddress.IPv4Address(CURVE_REAL_BASE + i) for i in range(n)}


def _ring(reals: dict[int, ipaddress.IPv4Address], size: int) -> list[int]:
    from lb.control.maglev import Endpoint, build_ring, ring_to_values

    with warnings.catch_warnings():
        # 1000 backends on 65537 slots is past Maglev's 1% balance bound: measured anyway.
        warnings.simplefilter("ignore")
        ring = build_ring([Endpoint(str(a)) for a in reals.values()], size, strict=False)
    return list(ring_to_values(ring, {str(a): i for i, a in reals.items()}))


def _set_backends(subjects: list[dp.Subject], n: int, ring_size: int) -> None:
    from lb.dataplane.keys import set_addr

    reals = _curve_reals(n)
    ring = _ring(reals, ring_size)
    for subj in subjects:
        if isinstance(subj, dp.XlbSubject):
            b = subj.balancer
            for idx, addr in reals.items():
                leaf = b.reals.Leaf()
                set_addr(leaf.addr, addr)
                b.reals[b.reals.Key(idx)] = leaf
            t = b.ch_rings
            t.items_update_batch((t.Key * ring_size)(*range(ring_size)),
                                 (t.Leaf * ring_size)(*ring))
        elif isinstance(subj, dp.KatranSubject):
            subj.k.set_reals(dict(reals))
            subj.k.set_ring(0, ring)


def measure(packets: int, runs: int, fill_levels: tuple[float, ...],
            backend_counts: tuple[int, ...], progress: Callable[[str], None], *,
            katran: bool = True, table: int = dp.CONN_TABLE) -> dict[str, Any]:
    """Both curves for every subject; returns the figures."""
    cfg = DataplaneConfig(conn_table_size=table)
    rings = {num: dp.ring_values(cfg.ring_size, reals) for num, _, reals in dp.VIPS}
    subjects: list[dp.Subject] = []
    floor_bpf = compile_program(XDP_DIR / "floor.c", cfg.cflags())
    info: dict[str, Any] = {}
    try:
        xlb = dp.XlbSubject("xlb", cfg, rings)
        subjects.append(xlb)
        if katran:
            k, info = dp._katran(rings, progress, lru_size=table)
            if k is not None:
                subjects.append(k)
        floor = TestRunner(int(floor_bpf.load_func(b"xdp_floor", floor_bpf.XDP).fd))
        fs = dp.Frameset(packets)
        by_name = {sc.name: sc for sc in dp.SCENARIOS}
        scenarios = [by_name[p] for p in PATHS]
        floor_frames = dp.same_frames("nonvip", packets)
        fresh_run = [0]

        def point() -> dict[str, dict[str, float]]:
            """One point of a curve: SYN the known flows in, then interleaved runs."""
            known = fs.prepare(by_name["ack_v4_shuffled"])
            assert known is not None
            for subj in subjects:
                subj.run(known)
            # One untimed pass of each path first: the first timed run is then no colder
            # than the others (page faults of freshly written table pages, caches).
            for sc in scenarios:
                frames = fs.of(sc, fresh_run[0])
                fresh_run[0] += 1
                for subj in subjects:
                    subj.run(frames)
            floors: list[float] = []
            ns: dict[str, dict[str, list[float]]] = {
                s.name: {p: [] for p in PATHS} for s in subjects}
            for r in range(runs):
                t, _ = floor.time_frames(floor_frames.addresses(), floor_frames.size)
                floors.append(t / packets)
                order = subjects[r % len(subjects):] + subjects[:r % len(subjects)]
                for sc in scenarios:
                    # Fresh SYN flow ids at every run of every point.
                    frames = fs.of(sc, fresh_run[0])
                    fresh_run[0] += 1
                    for subj in order:
                        mean, verdicts = subj.run(frames)
                        if verdicts[sc.verdict] != len(frames.order):
                            raise RuntimeError(f"{subj.name} {sc.name}: {dict(verdicts)}")
                        ns[subj.name][sc.name].append(mean)
            f = statistics.median(floors)
            return {s: {p: round(statistics.median(v) - f, 1) for p, v in paths.items()}
                    for s, paths in ns.items()}

        fill: dict[str, Any] = {"levels": list(fill_levels), "occupancy": {}}
        done = {s.name: 0 for s in subjects}
        for level in fill_levels:
            for subj in subjects:
                if isinstance(subj, dp.XlbSubject):
                    cap = cfg.conn_capacity
                    want = int(cap * (FULL_OFFER if level >= 1.0 else level))
                    _xlb_fill(subj, done[subj.name], want)
                    fill["occupancy"].setdefault("xlb", []).append(_occupancy(subj))
                elif isinstance(subj, dp.KatranSubject):
                    cpu = max(os.sched_getaffinity(0))
                    cap = subj.k.lru_capacity(cpu)
                    want = int(cap * level)
                    subj.k.fill_lru(cpu, _katran_keys(done[subj.name], want), 1)
                    fill["occupancy"].setdefault("katran", []).append(
                        round(want / cap, 4))
                done[subj.name] = max(done[subj.name], want)
            got = point()
            for s, paths in got.items():
                for p, v in paths.items():
                    fill.setdefault(s, {}).setdefault(p, []).append(v)
            progress(f"fill {level:.0%}: " + "; ".join(
                f"{s} " + ", ".join(f"{p} {v}" for p, v in paths.items())
                for s, paths in got.items()))
        backends: dict[str, Any] = {"counts": list(backend_counts)}
        for n in backend_counts:
            _set_backends(subjects, n, cfg.ring_size)
            got = point()
            for s, paths in got.items():
                for p, v in paths.items():
                    backends.setdefault(s, {}).setdefault(p, []).append(v)
            progress(f"{n} backends: " + "; ".join(
                f"{s} " + ", ".join(f"{p} {v}" for p, v in paths.items())
                for s, paths in got.items()))
    finally:
        floor_bpf.cleanup()
        for subj in subjects:
            subj.close()
    return {"fill": fill, "backends": backends, "paths": list(PATHS),
            "packets_per_run": packets, "runs": runs, "conn_table_slots": cfg.conn_capacity,
            "katran": {k: v for k, v in info.items() if k != "paths"}}


def main(smoke: bool = False) -> dict[str, Any]:
    """Measure both curves, merge into bench/results/curves.json, return the figures."""
    if smoke:
        packets, runs = int(SMOKE["packets"]), int(SMOKE["runs"])  # type: ignore[call-overload]
        fill, counts = SMOKE["fill"], SMOKE["backends"]
    else:
        packets, runs, fill, counts = PACKETS, RUNS, FILL_LEVELS, BACKEND_COUNTS
    old = dp._pin_cpu()
    started = time.monotonic()
    try:
        figures = measure(packets, runs, tuple(fill), tuple(counts),  # type: ignore[arg-type]
                          lambda m: print(m, flush=True),
                          table=SMOKE_TABLE if smoke else dp.CONN_TABLE)
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)
    figures["smoke"] = smoke
    figures["env"] = environment()
    figures["env"]["seconds"] = round(time.monotonic() - started, 1)
    path = merge_results(RESULTS_NAME, figures)
    print(f"(merged into {path})")
    summary = []
    for curve, key in (("fill", "levels"), ("backends", "counts")):
        data = figures[curve]
        for s in ("xlb", "katran"):
            for p in PATHS:
                if s in data:
                    pts = ", ".join(f"{x}: {v}" for x, v in zip(data[key], data[s][p],
                                                                strict=True))
                    summary.append({"name": f"{curve} {s} {p}", "value": data[s][p][-1],
                                    "unit": "ns", "note": pts})
    return {**figures, "summary": summary}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few points, few packets")
    main(smoke=parser.parse_args().smoke)
