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
(one flow over and over), icmp_echo_v4 (echo request to the VIP, answered in XDP); second
chance (docs/second-chance.md), xlb only: gue_syn_v4 / gue_ack_v4_miss (SYNs / ACKs of flows
never seen to a GUE VIP, no window), gue_syn_v4_window (SYNs to a GUE VIP whose every slot has
a second hop: a SYN pays the check, never the hop), gue_ack_v4_second_hop (ACKs the table
does not know to that VIP: the hop's longer GUE header, no table insert); gue_ack_v6_miss /
gue_ack_v6_second_hop the same two on an IPv6 GUE VIP (IPv6 backends, a 16-byte hop).
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
import socket
import statistics
import struct
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import XDP_DIR, environment, merge_results
from lb.config import DataplaneConfig, ProtectConfig, RuntimeConfig
from lb.consts import CONN_WAYS, F_ENCAP_GUE, RING_PREV_SHIFT, STAT_INDEX, XDP_PASS, XDP_TX
from lb.dataplane import loader
from lb.dataplane.keys import addr16, set_addr
from lb.dataplane.loader import Balancer, compile_program, write_runtime_config
from lb.dataplane.mapio import MapIO
from lb.dataplane.protect import SRC_TRUST_WAIT_S
from lb.dataplane.testrun import TestRunner

RESULTS_NAME = "dataplane"
PACKETS, RUNS = 200_000, 5
SMOKE_PACKETS, SMOKE_RUNS = 20_000, 1
CONN_TABLE = 8_000_000
BACKENDS_PER_VIP = 100
# ACKs of known flows evicted by a full set (see the top), allowed per run and path.
MAX_ACK_MISS_FRACTION = 0.001

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
    elif kind in GUE_TEMPLATES:
        flags, port = GUE_TEMPLATES[kind]
        ip: Any = (IPv6(src="2001:db8:c::1", dst=str(VIP6)) if "6" in kind
                   else IP(src="198.19.0.1", dst=str(VIP4)))
        p = eth / ip / TCP(sport=1024, dport=port, flags=flags)
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
    v6 = "6" in kind
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


# --- the balancers under test --------------------------------------------------------------


REALS4 = [ipaddress.IPv4Address(f"198.18.1.{i}") for i in range(1, BACKENDS_PER_VIP + 1)]
REALS6 = [ipaddress.IPv6Address(f"2001:db8:1::{i:x}") for i in range(1, BACKENDS_PER_VIP + 1)]
# Real indices: IPv4 backends 1..100, IPv6 backends 101..200 (0 is "no backend" in both).
REAL_INDEX = {addr: i for i, addr in enumerate([*REALS4, *REALS6], start=1)}
# (vip_num, address, backends) of the two TCP VIPs on port 80.
VIPS = ((0, VIP4, REALS4), (1, VIP6, REALS6))
# Second chance (docs/second-chance.md): GUE VIPs on VIP4 and VIP6, one per row so that no
# row's fresh flows are another's known ones: (vip_num, VIP, port, every slot has a second
# hop). Their rings are those of the TCP VIP of their family (VIPS); a hop ring's word also
# names the next backend of that family as the slot's previous one.
GUE_VIPS = ((2, VIP4, 81, False), (3, VIP4, 82, True), (4, VIP4, 83, False), (5, VIP4, 84, True),
            (6, VIP6, 85, False), (7, VIP6, 86, True))
# Template name -> (TCP flags, port) of the GUE rows; names with a 6 are IPv6 frames.
GUE_TEMPLATES = {"syn4g": ("S", 81), "syn4gw": ("S", 82), "ack4g": ("A", 83),
                 "ack4gh": ("A", 84), "ack6g": ("A", 85), "ack6gh": ("A", 86)}


def ring_values(ring_size: int, reals: list[Any]) -> list[int]:
    """The Maglev ring lb.control.maglev builds for these backends, as real indices."""
    from lb.control.maglev import Endpoint, build_ring, ring_to_values

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ring = build_ring([Endpoint(str(a)) for a in reals], ring_size)
    return list(ring_to_values(ring, {str(a): REAL_INDEX[a] for a in reals}))


def program(balancer: Balancer, rings: dict[int, list[int]]) -> None:
    """One IPv4 and one IPv6 TCP VIP with 100 backends each, rings from lb.control.maglev."""
    # The paths, not the protection (docs/protection.md): millions of SYNs a second would put
    # the CPU in flood mode (SYNs not remembered), echo replies would run out of tokens.
    write_runtime_config(balancer, RuntimeConfig(
        gateway_mac=GW_MAC, src_v4=ipaddress.IPv4Address("198.18.0.1"),
        src_v6=ipaddress.IPv6Address("2001:db8::1"),
        protect=ProtectConfig(syn_guard="off", echo_rate=0, too_big_rate=0)))
    for addr, i in REAL_INDEX.items():
        leaf = balancer.reals.Leaf()
        set_addr(leaf.addr, addr)
        leaf.flags = 1 if addr.version == 6 else 0
        balancer.reals[balancer.reals.Key(i)] = leaf
    size = balancer.config.ring_size
    for num, vip, port, hop in GUE_VIPS:
        meta = balancer.vip_map.Leaf()
        meta.vip_num = num
        meta.flags = F_ENCAP_GUE
        balancer.vip_map[balancer.vip_key(vip, port, "tcp")] = meta
        t = balancer.ch_rings
        ring, base = (rings[0], 1) if vip.version == 4 else (rings[1], BACKENDS_PER_VIP + 1)
        words = [w | (base + (w - base + 1) % BACKENDS_PER_VIP) << RING_PREV_SHIFT if hop else w
                 for w in ring]
        keys = (t.Key * size)(*range(num * size, (num + 1) * size))
        t.items_update_batch(keys, (t.Leaf * size)(*words))
    for num, vip, _ in VIPS:
        meta = balancer.vip_map.Leaf()
        meta.vip_num = num
        balancer.vip_map[balancer.vip_key(vip, 80, "tcp")] = meta
        balancer.vip_addrs[balancer.vip_addr_key(vip)] = balancer.vip_addrs.Leaf(1)
        t = balancer.ch_rings
        keys = (t.Key * size)(*range(num * size, (num + 1) * size))
        vals = (t.Leaf * size)(*rings[num])
        t.items_update_batch(keys, vals)


def arm_filter(balancer: Balancer) -> None:
    """Arm the VIP address filter with the two VIPs and the per-CPU VIP lookup cache (vip_gen
    moved on), as the control plane does."""
    io = MapIO(balancer)
    io.write_vip_filter([(4, addr16(VIP4)), (6, addr16(VIP6))])
    if "vip_cache" in balancer.maps:  # an --ab tree from before the cache has none
        io.reset_vip_cache()


def counters(balancer: Balancer) -> dict[str, int]:
    """Global counters summed over CPUs."""
    t = balancer.glob_stats
    return {name: sum(t[t.Key(i)]) for name, i in STAT_INDEX.items()}


@contextmanager
def xdp_sources(directory: Path | None) -> Iterator[None]:
    """Compile the balancer from another xdp/ tree meanwhile (A/B runs: --ab DIR)."""
    if directory is None:
        yield
        return
    old, old_names = loader.xdp_source_dir, loader.MAP_NAMES
    loader.xdp_source_dir = lambda: directory  # type: ignore[assignment]
    # An older tree declares fewer maps (no event ring before issue 20): open only its own.
    declared = (directory / "balancer" / "maps.h").read_text()
    loader.MAP_NAMES = tuple(n for n in old_names if f" {n}," in declared
                             or f"({n}," in declared)
    try:
        yield
    finally:
        loader.xdp_source_dir = old  # type: ignore[assignment]
        loader.MAP_NAMES = old_names


# --- scenarios: what is measured, one row each ----------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A path: the frames sent, the verdict every frame must get, the xlb counter every frame
    must move (`miss`: one a few may move instead, an ACK of an evicted flow, up to
    MAX_ACK_MISS_FRACTION), and whether the kernel-LRU reference is measured beside it.

    `flows`: "fresh" (a new flow id range per run: SYNs of flows never seen), "known" (the
    ACK set, SYNed in before the first run, sent shuffled) or "same" (one frame, repeated).
    `subjects`: the subjects that have the path (None: all; Katran has no GUE VIP, an A/B
    tree from before second chance no second hops).
    """

    name: str
    template: str
    flows: str
    verdict: int
    counter: str
    miss: str | None = None
    lru_reference: bool = False
    subjects: frozenset[str] | None = None

    def measured_on(self, subject: str) -> bool:
        """Whether this subject takes the path."""
        return self.subjects is None or subject in self.subjects


# Add a row to measure a new path (another helper's feature); names are the JSON keys.
SCENARIOS: list[Scenario] = [
    Scenario("nonvip_pass", "nonvip", "same", XDP_PASS, "STAT_PASS_NON_VIP"),
    Scenario("syn_v4", "syn4", "fresh", XDP_TX, "STAT_LRU_MISS_SYN", lru_reference=True),
    Scenario("ack_v4_shuffled", "ack4", "known", XDP_TX, "STAT_LRU_HIT",
             miss="STAT_LRU_MISS_OTHER", lru_reference=True),
    Scenario("ack_v4_hot", "ack4", "same", XDP_TX, "STAT_LRU_HIT"),
    Scenario("syn_v6", "syn6", "fresh", XDP_TX, "STAT_LRU_MISS_SYN", lru_reference=True),
    Scenario("ack_v6_shuffled", "ack6", "known", XDP_TX, "STAT_LRU_HIT",
             miss="STAT_LRU_MISS_OTHER", lru_reference=True),
    Scenario("ack_v6_hot", "ack6", "same", XDP_TX, "STAT_LRU_HIT"),
    Scenario("icmp_echo_v4", "echo4", "same", XDP_TX, "STAT_ICMP_ECHO"),
    # Second chance: new flows to GUE VIPs, without and with an open window (every slot has a
    # second hop). A SYN never carries the hop (it pays the check); an ACK the table does not
    # know carries it and is not written to the table (gue_ack_v4_miss is written).
    Scenario("gue_syn_v4", "syn4g", "fresh", XDP_TX, "STAT_LRU_MISS_SYN",
             subjects=frozenset({"xlb", "ab"})),
    Scenario("gue_syn_v4_window", "syn4gw", "fresh", XDP_TX, "STAT_LRU_MISS_SYN",
             subjects=frozenset({"xlb"})),
    Scenario("gue_ack_v4_miss", "ack4g", "fresh", XDP_TX, "STAT_LRU_MISS_OTHER",
             subjects=frozenset({"xlb", "ab"})),
    Scenario("gue_ack_v4_second_hop", "ack4gh", "fresh", XDP_TX, "STAT_SECOND_HOP",
             subjects=frozenset({"xlb"})),
    Scenario("gue_ack_v6_miss", "ack6g", "fresh", XDP_TX, "STAT_LRU_MISS_OTHER",
             subjects=frozenset({"xlb", "ab"})),
    Scenario("gue_ack_v6_second_hop", "ack6gh", "fresh", XDP_TX, "STAT_SECOND_HOP",
             subjects=frozenset({"xlb"})),
]
PATHS = tuple(sc.name for sc in SCENARIOS)
LRU_REFERENCE = tuple(sc.name for sc in SCENARIOS if sc.lru_reference)


class Frameset:
    """The frames of each scenario and run: fresh ranges per run, one known set, one frame."""

    def __init__(self, packets: int, seed: int = 0x5EED) -> None:
        self.packets = packets
        self.rng = random.Random(seed)
        # Flow ids: SYN runs use fresh ranges, the ACK set is its own range.
        self.known = range(10 * packets, 11 * packets)

    def fresh(self, r: int) -> range:
        """Flow ids of run r's new flows (r >= 0; references use their own r)."""
        return range(r * self.packets, (r + 1) * self.packets)

    def of(self, sc: Scenario, r: int) -> Frames:
        """The frames scenario `sc` sends in run r."""
        if sc.flows == "fresh":
            return flow_frames(sc.template, self.fresh(r))
        if sc.flows == "known":
            return flow_frames(sc.template, self.known, self.rng)
        return same_frames(sc.template, self.packets)

    def prepare(self, sc: Scenario) -> Frames | None:
        """The untimed frames that set a scenario up: the known flows' SYNs, the hot flow's
        first packet."""
        if sc.flows == "known":
            return flow_frames(sc.template.replace("ack", "syn"), self.known)
        if sc.flows == "same" and sc.template.startswith("ack"):
            return same_frames(sc.template, 1)
        return None


# --- subjects: the programs measured side by side -------------------------------------------


class Subject:
    """One program measured on every scenario: xlb, an A/B variant of it, or Katran."""

    name = "?"

    def run(self, frames: Frames) -> tuple[float, Counter[int]]:
        """Mean kernel-measured ns per frame and the verdicts."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, int]:
        """Counters before a run, for `check`."""
        return {}

    def check(self, sc: Scenario, before: dict[str, int], sent: int) -> int:
        """Raise if the run did not take the scenario's path; returns the misses allowed."""
        return 0

    def close(self) -> None:
        """Unload."""


class XlbSubject(Subject):
    """The balancer of this checkout (or of `source_dir`, an A/B variant's xdp/ tree)."""

    def __init__(self, name: str, cfg: DataplaneConfig, rings: dict[int, list[int]],
                 source_dir: Path | None = None) -> None:
        self.name = name
        with xdp_sources(source_dir):
            self.balancer = Balancer(cfg)
        try:
            program(self.balancer, rings)
            arm_filter(self.balancer)
        except BaseException:
            self.balancer.close()
            raise
        self.runner = TestRunner(self.balancer.prog_fd)

    def run(self, frames: Frames) -> tuple[float, Counter[int]]:
        addresses = frames.addresses()
        total, verdicts = self.runner.time_frames(addresses, frames.size)
        return total / len(addresses), verdicts

    def snapshot(self) -> dict[str, int]:
        return counters(self.balancer)

    def check(self, sc: Scenario, before: dict[str, int], sent: int) -> int:
        after = counters(self.balancer)
        moved = after[sc.counter] - before[sc.counter]
        missed = after[sc.miss] - before[sc.miss] if sc.miss else 0
        if moved + missed != sent or missed > MAX_ACK_MISS_FRACTION * sent:
            raise RuntimeError(f"{self.name} {sc.name}: {moved} of {sent} packets took the"
                               f" path ({sc.counter}), {missed} missed")
        return missed

    def evictions(self) -> int:
        """STAT_CONN_EVICT so far."""
        return counters(self.balancer)["STAT_CONN_EVICT"]

    def close(self) -> None:
        self.balancer.close()


class KatranSubject(Subject):
    """Katran's balancer (bench/katran/harness.py) with the same VIPs, backends and rings."""

    name = "katran"

    def __init__(self, obj: Path, rings: dict[int, list[int]], lru_size: int = CONN_TABLE
                 ) -> None:
        from bench.katran import harness

        vips = [harness.KatranVip(num, vip, 80, 6, rings[num]) for num, vip, _ in VIPS]
        self.k = harness.Katran(obj, Path(f"/sys/fs/bpf/xlb-bench-katran-{os.getpid()}"),
                                gateway_mac=GW_MAC,
                                reals={i: a for a, i in REAL_INDEX.items()}, vips=vips,
                                lru_size=lru_size)

    def run(self, frames: Frames) -> tuple[float, Counter[int]]:
        addresses = frames.addresses()
        total, verdicts = self.k.time_frames(addresses, frames.size)
        return total / len(addresses), verdicts

    def snapshot(self) -> dict[str, int]:
        return self.k.counters()

    def check(self, sc: Scenario, before: dict[str, int], sent: int) -> int:
        after = self.k.counters()
        if after["fallback_lru"] != before["fallback_lru"]:
            raise RuntimeError("katran: packets took fallback_cache (no per-CPU LRU)")
        missed = after["miss_other"] - before["miss_other"]
        if sc.flows == "known" and missed > MAX_ACK_MISS_FRACTION * sent:
            raise RuntimeError(f"katran {sc.name}: {missed} of {sent} known flows missed")
        return missed

    def close(self) -> None:
        self.k.close()


def _katran(rings: dict[int, list[int]], progress: Callable[[str], None],
            lru_size: int = CONN_TABLE) -> tuple[KatranSubject | None, dict[str, Any]]:
    """Katran's subject when KATRAN_SRC is set, and what the JSON says about it."""
    from bench.katran import harness

    src = harness.source()
    if src is None:
        progress(harness.HOW_TO)
        return None, {"absent": harness.HOW_TO}
    obj, commit = harness.build(src)
    progress(f"katran: {obj} (commit {commit})")
    return KatranSubject(obj, rings, lru_size), {"commit": commit, "source": str(src),
                                                 "lru_size": lru_size, "flood_guard": False}


# --- the backends' decap with second chance -------------------------------------------------

# The decap program's paths (xdp/decap/second.h), XDP variant, in a namespace of its own with a
# listener and an established connection per family on lo (socket lookups use the caller's
# namespace). decap_gue_v4: GUE variant 1, no hop (what every GUE packet paid before);
# decap_hop_keep_socket: a hop, an ACK of the established socket (bpf_skc_lookup_tcp finds it);
# decap_hop_forward: a hop, an ACK no socket has (lookup finds the listener, the cookie check
# fails: passed on); decap_hop_last: no hop left (kept without a lookup). The _v6 rows: the
# same in IPv6 (outer and inner IPv6, a 16-byte hop).
DECAP_SELF4, DECAP_NEXT4, DECAP_VIP4, DECAP_CLIENT4 = (
    "198.18.1.1", "198.18.1.2", "198.18.0.10", "198.18.2.1")
DECAP_SELF6, DECAP_NEXT6, DECAP_VIP6, DECAP_CLIENT6 = (
    "2001:db8:1::1", "2001:db8:1::2", "2001:db8::10", "2001:db8:2::1")
DECAP_PORT = 80
# name -> (IPv6, with a hop header, hops left, inner source port: None = the established one,
# the verdict, the counter every packet moves: None = only its GUE slot)
DECAP_PATHS: dict[str, tuple[bool, bool, int, int | None, int, str | None]] = {
    "decap_gue_v4": (False, False, 0, 45678, XDP_PASS, None),
    "decap_hop_keep_socket": (False, True, 1, None, XDP_PASS, "DECAP_STAT_SC_KEEP_SOCKET"),
    "decap_hop_forward": (False, True, 1, 45678, XDP_TX, "DECAP_STAT_SC_FORWARD"),
    "decap_hop_last": (False, True, 0, 45678, XDP_PASS, "DECAP_STAT_SC_KEEP_LAST"),
    "decap_gue_v6": (True, False, 0, 45678, XDP_PASS, None),
    "decap_hop_keep_socket_v6": (True, True, 1, None, XDP_PASS, "DECAP_STAT_SC_KEEP_SOCKET"),
    "decap_hop_forward_v6": (True, True, 1, 45678, XDP_TX, "DECAP_STAT_SC_FORWARD"),
}


def _decap_frame(v6: bool, hop: bool, hops: int, sport: int) -> bytes:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    from lb.dataplane.decap import DECAP_DEFAULT_GUE_PORT

    tcp = TCP(sport=sport, dport=DECAP_PORT, flags="A", seq=7, ack=9)
    inner = bytes(IPv6(src=DECAP_CLIENT6, dst=DECAP_VIP6) / tcp if v6
                  else IP(src=DECAP_CLIENT4, dst=DECAP_VIP4) / tcp)
    head = b""
    if hop:  # GUE variant 0 naming the second hop (xdp/common/gue.h)
        nxt = ipaddress.ip_address(DECAP_NEXT6 if v6 else DECAP_NEXT4)
        head = (bytes([5 if v6 else 2, 41 if v6 else 4, 0, 0])
                + struct.pack("!HBB", 0x786C, hops, nxt.version) + nxt.packed)
    outer: Any = (IPv6(src="2001:db8::1", dst=DECAP_SELF6, hlim=64) if v6
                  else IP(src="198.18.0.1", dst=DECAP_SELF4, ttl=64, flags="DF"))
    frame = bytes(Ether(src=PEER_MAC, dst=LB_MAC) / outer
                  / UDP(sport=50000, dport=DECAP_DEFAULT_GUE_PORT, chksum=0)
                  / Raw(head + inner))
    return frame + bytes(max(0, 60 - len(frame)))


def measure_decap(packets: int, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """ns per packet of the decap program's second-chance paths and of the floor, measured
    in the same rounds; returns {"floor_ns", "paths": {name: {"ns", "above_floor_ns", ...}}}."""
    import socket

    from lb.dataplane import netns
    from lb.dataplane.decap import Decap

    ns_name = f"xlbb{os.getpid()}d"
    netns.create(ns_name)
    socks: list[socket.socket] = []
    decap = Decap()
    floor_bpf = compile_program(XDP_DIR / "floor.c", DataplaneConfig().cflags())
    try:
        decap.add_local(DECAP_SELF4)
        decap.add_local(DECAP_SELF6)
        netns.run(ns_name, ["ip", "link", "set", "lo", "up"])
        for a in (DECAP_VIP4, DECAP_CLIENT4):
            netns.run(ns_name, ["ip", "addr", "add", f"{a}/32", "dev", "lo"])
        for a in (DECAP_VIP6, DECAP_CLIENT6):
            netns.run(ns_name, ["ip", "addr", "add", f"{a}/128", "dev", "lo", "nodad"])

        def sockets() -> dict[bool, int]:
            est: dict[bool, int] = {}
            for v6, vip, client in ((False, DECAP_VIP4, DECAP_CLIENT4),
                                    (True, DECAP_VIP6, DECAP_CLIENT6)):
                lsn = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                                    socket.SOCK_STREAM)
                lsn.bind((vip, DECAP_PORT))
                lsn.listen(8)
                cli = socket.create_connection((vip, DECAP_PORT), source_address=(client, 0))
                srv, _ = lsn.accept()
                socks.extend((lsn, cli, srv))
                est[v6] = int(cli.getsockname()[1])
            return est

        est = netns.call_in(ns_name, sockets)
        frames = {name: Frames(bytearray(f := _decap_frame(v6, hop, hops,
                                                           est[v6] if sp is None else sp)),
                               len(f), [0] * packets)
                  for name, (v6, hop, hops, sp, _, _) in DECAP_PATHS.items()}
        want = {name: (verdict, counter)
                for name, (_, _, _, _, verdict, counter) in DECAP_PATHS.items()}
        runner = TestRunner(decap.xdp_fd)
        floor = TestRunner(int(floor_bpf.load_func(b"xdp_floor", floor_bpf.XDP).fd))
        floor_frames = same_frames("nonvip", packets)
        floor_ns: list[float] = []
        ns: dict[str, list[float]] = {name: [] for name in DECAP_PATHS}

        def one_run() -> None:
            t, _ = floor.time_frames(floor_frames.addresses(), floor_frames.size)
            floor_ns.append(t / packets)
            for name, fr in frames.items():
                verdict, counter = want[name]
                before = decap.counters()
                t, verdicts = runner.time_frames(fr.addresses(), fr.size)
                moved = decap.counters()[counter] - before[counter] if counter else packets
                if verdicts[verdict] != packets or moved != packets:
                    raise RuntimeError(f"decap {name}: verdicts {dict(verdicts)}, {counter}"
                                       f" +{moved}, expected {packets} x {verdict}")
                ns[name].append(t / packets)

        for r in range(runs):
            netns.call_in(ns_name, one_run)
            progress(f"decap run {r + 1}/{runs}: floor {floor_ns[-1]:.1f} ns; " + ", ".join(
                f"{k} {v[-1]:.0f}" for k, v in ns.items()))
    finally:
        for sk in socks:
            sk.close()
        floor_bpf.cleanup()
        decap.close()
        netns.delete(ns_name)
    floor_med = statistics.median(floor_ns)
    return {"floor_ns": round(floor_med, 1), "paths": {
        name: {"ns": round(statistics.median(v), 1),
               "above_floor_ns": round(statistics.median(v) - floor_med, 1),
               "spread_ns": _spread(v)} for name, v in ns.items()}}


# --- the run --------------------------------------------------------------------------------


def _spread(v: list[float]) -> list[float]:
    return [round(min(v), 1), round(max(v), 1)]


def measure(packets: int, runs: int, progress: Callable[[str], None], *,
            ab: Path | None = None, katran: bool = True,
            paths: frozenset[str] | None = None) -> dict[str, Any]:
    """Measure every scenario (or those named in `paths`) on every subject and the floor,
    interleaved run by run (the subjects' order rotates each run); returns the figures."""
    scenarios = [sc for sc in SCENARIOS if paths is None or sc.name in paths]
    lru_reference = [sc.name for sc in scenarios if sc.lru_reference]
    cfg = DataplaneConfig(conn_table_size=CONN_TABLE)
    progress(f"loading the balancer (conn table {cfg.conn_sets:,} sets x {CONN_WAYS} ="
             f" {cfg.conn_capacity:,} slots, ring {cfg.ring_size}) ...")
    rings = {num: ring_values(cfg.ring_size, reals) for num, _, reals in VIPS}
    subjects: list[Subject] = []
    extra: dict[str, Any] = {}
    floor_bpf = compile_program(XDP_DIR / "floor.c", cfg.cflags())
    try:
        xlb = XlbSubject("xlb", cfg, rings)
        subjects.append(xlb)
        if ab is not None:
            progress(f"A/B: also the balancer compiled from {ab}")
            subjects.append(XlbSubject("ab", cfg, rings, ab))
            extra["ab_source"] = str(ab)
        if katran:
            k, extra["katran"] = _katran(rings, progress)
            if k is not None:
                subjects.append(k)
        floor = TestRunner(int(floor_bpf.load_func(b"xdp_floor", floor_bpf.XDP).fd))
        lru = TestRunner(int(floor_bpf.load_func(b"xdp_floor_lru", floor_bpf.XDP).fd))
        fs = Frameset(packets)
        for sc in scenarios:
            pre = fs.prepare(sc)
            if pre is None:
                continue
            for subj in subjects:
                if sc.measured_on(subj.name):
                    subj.run(pre)
            if sc.lru_reference:
                lru.time_frames(pre.addresses(), pre.size)
        floor_frames = same_frames("nonvip", packets)
        floor_ns: list[float] = []
        ns: dict[str, dict[str, list[float]]] = {
            s.name: {sc.name: [] for sc in scenarios if sc.measured_on(s.name)}
            for s in subjects}
        misses: dict[str, dict[str, int]] = {s.name: {} for s in subjects}
        lru_ns: dict[str, list[float]] = {name: [] for name in lru_reference}
        for r in range(runs):
            t, _ = floor.time_frames(floor_frames.addresses(), floor_frames.size)
            floor_ns.append(t / packets)
            for sc in scenarios:
                if sc.lru_reference:
                    # Fresh flow ids for the reference's SYNs, apart from the balancers'.
                    frames = fs.of(sc, r + runs if sc.flows == "fresh" else r)
                    t, _ = lru.time_frames(frames.addresses(), frames.size)
                    lru_ns[sc.name].append(t / len(frames.order))
            order = subjects[r % len(subjects):] + subjects[:r % len(subjects)]
            for sc in scenarios:
                frames = fs.of(sc, r)
                sent = len(frames.order)
                for subj in [s for s in order if sc.measured_on(s.name)]:
                    before = subj.snapshot()
                    mean, verdicts = subj.run(frames)
                    if verdicts[sc.verdict] != sent:
                        raise RuntimeError(f"{subj.name} {sc.name}: verdicts {dict(verdicts)},"
                                           f" expected {sent} x {sc.verdict}")
                    missed = subj.check(sc, before, sent)
                    if missed:
                        misses[subj.name][sc.name] = misses[subj.name].get(sc.name, 0) + missed
                    ns[subj.name][sc.name].append(mean)
            progress(f"run {r + 1}/{runs}: floor {floor_ns[-1]:.1f} ns; " + "; ".join(
                f"{s}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in paths.items())
                for s, paths in ns.items()))
        evictions = xlb.evictions()
    finally:
        floor_bpf.cleanup()
        for subj in subjects:
            subj.close()
    floor_med = statistics.median(floor_ns)

    def row(v: list[float]) -> dict[str, Any]:
        return {"ns": round(statistics.median(v), 1),
                "above_floor_ns": round(statistics.median(v) - floor_med, 1),
                "runs_ns": [round(x, 1) for x in v], "spread_ns": _spread(v)}

    figures: dict[str, Any] = {
        "floor_ns": round(floor_med, 1),
        "floor_runs_ns": [round(x, 1) for x in floor_ns],
        "paths": {name: row(v) for name, v in ns["xlb"].items()},
        "lru_reference": {name: row(v) for name, v in lru_ns.items()},
        "packets_per_run": packets,
        "runs": runs,
        "conn_table_size": CONN_TABLE,
        "conn_table_slots": cfg.conn_capacity,
        "conn_evictions": evictions,
        "ack_misses": misses["xlb"],
    }
    # A run without KATRAN_SRC (or with --ab) replaces the other subjects' keys too.
    figures["katran"] = extra.get("katran", {"absent": "--no-katran"})
    if "katran" in ns:
        figures["katran"]["paths"] = {name: row(v) for name, v in ns["katran"].items()}
        figures["katran"]["lru_misses"] = misses["katran"]
        figures["ratio_to_katran"] = {
            name: round(row(v)["above_floor_ns"]
                        / max(figures["katran"]["paths"][name]["above_floor_ns"], 0.1), 3)
            for name, v in ns["xlb"].items() if name in figures["katran"]["paths"]}
    figures["ab"] = {"source": extra["ab_source"],
                     "paths": {name: row(v) for name, v in ns["ab"].items()}} \
        if "ab" in ns else None
    return figures


# --- events (issue 20): the hot paths with sampling off, and the cost of a sampled packet ------
# Self-contained: what the events ring costs. The same balancer, one program: ev_cfg off, then
# every event type at 1 in EVENTS_SAMPLE, interleaved run by run; the ring is emptied between
# runs (EVENTS_SAMPLE keeps a run's records well under its 1 MiB, so none is lost and every
# sampled packet pays the full copy). `per_sampled_ns` = (on - off) x EVENTS_SAMPLE. "Off vs
# before the change" is the --ab run against the xdp/ tree of the commit before it.

EVENTS_SAMPLE = 100
EVENTS_PATHS = ("nonvip_pass", "syn_v4", "ack_v4_hot", "ack_v4_shuffled")


def measure_events(packets: int, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """ns per packet of EVENTS_PATHS with sampling off and at 1 in EVENTS_SAMPLE."""
    from lb.dataplane.events import ALL_TYPES, EventsControl, RingReader

    cfg = DataplaneConfig(conn_table_size=CONN_TABLE)
    rings = {num: ring_values(cfg.ring_size, reals) for num, _, reals in VIPS}
    xlb = XlbSubject("xlb", cfg, rings)
    try:
        ctl, reader = EventsControl(xlb.balancer), RingReader.of(xlb.balancer)
        fs = Frameset(packets)
        scs = [sc for sc in SCENARIOS if sc.name in EVENTS_PATHS]
        for sc in scs:
            pre = fs.prepare(sc)
            if pre is not None:
                xlb.run(pre)
        ns: dict[str, dict[str, list[float]]] = {"off": {}, "sampled": {}}
        lost0 = ctl.counters()[1]
        for r in range(runs):
            modes = ("off", "sampled") if r % 2 == 0 else ("sampled", "off")
            for sc in scs:
                for mode in modes:
                    # Fresh SYN flows per run and mode: a range of their own (after measure's).
                    frames = fs.of(sc, 100 + 2 * r + (mode == "sampled")) \
                        if sc.flows == "fresh" else fs.of(sc, r)
                    if mode == "sampled":
                        ctl.set(ALL_TYPES, EVENTS_SAMPLE)
                    mean, verdicts = xlb.run(frames)
                    ctl.off()
                    reader.drain()
                    if verdicts[sc.verdict] != len(frames.order):
                        raise RuntimeError(f"events {mode} {sc.name}: verdicts {dict(verdicts)}")
                    ns[mode].setdefault(sc.name, []).append(mean)
            progress(f"events run {r + 1}/{runs}: " + ", ".join(
                f"{n} off {ns['off'][n][-1]:.1f} / 1:{EVENTS_SAMPLE} {ns['sampled'][n][-1]:.1f}"
                for n in ns["off"]))
        lost = ctl.counters()[1] - lost0
    finally:
        xlb.close()
    out: dict[str, Any] = {"sample": EVENTS_SAMPLE, "runs": runs, "packets_per_run": packets,
                           "ring_lost": lost, "paths": {}}
    for name in ns["off"]:
        off, on = statistics.median(ns["off"][name]), statistics.median(ns["sampled"][name])
        out["paths"][name] = {
            "off_ns": round(off, 1), "sampled_ns": round(on, 1),
            "per_sampled_ns": round((on - off) * EVENTS_SAMPLE, 0),
            "off_runs_ns": [round(x, 1) for x in ns["off"][name]],
            "sampled_runs_ns": [round(x, 1) for x in ns["sampled"][name]]}
    return out


def events_table(ev: dict[str, Any]) -> str:
    """The events block as a table."""
    lines = [f"events: ns per packet, sampling off vs every type at 1 in {ev['sample']}"
             f" (median of {ev['runs']} interleaved runs; ring lost {ev['ring_lost']})",
             f"{'path':<18} {'off':>8} {'sampled':>8} {'per sampled packet':>19}"]
    for name, row in ev["paths"].items():
        lines.append(f"{name:<18} {row['off_ns']:>8.1f} {row['sampled_ns']:>8.1f}"
                     f" {row['per_sampled_ns']:>16.0f} ns")
    return "\n".join(lines)


# --- end of the events block -----------------------------------------------------------------


def table(figures: dict[str, Any]) -> str:
    """The figures as a human-readable table."""
    kat = (figures.get("katran") or {}).get("paths") or {}
    ab = (figures.get("ab") or {}).get("paths") or {}
    w = max(18, *(len(n) + 2 for n in figures["paths"]))
    lines = [
        f"balancer via BPF_PROG_TEST_RUN, median of {figures['runs']} runs of "
        f"{figures['packets_per_run']:,} packets; floor (bench/xdp/floor.c)"
        f" {figures['floor_ns']} ns; ns above the floor (min-max over runs)",
        f"{'path':<{w}}{'ns':>8}{'xlb':>17}" + (f"{'katran':>17}{'x/k':>7}" if kat else "")
        + (f"{'A/B other':>17}" if ab else "") + f"{'old LRU':>9}",
    ]

    def cell(row: dict[str, Any]) -> str:
        lo, hi = row["spread_ns"]
        f = figures["floor_ns"]
        return f"{row['above_floor_ns']:>7.1f} ({lo - f:.0f}-{hi - f:.0f})"

    for name, row in figures["paths"].items():
        line = f"{name:<{w}}{row['ns']:>8.1f}{cell(row):>17}"
        if kat:
            line += (f"{cell(kat[name]):>17}{figures['ratio_to_katran'][name]:>7.2f}"
                     if name in kat else f"{'-':>17}{'-':>7}")
        if ab:
            line += f"{cell(ab[name]):>17}" if name in ab else f"{'-':>17}"
        alone = figures["lru_reference"].get(name, {}).get("above_floor_ns", "-")
        lines.append(line + f"{alone:>9}")
    lines.append("('old LRU': xdp_floor_lru, one lookup/insert in a kernel LRU hash of as many"
                 " slots and nothing else, the connection table before docs/conn-table.md)")
    if not kat:
        lines.append(str((figures.get("katran") or {}).get("absent", "")))
    slots, evicted = figures.get("conn_table_slots"), figures.get("conn_evictions")
    if slots is not None:
        missed = ", ".join(f"{k} {v}" for k, v in figures.get("ack_misses", {}).items())
        lines.append(f"connection table: {slots:,} slots, {evicted:,} evictions over the run;"
                     f" ACKs of evicted known flows: {missed or '-'}")
    return "\n".join(lines)


def decap_table(decap: dict[str, Any]) -> str:
    """The decap figures as a human-readable table."""
    f = decap["floor_ns"]
    lines = [f"backend decap (xdp_decap, second chance), floor {f} ns; ns above the floor"]
    for name, row in decap["paths"].items():
        lo, hi = row["spread_ns"]
        lines.append(f"{name:<24}{row['ns']:>8.1f}{row['above_floor_ns']:>9.1f}"
                     f" ({lo - f:.0f}-{hi - f:.0f})")
    return "\n".join(lines)


# --- source ranges and the XDP chain on the established path (issue 18) --------------------
# Self-contained: the IPv4 VIP's known flows (ack_v4_shuffled) and its hot flow (ack_v4_hot)
# through one balancer in four variants, measured in the same rounds as the floor: the VIP
# without a source list ("plain"), with an allow list and with a deny list of each size of
# SRC_LIST_SIZES IPv4 prefixes (lengths 12-30; the allow list covers the clients, the deny
# list does not: every packet passes), and the plain VIP behind the chain's root
# (xdp/root/root.c) with every filter slot empty ("chain_root": the root's failed tail calls
# and its one call into the balancer). "delta_ns": each variant's ns above the floor minus
# plain's.

SRC_LIST_SIZES = (16, 1000)
SRC_CHAIN_PATHS = ("ack_v4_shuffled", "ack_v4_hot")
SRC_CHAIN_VARIANTS = ("plain", *(f"{kind}_{n}" for n in SRC_LIST_SIZES
                                 for kind in ("allow", "deny")), "chain_root")
CLIENTS4 = ipaddress.IPv4Network("198.19.0.0/16")


def src_lists(rng: random.Random, size: int) -> tuple[list[ipaddress.IPv4Network],
                                                       list[ipaddress.IPv4Network]]:
    """(allow, deny) lists of `size` prefixes: the allow list covers the clients (CLIENTS4),
    the deny list keeps clear of them."""
    nets: set[ipaddress.IPv4Network] = set()
    while len(nets) < size:
        net = ipaddress.IPv4Network((rng.getrandbits(32), rng.randint(12, 30)), strict=False)
        if not net.overlaps(CLIENTS4):
            nets.add(net)
    deny = sorted(nets)
    return [*deny[:size - 1], CLIENTS4], deny


def _set_src_variant(b: Balancer, nets: list[ipaddress.IPv4Network], flags: int,
                     verdict: int) -> None:
    from lb.consts import FAMILY_V4

    io = MapIO(b)
    for key in io.read_src_ranges():
        io.del_src_range(key)
    for net in nets:
        io.set_src_range((FAMILY_V4, 0, addr16(net.network_address), net.prefixlen), verdict)
    # As the control plane writes it (MapIO moves vip_gen on: the VIP lookup is cached per
    # CPU), or directly for an --ab tree from before the cache.
    if "vip_cache" in b.maps:
        io.set_vip((FAMILY_V4, addr16(VIP4), 80, socket.IPPROTO_TCP), 0, flags)
    else:
        meta = b.vip_map.Leaf()
        meta.vip_num, meta.flags = 0, flags
        b.vip_map[b.vip_key(VIP4, 80, "tcp")] = meta
    if nets:
        # As the control plane does after a change: the flows check their source again once,
        # then trust the verdict their entry's stamp caches (xdp/balancer/srcrange.h).
        io.mark_src_changed([0])
        # From then on an established flow's first packet checks its source and stamps its
        # entry; the others trust the stamp.
        time.sleep(SRC_TRUST_WAIT_S)


def measure_src_chain(packets: int, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """ns per packet of the established path with and without source lists and behind the
    chain's root, above the floor measured in the same rounds (see the block's comment)."""
    import shutil

    from lb.consts import F_SRC_ALLOW, F_SRC_RANGES, SRC_ALLOW, SRC_DENY
    from lb.dataplane import chain

    cfg = DataplaneConfig(conn_table_size=CONN_TABLE)
    rings = {num: ring_values(cfg.ring_size, reals) for num, _, reals in VIPS}
    variants: dict[str, tuple[list[ipaddress.IPv4Network], int, int]] = {
        "plain": ([], 0, SRC_ALLOW), "chain_root": ([], 0, SRC_ALLOW)}
    for n in SRC_LIST_SIZES:
        allow, deny = src_lists(random.Random(0x5C + n), n)
        variants[f"allow_{n}"] = (allow, F_SRC_RANGES | F_SRC_ALLOW, SRC_ALLOW)
        variants[f"deny_{n}"] = (deny, F_SRC_RANGES, SRC_DENY)
    scenarios = {sc.name: sc for sc in SCENARIOS if sc.name in SRC_CHAIN_PATHS}
    pins = Path(f"/sys/fs/bpf/xlbb{os.getpid()}c")
    floor_bpf = compile_program(XDP_DIR / "floor.c", cfg.cflags())
    xlb = XlbSubject("xlb", cfg, rings)
    root: Any = None
    try:
        root = chain.Root(pins)
        chain.set_slot(pins, chain.CHAIN_BALANCER_SLOT, xlb.balancer.prog_fd, "the balancer")
        runners = {v: xlb.runner for v in SRC_CHAIN_VARIANTS}
        runners["chain_root"] = TestRunner(root.prog_fd)
        floor = TestRunner(int(floor_bpf.load_func(b"xdp_floor", floor_bpf.XDP).fd))
        fs = Frameset(packets)
        for sc in scenarios.values():
            pre = fs.prepare(sc)
            if pre is not None:
                xlb.run(pre)
        floor_frames = same_frames("nonvip", packets)
        floor_ns: list[float] = []
        ns: dict[str, dict[str, list[float]]] = {
            p: {v: [] for v in SRC_CHAIN_VARIANTS} for p in scenarios}
        for r in range(runs):
            t, _ = floor.time_frames(floor_frames.addresses(), floor_frames.size)
            floor_ns.append(t / packets)
            k = r % len(SRC_CHAIN_VARIANTS)
            for v in SRC_CHAIN_VARIANTS[k:] + SRC_CHAIN_VARIANTS[:k]:
                _set_src_variant(xlb.balancer, *variants[v])
                for name, sc in scenarios.items():
                    frames = fs.of(sc, r)
                    sent = len(frames.order)
                    # Untimed: each flow's first packet since the lists changed (the checks).
                    runners[v].time_frames(frames.addresses(), frames.size)
                    before = xlb.snapshot()
                    total, verdicts = runners[v].time_frames(frames.addresses(), frames.size)
                    if verdicts[sc.verdict] != sent:
                        raise RuntimeError(f"{v} {name}: verdicts {dict(verdicts)},"
                                           f" expected {sent} x {sc.verdict}")
                    xlb.check(sc, before, sent)
                    ns[name][v].append(total / sent)
            progress(f"source ranges / chain run {r + 1}/{runs}: floor {floor_ns[-1]:.1f} ns; "
                     + "; ".join(f"{p}: " + ", ".join(f"{v} {x[-1]:.0f}" for v, x in vs.items())
                                 for p, vs in ns.items()))
    finally:
        _set_src_variant(xlb.balancer, [], 0, 0)
        if root is not None:
            root.close()
        shutil.rmtree(pins, ignore_errors=True)
        floor_bpf.cleanup()
        xlb.close()
    floor_med = statistics.median(floor_ns)

    def above(v: list[float]) -> float:
        return round(statistics.median(v) - floor_med, 1)

    return {
        "floor_ns": round(floor_med, 1), "list_sizes": list(SRC_LIST_SIZES), "runs": runs,
        "packets_per_run": packets,
        "paths": {p: {v: {"ns": round(statistics.median(x), 1), "above_floor_ns": above(x),
                          "spread_ns": _spread(x)} for v, x in vs.items()}
                  for p, vs in ns.items()},
        "delta_ns": {p: {v: round(above(x) - above(vs["plain"]), 1)
                         for v, x in vs.items() if v != "plain"} for p, vs in ns.items()},
    }  # fmt: skip


def src_chain_table(fig: dict[str, Any]) -> str:
    """The source-range / chain figures as a table: ns above the floor, delta to plain."""
    f = fig["floor_ns"]
    lines = [f"established path, IPv4 VIP: allow/deny source lists of N prefixes (allow_N,"
             f" deny_N) and the chain's root with empty filter slots; floor {f} ns; ns above"
             " the floor (min-max), delta to plain",
             f"{'path':<16}" + "".join(f"{v:>24}" for v in SRC_CHAIN_VARIANTS)]
    for p, vs in fig["paths"].items():
        cells = []
        for v in SRC_CHAIN_VARIANTS:
            row, lo_hi = vs[v], vs[v]["spread_ns"]
            d = "" if v == "plain" else f" {fig['delta_ns'][p][v]:+.1f}"
            cells.append(f"{row['above_floor_ns']:.1f} ({lo_hi[0] - f:.0f}-{lo_hi[1] - f:.0f}){d}")
        lines.append(f"{p:<16}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def main_src_chain(packets: int, runs: int, *, merge: bool = True) -> dict[str, Any]:
    """The source-range / chain rows alone (pinned to one CPU); merged as src_ranges_chain
    into bench/results/dataplane.json unless `merge` is False; printed; returned."""
    old = _pin_cpu()
    try:
        fig = measure_src_chain(packets, runs, lambda msg: print(msg, flush=True))
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)
    if merge:
        fig["env"] = environment()
        print(src_chain_table(fig))
        print(f"(merged into {merge_results(RESULTS_NAME, {'src_ranges_chain': fig})})")
    return fig


def _pin_cpu() -> set[int] | None:
    # One CPU for the whole run: the caches (and the LRU reference's per-CPU list) stay put.
    try:
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {max(old)})
        return old
    except OSError:
        return None


def main(smoke: bool = False, *, ab: Path | None = None, katran: bool = True,
         runs: int | None = None, only_src_chain: bool = False,
         paths: frozenset[str] | None = None, decap: bool = True,
         events_only: bool = False) -> dict[str, Any]:
    """Measure, merge into bench/results/dataplane.json, print a table, return figures.

    `paths` (some scenarios only) or no `decap`: a partial run, printed and not merged.
    """
    packets, n = (SMOKE_PACKETS, SMOKE_RUNS) if smoke else (PACKETS, RUNS)
    if only_src_chain:
        return main_src_chain(packets, runs or n)
    if events_only:
        return main_events(packets, runs or n)
    old = _pin_cpu()
    started = time.monotonic()
    try:
        figures = measure(packets, runs or n, lambda msg: print(msg, flush=True), ab=ab,
                          katran=katran, paths=paths)
        if decap:
            figures["decap"] = measure_decap(packets, runs or n,
                                             lambda msg: print(msg, flush=True))
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)
    if paths is None and decap:  # a partial run (--paths, --no-decap) leaves them out
        figures["src_ranges_chain"] = main_src_chain(packets, runs or n, merge=False)
    figures["smoke"] = smoke
    figures["env"] = environment()
    figures["env"]["seconds"] = round(time.monotonic() - started, 1)
    print(table(figures))
    if decap:
        print(decap_table(figures["decap"]))
    if figures.get("src_ranges_chain"):
        print(src_chain_table(figures["src_ranges_chain"]))
    if paths is None and decap:
        print(f"(merged into {merge_results(RESULTS_NAME, figures)})")
    else:
        print("(a partial run: not merged into the results)")
    kat = (figures.get("katran") or {}).get("paths") or {}
    summary = [{"name": "floor", "value": figures["floor_ns"], "unit": "ns"}]
    summary += [
        {"name": name, "value": row["above_floor_ns"], "unit": "ns above floor",
         "note": f"katran {kat[name]['above_floor_ns']} (x{figures['ratio_to_katran'][name]})"
         if name in kat else ""}
        for name, row in figures["paths"].items()
    ]
    return {**figures, "summary": summary}


def main_events(packets: int, runs: int) -> dict[str, Any]:
    """Only the events block (--events): measured, merged under "events", printed."""
    old = _pin_cpu()
    try:
        ev = measure_events(packets, max(runs, 2), lambda msg: print(msg, flush=True))
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)
    ev["env"] = environment()
    path = merge_results(RESULTS_NAME, {"events": ev})
    print(events_table(ev))
    print(f"(merged into {path})")
    return ev


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_PACKETS:,} packets, {SMOKE_RUNS} run")
    parser.add_argument("--runs", type=int, help=f"runs (default {RUNS}, smoke {SMOKE_RUNS})")
    parser.add_argument("--ab", type=Path, metavar="XDP_DIR",
                        help="also measure the balancer compiled from this xdp/ tree, "
                             "interleaved (e.g. one `git archive main xdp` unpacked)")
    parser.add_argument("--no-katran", action="store_true", help="leave Katran out")
    parser.add_argument("--only-src-chain", action="store_true",
                        help="only the source-range / chain rows (merged as src_ranges_chain)")
    parser.add_argument("--paths", metavar="NAME,...",
                        help="only these scenarios (a partial run, not merged): "
                             + ",".join(PATHS))
    parser.add_argument("--no-decap", action="store_true",
                        help="leave the decap program out (a partial run, not merged)")
    parser.add_argument("--events", action="store_true",
                        help="only the events block: sampling off vs 1 in 100")
    a = parser.parse_args()
    if a.ab is not None and not (a.ab / "balancer" / "balancer.c").is_file():
        parser.error(f"--ab {a.ab}: not an xdp/ tree (no balancer/balancer.c in it)")
    chosen = frozenset(a.paths.split(",")) if a.paths else None
    if chosen is not None and not chosen <= set(PATHS):
        parser.error(f"unknown paths: {', '.join(sorted(chosen - set(PATHS)))}")
    main(smoke=a.smoke, ab=a.ab.resolve() if a.ab else None, katran=not a.no_katran,
         runs=a.runs, only_src_chain=a.only_src_chain, paths=chosen,
         decap=not a.no_decap, events_only=a.events)
