"""Balancer ns per packet through BPF_PROG_TEST_RUN, path by path, above a floor program.

    .venv/bin/python -m bench.bench_dataplane [--smoke]     (or: python bench/bench_dataplane.py)

One BPF_PROG_TEST_RUN call per packet (repeat = 1, so every packet is a fresh copy of its
frame and flows really are new or really are known), the kernel-reported duration summed over
a run of 200,000 packets, the median of 5 runs. The floor is bench/xdp/floor.c (swap MACs, XDP_TX),
measured in the same rounds: `above_floor_ns` is what the balancer costs beyond the least an
XDP_TX program does, the figure Katran was measured by on this machine (KATRAN_ABOVE_FLOOR_NS).
For the paths bound by the connection table's memory, xdp_floor_lru is measured in the same
rounds as `lru_reference`: one lookup (SYN: one insert) in a kernel LRU hash of the same number
of slots and nothing else, i.e. the connection table as it was before docs/conn-table.md (and
as Katran keeps it). A path whose cost above the floor is below that figure is cheaper, whole,
than the old table's lookup alone.

The balancer is compiled with conn_table_size 8,000,000 (Katran's default), which the loader
rounds up to 1,048,576 sets of 8 slots (8,388,608 slots, 128 MiB); the LRU reference has as
many entries. A ring of 65537 slots per VIP is filled by lb.control.maglev from 100 backends per VIP
(IPv4 VIP: IPv4 backends; IPv6 VIP: IPv6 backends), IPIP / IPv6-in-IPv6 with the RSS-friendly
outer source. The runs leave up to 2.4 million flows in 1,048,576 sets, so a few hundred sets
fill up and evict their least recently seen flow (STAT_CONN_EVICT, reported): now and then
that is one of the 200,000 known flows, whose next ACK then misses and takes the ring. Such
misses are reported per path and allowed up to MAX_ACK_MISS_FRACTION of its packets.

Paths: nonvip_pass (TCP to an address that is no VIP), syn_v4 / syn_v6 (SYNs of flows never
seen: ring + table insert + encapsulation), ack_v4_shuffled / ack_v6_shuffled (ACKs of
200,000 known flows in shuffled order: table hit + encapsulation), ack_v4_hot / ack_v6_hot
(one flow over and over), icmp_echo_v4 (echo request to the VIP, answered in XDP).
The loop in Python only moves a pointer and adds durations; the kernel measures the program
alone, so Python's speed does not enter the figures. Results merge into
bench/results/dataplane.json as {"floor_ns", "paths": {name: {"ns", "above_floor_ns"}},
"lru_reference": {...}, "conn_table_slots", "conn_evictions", "env"}.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import random
import statistics
import struct
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import XDP_DIR, environment, merge_results
from lb.config import DataplaneConfig, RuntimeConfig
from lb.consts import CONN_WAYS, STAT_INDEX, XDP_PASS, XDP_TX
from lb.dataplane.keys import addr16, set_addr
from lb.dataplane.loader import Balancer, compile_program, write_runtime_config
from lb.dataplane.mapio import MapIO
from lb.dataplane.testrun import TestRunner

RESULTS_NAME = "dataplane"
PACKETS, RUNS = 200_000, 5
SMOKE_PACKETS, SMOKE_RUNS = 20_000, 1
CONN_TABLE = 8_000_000
BACKENDS_PER_VIP = 100
# Katran on this machine, the same way (ns above the same kind of floor): the bar.
KATRAN_ABOVE_FLOOR_NS = {
    "syn_v4": 539, "ack_v4_shuffled": 407, "ack_v4_hot": 88, "nonvip_pass": 30,
    "syn_v6": 560, "ack_v6_shuffled": 391,
}
# ACKs of known flows evicted by a full set (see the top), allowed per run and path.
MAX_ACK_MISS_FRACTION = 0.001
# Paths also measured with xdp_floor_lru (the old kernel-LRU table alone) for reference.
LRU_REFERENCE = ("syn_v4", "ack_v4_shuffled", "syn_v6", "ack_v6_shuffled")
PATHS = ("nonvip_pass", "syn_v4", "ack_v4_shuffled", "ack_v4_hot",
         "syn_v6", "ack_v6_shuffled", "ack_v6_hot", "icmp_echo_v4")

LB_MAC, PEER_MAC, GW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:aa", "02:00:00:00:00:fe"
VIP4 = ipaddress.IPv4Address("198.18.0.10")
VIP6 = ipaddress.IPv6Address("2001:db8::10")
NONVIP4 = ipaddress.IPv4Address("198.18.9.9")
# Clients: flow k is (CLIENT4_BASE + k % 65536, port 1024 + k // 65536), likewise for IPv6.
CLIENT4_BASE = int(ipaddress.IPv4Address("198.19.0.0"))
CLIENT6_BASE = int(ipaddress.IPv6Address("2001:db8:c::"))
FLOWS_PER_PORT = 1 << 16
FIRST_PORT = 1024
# Offsets of the client address and port in an untagged Ethernet/IPv4|IPv6/TCP frame.
V4_SRC, V4_SPORT = 14 + 12, 14 + 20
V6_SRC, V6_SPORT = 14 + 8, 14 + 40


# --- frames ---------------------------------------------------------------------------------


@dataclass
class Frames:
    """Frames of one size laid out back to back in one buffer, sent in `order`."""

    buf: bytearray
    size: int
    order: list[int]

    def addresses(self) -> list[int]:
        """The user-space address of each frame to send, in sending order."""
        base = ctypes.addressof((ctypes.c_char * len(self.buf)).from_buffer(self.buf))
        return [base + i * self.size for i in self.order]


def _template(kind: str) -> bytes:
    from scapy.layers.inet import ICMP, IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    eth = Ether(src=PEER_MAC, dst=LB_MAC)
    if kind == "syn4":
        p = eth / IP(src="198.19.0.1", dst=str(VIP4)) / TCP(sport=1024, dport=80, flags="S")
    elif kind == "ack4":
        p = eth / IP(src="198.19.0.1", dst=str(VIP4)) / TCP(sport=1024, dport=80, flags="A")
    elif kind == "syn6":
        p = eth / IPv6(src="2001:db8:c::1", dst=str(VIP6)) / TCP(sport=1024, dport=80, flags="S")
    elif kind == "ack6":
        p = eth / IPv6(src="2001:db8:c::1", dst=str(VIP6)) / TCP(sport=1024, dport=80, flags="A")
    elif kind == "nonvip":
        p = eth / IP(src="198.19.0.1", dst=str(NONVIP4)) / TCP(sport=1024, dport=80, flags="A")
    elif kind == "echo4":
        p = eth / IP(src="198.19.0.1", dst=str(VIP4)) / ICMP(id=1, seq=1) / Raw(b"x" * 18)
    else:
        raise ValueError(kind)
    raw = bytes(p)
    return raw + bytes(max(0, 60 - len(raw)))  # minimum Ethernet frame


def flow_frames(kind: str, flows: range, shuffle: random.Random | None = None) -> Frames:
    """One frame per flow id (client address and port from the id), optionally shuffled.

    Frames are laid out in sending order, so copying them in (untimed) reads user memory
    sequentially and disturbs the caches as little as it can.
    """
    tpl = _template(kind)
    size = len(tpl)
    ids = list(flows)
    if shuffle is not None:
        shuffle.shuffle(ids)
    buf = bytearray(tpl * len(ids))
    v6 = kind.endswith("6")
    for i, k in enumerate(ids):
        off = i * size
        port = FIRST_PORT + k // FLOWS_PER_PORT
        if v6:
            buf[off + V6_SRC:off + V6_SRC + 16] = (CLIENT6_BASE + k % FLOWS_PER_PORT).to_bytes(
                16, "big")
            struct.pack_into("!H", buf, off + V6_SPORT, port)
        else:
            struct.pack_into("!I", buf, off + V4_SRC, CLIENT4_BASE + k % FLOWS_PER_PORT)
            struct.pack_into("!H", buf, off + V4_SPORT, port)
    return Frames(buf, size, list(range(len(ids))))


def same_frames(kind: str, count: int) -> Frames:
    """One frame sent `count` times."""
    tpl = _template(kind)
    return Frames(bytearray(tpl), len(tpl), [0] * count)


# --- the measuring loop ---------------------------------------------------------------------


class Timer:
    """BPF_PROG_TEST_RUN of one program, one call per frame, kernel-measured durations."""

    def __init__(self, prog_fd: int) -> None:
        self.runner = TestRunner(prog_fd)

    def run(self, frames: Frames) -> tuple[float, int]:
        """Mean ns per frame and how many frames got a verdict other than XDP_TX/PASS."""
        addresses = frames.addresses()
        total, verdicts = self.runner.time_frames(addresses, frames.size)
        odd = sum(n for v, n in verdicts.items() if v not in (XDP_TX, XDP_PASS))
        return total / len(addresses), odd


# --- the balancer under test ----------------------------------------------------------------


def _ring(balancer: Balancer, vip_num: int, first_idx: int, addrs: list[Any]) -> None:
    from lb.control.maglev import Endpoint, build_ring, ring_to_values

    size = balancer.config.ring_size
    ring = build_ring([Endpoint(str(a)) for a in addrs], size)
    values = ring_to_values(ring, {str(a): first_idx + i for i, a in enumerate(addrs)})
    t = balancer.ch_rings
    keys = (t.Key * size)(*range(vip_num * size, (vip_num + 1) * size))
    vals = (t.Leaf * size)(*values)
    t.items_update_batch(keys, vals)


def program(balancer: Balancer) -> None:
    """One IPv4 and one IPv6 TCP VIP with 100 backends each, rings from lb.control.maglev."""
    write_runtime_config(balancer, RuntimeConfig(
        gateway_mac=GW_MAC, src_v4=ipaddress.IPv4Address("198.18.0.1"),
        src_v6=ipaddress.IPv6Address("2001:db8::1")))
    reals4 = [ipaddress.IPv4Address(f"198.18.1.{i}") for i in range(1, BACKENDS_PER_VIP + 1)]
    reals6 = [ipaddress.IPv6Address(f"2001:db8:1::{i:x}") for i in range(1, BACKENDS_PER_VIP + 1)]
    for i, addr in enumerate([*reals4, *reals6], start=1):
        leaf = balancer.reals.Leaf()
        set_addr(leaf.addr, addr)
        leaf.flags = 1 if addr.version == 6 else 0
        balancer.reals[balancer.reals.Key(i)] = leaf
    for num, vip, reals, first in ((0, VIP4, reals4, 1), (1, VIP6, reals6, 1 + len(reals4))):
        meta = balancer.vip_map.Leaf()
        meta.vip_num = num
        balancer.vip_map[balancer.vip_key(vip, 80, "tcp")] = meta
        balancer.vip_addrs[balancer.vip_addr_key(vip)] = balancer.vip_addrs.Leaf(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _ring(balancer, num, first, reals)


def arm_filter(balancer: Balancer) -> None:
    """Arm the VIP address filter with the two VIPs, as the control plane does."""
    MapIO(balancer).write_vip_filter([(4, addr16(VIP4)), (6, addr16(VIP6))])


def counters(balancer: Balancer) -> dict[str, int]:
    """Global counters summed over CPUs."""
    t = balancer.glob_stats
    return {name: sum(t[t.Key(i)]) for name, i in STAT_INDEX.items()}


# --- the run --------------------------------------------------------------------------------


@dataclass
class BenchPath:
    """A path: frames for run r, the counter every frame must move, and an untimed warm-up.

    `miss` is a counter a few frames may move instead (an ACK of an evicted flow), up to
    MAX_ACK_MISS_FRACTION of them.
    """

    name: str
    frames: Callable[[int], Frames]
    counter: str
    prepare: Callable[[], None] | None = None
    miss: str | None = None


def measure(packets: int, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Measure every path and the floor; returns the figures."""
    cfg = DataplaneConfig(conn_table_size=CONN_TABLE)
    progress(f"loading the balancer (conn table {cfg.conn_sets:,} sets x {CONN_WAYS} ="
             f" {cfg.conn_capacity:,} slots, ring {cfg.ring_size}) ...")
    balancer = Balancer(cfg)
    floor_bpf = compile_program(XDP_DIR / "floor.c", cfg.cflags())
    try:
        floor_fn = floor_bpf.load_func(b"xdp_floor", floor_bpf.XDP)
        lru_fn = floor_bpf.load_func(b"xdp_floor_lru", floor_bpf.XDP)
        program(balancer)
        arm_filter(balancer)
        lb, floor = Timer(balancer.prog_fd), Timer(int(floor_fn.fd))
        lru = Timer(int(lru_fn.fd))
        rng = random.Random(0x5EED)
        # Flow ids: SYN runs use fresh ranges, the ACK set is its own range, SYNed in first.
        known = range(10 * packets, 11 * packets)

        def fresh(r: int) -> range:
            return range(r * packets, (r + 1) * packets)

        def syn_known(kind: str) -> Callable[[], None]:
            def prepare() -> None:
                lb.run(flow_frames(kind, known))
                lru.run(flow_frames(kind, known))

            return prepare

        paths = [
            BenchPath("nonvip_pass", lambda r: same_frames("nonvip", packets), "STAT_PASS_NON_VIP"),
            BenchPath("syn_v4", lambda r: flow_frames("syn4", fresh(r)), "STAT_LRU_MISS_SYN"),
            BenchPath("ack_v4_shuffled", lambda r: flow_frames("ack4", known, rng), "STAT_LRU_HIT",
                      syn_known("syn4"), miss="STAT_LRU_MISS_OTHER"),
            BenchPath("ack_v4_hot", lambda r: same_frames("ack4", packets), "STAT_LRU_HIT"),
            BenchPath("syn_v6", lambda r: flow_frames("syn6", fresh(r)), "STAT_LRU_MISS_SYN"),
            BenchPath("ack_v6_shuffled", lambda r: flow_frames("ack6", known, rng), "STAT_LRU_HIT",
                      syn_known("syn6"), miss="STAT_LRU_MISS_OTHER"),
            BenchPath("ack_v6_hot", lambda r: same_frames("ack6", packets), "STAT_LRU_HIT"),
            BenchPath("icmp_echo_v4", lambda r: same_frames("echo4", packets), "STAT_ICMP_ECHO"),
        ]
        for p in paths:
            if p.prepare is not None:
                p.prepare()
        # The hot flows are in the table before their first timed packet.
        lb.run(same_frames("ack4", 1))
        lb.run(same_frames("ack6", 1))
        floor_frames = same_frames("nonvip", packets)
        floor_ns: list[float] = []
        ns: dict[str, list[float]] = {p.name: [] for p in paths}
        misses: dict[str, int] = {p.name: 0 for p in paths if p.miss}
        lru_ns: dict[str, list[float]] = {name: [] for name in LRU_REFERENCE}
        by_name = {p.name: p for p in paths}
        for r in range(runs):
            floor_ns.append(floor.run(floor_frames)[0])
            for name in LRU_REFERENCE:
                # Fresh flow ids for the reference's SYNs, apart from the balancer's.
                frames = by_name[name].frames(r + runs if name.startswith("syn") else r)
                lru_ns[name].append(lru.run(frames)[0])
            for p in paths:
                frames = p.frames(r)
                before = counters(balancer)
                mean, odd = lb.run(frames)
                after = counters(balancer)
                moved = after[p.counter] - before[p.counter]
                missed = after[p.miss] - before[p.miss] if p.miss else 0
                sent = len(frames.order)
                if odd or moved + missed != sent or missed > MAX_ACK_MISS_FRACTION * sent:
                    raise RuntimeError(f"{p.name}: {moved} of {sent} packets took the path"
                                       f" ({p.counter}), {missed} missed, {odd} unexpected"
                                       " verdicts")
                if p.miss:
                    misses[p.name] += missed
                ns[p.name].append(mean)
            progress(f"run {r + 1}/{runs}: floor {floor_ns[-1]:.1f} ns, "
                     + ", ".join(f"{k} {v[-1]:.0f}" for k, v in ns.items()))
        evictions = counters(balancer)["STAT_CONN_EVICT"]
    finally:
        floor_bpf.cleanup()
        balancer.close()
    floor_med = statistics.median(floor_ns)

    def row(v: list[float]) -> dict[str, float]:
        return {"ns": round(statistics.median(v), 1),
                "above_floor_ns": round(statistics.median(v) - floor_med, 1)}

    return {
        "floor_ns": round(floor_med, 1),
        "paths": {name: row(v) for name, v in ns.items()},
        "lru_reference": {name: row(v) for name, v in lru_ns.items()},
        "packets_per_run": packets,
        "runs": runs,
        "conn_table_size": CONN_TABLE,
        "conn_table_slots": cfg.conn_capacity,
        "conn_evictions": evictions,
        "ack_misses": misses,
        "katran_above_floor_ns": KATRAN_ABOVE_FLOOR_NS,
    }


def table(figures: dict[str, Any]) -> str:
    """The figures as a human-readable table."""
    lines = [
        f"balancer via BPF_PROG_TEST_RUN, median of {figures['runs']} runs of "
        f"{figures['packets_per_run']:,} packets; floor (bench/xdp/floor.c)"
        f" {figures['floor_ns']} ns",
        f"{'path':<18}{'ns':>8}{'above floor':>13}{'Katran':>9}{'old LRU':>9}  verdict",
    ]
    for name, row in figures["paths"].items():
        ref = KATRAN_ABOVE_FLOOR_NS.get(name)
        verdict = "" if ref is None else ("at or below" if row["above_floor_ns"] <= ref
                                          else "ABOVE Katran")
        alone = figures["lru_reference"].get(name, {}).get("above_floor_ns", "-")
        lines.append(f"{name:<18}{row['ns']:>8.1f}{row['above_floor_ns']:>13.1f}"
                     f"{ref if ref is not None else '-':>9}{alone:>9}  {verdict}")
    lines.append("(ns above floor; 'old LRU': xdp_floor_lru, one lookup/insert in a kernel LRU"
                 " hash of as many slots and nothing else, the connection table before"
                 " docs/conn-table.md, same runs)")
    slots, evicted = figures.get("conn_table_slots"), figures.get("conn_evictions")
    if slots is not None:
        missed = ", ".join(f"{k} {v}" for k, v in figures.get("ack_misses", {}).items())
        lines.append(f"connection table: {slots:,} slots, {evicted:,} evictions over the run;"
                     f" ACKs of evicted known flows: {missed or '-'}")
    return "\n".join(lines)


def _pin_cpu() -> set[int] | None:
    # One CPU for the whole run: the caches (and the LRU reference's per-CPU list) stay put.
    try:
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {max(old)})
        return old
    except OSError:
        return None


def main(smoke: bool = False) -> dict[str, Any]:
    """Measure, merge into bench/results/dataplane.json, print a table, return figures."""
    packets, runs = (SMOKE_PACKETS, SMOKE_RUNS) if smoke else (PACKETS, RUNS)
    old = _pin_cpu()
    started = time.monotonic()
    try:
        figures = measure(packets, runs, lambda msg: print(msg, flush=True))
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)
    figures["env"] = environment()
    figures["env"]["seconds"] = round(time.monotonic() - started, 1)
    path = merge_results(RESULTS_NAME, figures)
    print(table(figures))
    print(f"(merged into {path})")
    summary = [{"name": "floor", "value": figures["floor_ns"], "unit": "ns"}]
    summary += [
        {"name": name, "value": row["above_floor_ns"], "unit": "ns above floor",
         "note": f"Katran {KATRAN_ABOVE_FLOOR_NS[name]}" if name in KATRAN_ABOVE_FLOOR_NS
         else ""}
        for name, row in figures["paths"].items()
    ]
    return {**figures, "summary": summary}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_PACKETS:,} packets, {SMOKE_RUNS} run")
    main(smoke=parser.parse_args().smoke)
