"""The balancer XDP program, proven packet by packet through BPF_PROG_TEST_RUN.

One table row per behaviour (Katran's fixtures, Cilium's PKTGEN/SETUP/CHECK): the maps a row
seeds, the frames it sends, the verdict and the exact frame expected back (built with scapy
from the documented behaviour, compared byte for byte after its checksums are verified),
and the global counters that must have moved (every other slot must stay at zero).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    in6_chksum,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw
from scapy.utils import checksum

from lb.consts import (
    CONN_WAYS,
    F_ENCAP_GUE,
    F_HASH_SRC_ONLY,
    F_LRU_BYPASS,
    F_SRC_LB,
    GLOB_STATS,
    VERDICT_NAMES,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
)
from lb.control.reconcile import MapIO
from lb.dataplane.flowhash import pair_slot
from tests.dataplane import packets as P
from tests.dataplane.lab import Flow, Lab
from tests.dataplane.packets import (
    CLIENT4,
    CLIENT6,
    GUE_PORT,
    LB_SRC4,
    LB_SRC6,
    NONVIP4,
    NONVIP6,
    REAL4,
    REAL6,
    VIP4,
    VIP4B,
    VIP6,
    ether,
)

pytestmark = pytest.mark.bpf

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Expect = bytes | Callable[[Lab], bytes] | None


@dataclass(frozen=True)
class Step:
    """One frame in, the verdict and frame out (None: must leave untouched)."""

    frame: bytes
    verdict: int
    expect: Expect = None


@dataclass(frozen=True)
class Case:
    """A table row: seed the maps, send the steps, check counters and extra properties."""

    id: str
    seed: Callable[[Lab], None]
    steps: Sequence[Step] | Callable[[Lab], Sequence[Step]]
    counters: dict[str, int] = field(default_factory=dict)
    check: Callable[[Lab], None] | None = None


# --- seeding helpers ------------------------------------------------------------------------


def vip_with(
    vip: IPAddress = VIP4,
    port: int = 80,
    proto: str = "tcp",
    flags: int = 0,
    backends: Sequence[IPAddress] = (REAL4[0],),
    ring: Sequence[int] | None = None,
    num: int = 0,
) -> Callable[[Lab], None]:
    """Seed one VIP whose backends sit at reals 1..n, ring filled with `ring` (default 1..n)."""

    def seed(lab: Lab) -> None:
        lab.vip(vip, port, proto, num=num, flags=flags)
        for i, addr in enumerate(backends, start=1):
            lab.real(i, addr)
        lab.ring(num, list(ring) if ring is not None else list(range(1, len(backends) + 1)))

    return seed


def seeds(*fns: Callable[[Lab], None]) -> Callable[[Lab], None]:
    """Run several seeding steps in order."""

    def seed(lab: Lab) -> None:
        for fn in fns:
            fn(lab)

    return seed


def with_conn(flow: Flow, real_idx: int, age_s: float = 0.0, closing: bool = False
              ) -> Callable[[Lab], None]:
    """Seed a connection-table entry from Python (lb.dataplane.conntab), as the control plane
    writes."""
    return lambda lab: lab.conn(flow, real_idx, age_s, closing=closing)


def without_conn(flow: Flow) -> Callable[[Lab], None]:
    """Delete a flow's connection-table entry from Python; it must have been there."""

    def seed(lab: Lab) -> None:
        assert lab.delete_conn(flow), "the entry to delete was not in the table"

    return seed


def with_config(**changes: object) -> Callable[[Lab], None]:
    """Rewrite lb_cfg with changes to the defaults."""
    return lambda lab: lab.config(**changes)


def nothing(lab: Lab) -> None:
    """Seed nothing."""


# --- frames used by several rows -----------------------------------------------------------

F4 = Flow(CLIENT4, VIP4, 40000, 80)
F6 = Flow(CLIENT6, VIP6, 40000, 80)
SYN4 = P.tcp4()
ACK4 = P.tcp4(flags="A", payload=b"hello")
SYN6 = P.tcp6()
ACK6 = P.tcp6(flags="A", payload=b"hello")
UDP4 = P.udp4(dport=80)
UDP6 = P.udp6(dport=80)
RSS4 = P.rss_src4(CLIENT4, 40000)
RSS6 = P.rss_src6(CLIENT6, 40000)
RSS46 = P.rss_src6(CLIENT4, 40000)
ECHO4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4)) / ICMP(id=7, seq=3) / Raw(b"ping"))
ECHO6 = bytes(ether() / IPv6(src=str(CLIENT6), dst=str(VIP6))
              / ICMPv6EchoRequest(id=7, seq=3, data=b"ping"))


def enc(frame: bytes, backend: IPAddress, src: IPAddress, gue: int | None = None) -> bytes:
    """Expected encapsulation of `frame` (GUE with source port `gue` when given)."""
    if gue is None:
        return P.encapsulated(frame, backend, src)
    return P.encapsulated(frame, backend, src, gue_port=GUE_PORT, gue_src_port=gue)


def tx(frame: bytes, expect: Expect) -> list[Step]:
    """One frame forwarded (XDP_TX)."""
    return [Step(frame, XDP_TX, expect)]


def passed(frame: bytes) -> list[Step]:
    """One frame passed to the stack untouched."""
    return [Step(frame, XDP_PASS)]


def dropped(frame: bytes) -> list[Step]:
    """One frame dropped."""
    return [Step(frame, XDP_DROP)]


def ring_backend(flow: Flow, reals: Sequence[IPAddress], src_only: bool = False
                 ) -> Callable[[Lab], IPAddress]:
    """The backend a ring patterned over `reals` (indices 1..n) gives `flow`."""

    def pick(lab: Lab) -> IPAddress:
        idx = lab.ring_pick(list(range(1, len(reals) + 1)), flow.hash(src_only))
        return reals[idx - 1]

    return pick


def hashed_enc(frame: bytes, flow: Flow, reals: Sequence[IPAddress], src: IPAddress,
               gue: bool = False, src_only: bool = False) -> Callable[[Lab], bytes]:
    """Expected encapsulation towards the ring's pick for `flow` (hash model from packets.py)."""

    def build(lab: Lab) -> bytes:
        backend = ring_backend(flow, reals, src_only)(lab)
        sport = P.gue_sport(flow.hash(src_only)) if gue else None
        return enc(frame, backend, src, sport)

    return build


# --- checks that run after the steps ---------------------------------------------------------


# A refreshed entry was seen this long ago at most (stamps are 16.78 ms units; a slow run).
FRESH_S = 5.0


def conn_is(flow: Flow, real_idx: int | None, *, fresh: bool = False, closing: bool | None = None,
            udp: bool | None = None, vip_num: int | None = None) -> Callable[[Lab], None]:
    """The connection table maps `flow` to `real_idx` (None: no entry), with these fields."""

    def check(lab: Lab) -> None:
        got = lab.lookup_conn(flow)
        if real_idx is None:
            assert got is None, f"the flow is in the connection table ({got})"
            return
        assert got is not None, "the flow is not in the connection table"
        assert got.real_idx == real_idx, (
            f"the table entry points at backend {got.real_idx}, not {real_idx}")
        if fresh:
            assert got.age_s < FRESH_S, (
                f"the entry's stamp was not refreshed (seen {got.age_s:.1f} s ago)")
        if closing is not None:
            assert got.closing == closing, (
                "the entry is not marked closing" if closing else "the entry is marked closing")
        if udp is not None:
            assert got.udp == udp, (
                "the entry is not marked UDP" if udp else "a TCP entry is marked UDP")
        if vip_num is not None:
            assert got.vip_num == vip_num, (
                f"the entry records VIP {got.vip_num}, not {vip_num}")

    return check


def conn_untouched(flow: Flow, age_s: float) -> Callable[[Lab], None]:
    """The flow's entry, seeded `age_s` ago, was neither refreshed nor rewritten."""

    def check(lab: Lab) -> None:
        got = lab.lookup_conn(flow)
        assert got is not None, "the flow is not in the connection table"
        assert got.age_s >= age_s - 1, (
            f"the entry's stamp was refreshed (seen {got.age_s:.1f} s ago, seeded {age_s} s)")

    return check


def conn_count_is(n: int) -> Callable[[Lab], None]:
    """The connection table holds exactly `n` entries."""

    def check(lab: Lab) -> None:
        got = lab.conn_count()
        assert got == n, f"the connection table holds {got} entries, expected {n}"

    return check


def table_empty(lab: Lab) -> None:
    """Nothing was inserted in the connection table."""
    assert lab.conn_count() == 0, "the connection table was filled"


def stats_are(vip: tuple[int, int, int] | None = None, num: int = 0,
              reals: dict[int, tuple[int, int]] | None = None) -> Callable[[Lab], None]:
    """Per-VIP (packets, bytes, new_conns) and per-backend (packets, bytes) counters."""

    def check(lab: Lab) -> None:
        if vip is not None:
            assert lab.vip_counters(num) == vip, (
                f"VIP counters (packets, bytes, new_conns) are {lab.vip_counters(num)}, "
                f"expected {vip}")
        for idx, want in (reals or {}).items():
            assert lab.real_counters(idx) == want, (
                f"backend {idx} counters (packets, bytes) are {lab.real_counters(idx)}, "
                f"expected {want}")

    return check


def all_of(*checks: Callable[[Lab], None]) -> Callable[[Lab], None]:
    """Run several checks."""

    def check(lab: Lab) -> None:
        for c in checks:
            c(lab)

    return check


def ip_len(frame: bytes) -> int:
    """Length of a frame's IP packet as its header states it."""
    inner = P.l3_bytes(frame)
    if inner[0] >> 4 == 4:
        return int.from_bytes(inner[2:4], "big")
    return 40 + int.from_bytes(inner[4:6], "big")


# --- the table -----------------------------------------------------------------------------

V4 = vip_with()
V6 = vip_with(vip=VIP6, backends=(REAL6[0],))
TWO4 = vip_with(backends=(REAL4[0], REAL4[1]), ring=[1])
TWO6 = vip_with(vip=VIP6, backends=(REAL6[0], REAL6[1]), ring=[1])
MANY4 = tuple(REAL4[:5])
MANY6 = tuple(REAL6[:5])

MISS_SYN = {"STAT_LRU_MISS_SYN": 1}
MISS = {"STAT_LRU_MISS_OTHER": 1}
HIT = {"STAT_LRU_HIT": 1}


def _hash_src_only_steps(lab: Lab) -> list[Step]:
    # Two client ports of one client: the same backend, the one hashing the address gives.
    steps = []
    for sport in (40000, 40001):
        flow = Flow(CLIENT4, VIP4, sport, 80)
        frame = P.tcp4(sport=sport)
        backend = ring_backend(flow, MANY4, src_only=True)(lab)
        steps.append(Step(frame, XDP_TX, enc(frame, backend, P.rss_src4(CLIENT4, sport))))
    return steps


def _two_ports_same_backend(lab: Lab) -> None:
    entries = [lab.lookup_conn(Flow(CLIENT4, VIP4, p, 80)) for p in (40000, 40001)]
    assert all(entries), "each client port has its own entry (the full 5-tuple)"
    idxs = {e.real_idx for e in entries if e}
    assert len(idxs) == 1, f"two ports of one client went to different backends: {idxs}"


UF4 = Flow(CLIENT4, VIP4, 40000, 80, "udp")
UF6 = Flow(CLIENT6, VIP6, 40000, 80, "udp")
FIN4 = P.tcp4(flags="FA")
FIN6 = P.tcp6(flags="FA")
UDP_TWO4 = vip_with(proto="udp", backends=(REAL4[0], REAL4[1]), ring=[1])
UDP_TWO6 = vip_with(vip=VIP6, proto="udp", backends=(REAL6[0], REAL6[1]), ring=[1])

VLAN_SYN4 = P.tcp4(vlan=42)
VLAN_SYN6 = P.tcp6(vlan=42)
DSCP4 = P.tcp4(tos=0xB9, ttl=17)
DSCP6 = P.tcp6(tc=0xB9, hlim=9, fl=0x12345)
DF4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4), flags="DF", ttl=33)
            / TCP(sport=40000, dport=80, flags="S"))
PADDED4 = SYN4 + b"\0" * (60 - len(SYN4))

PORT0_FRAME4 = P.tcp4(dport=8443)
PORT0_FRAME6 = P.tcp6(dport=8443)

FRAG_NEEDED4 = P.frag_needed4()
PTB6 = P.packet_too_big6()
FRAG_NEEDED4_UDP = P.frag_needed4(proto="udp", sport=80)

BIG4_DF = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4), flags="DF")
                / TCP(sport=40000, dport=80, flags="A") / Raw(b"x" * 1460))
BIG4_NODF = P.tcp4(flags="A", payload=b"x" * 1460)
BIG6 = P.tcp6(flags="A", payload=b"x" * 1440)
BIG4_VLAN = bytes(ether(7) / IP(src=str(CLIENT4), dst=str(VIP4), flags="DF")
                  / TCP(sport=40000, dport=80, flags="A") / Raw(b"x" * 1460))
FIT4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4), flags="DF")
             / TCP(sport=40000, dport=80, flags="A") / Raw(b"x" * 1440))
OVER4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4), flags="DF")
              / TCP(sport=40000, dport=80, flags="A") / Raw(b"x" * 1441))
SMALL_BIG4 = P.tcp4(flags="A", payload=b"x" * 200)

FRAG_MF4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4), flags="MF", frag=0)
                 / TCP(sport=40000, dport=80) / Raw(b"a" * 16))
FRAG_OFF4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4), frag=100, proto=6)
                  / Raw(b"a" * 32))
FRAG_NONVIP4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(NONVIP4), flags="MF")
                     / TCP(sport=40000, dport=80) / Raw(b"a" * 16))
OPTS4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4), options=[IPOption_RR()])
              / TCP(sport=40000, dport=80, flags="S"))
OPTS_NONVIP4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(NONVIP4), options=[IPOption_RR()])
                     / TCP(sport=40000, dport=80, flags="S"))
FRAG6 = bytes(ether() / IPv6(src=str(CLIENT6), dst=str(VIP6)) / IPv6ExtHdrFragment(m=1)
              / TCP(sport=40000, dport=80) / Raw(b"a" * 16))
FRAG_NONVIP6 = bytes(ether() / IPv6(src=str(CLIENT6), dst=str(NONVIP6))
                     / IPv6ExtHdrFragment(m=1) / TCP(sport=40000, dport=80))
HBH6 = bytes(ether() / IPv6(src=str(CLIENT6), dst=str(VIP6)) / IPv6ExtHdrHopByHop()
             / TCP(sport=40000, dport=80, flags="S"))
DSTOPT_NONVIP6 = bytes(ether() / IPv6(src=str(CLIENT6), dst=str(NONVIP6)) / IPv6ExtHdrDestOpt()
                       / TCP(sport=40000, dport=80, flags="S"))


FIN4 = P.tcp4(flags="FA")
FIN6 = P.tcp6(flags="FA")
ECHO_NONVIP4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(NONVIP4)) / ICMP(id=7, seq=3))
# 1460 bytes of IP: 14 + 1460 + 20 (IPIP) = 1494 fits max_frame 1514, with 60 more it would not.
FIT_TRAILER4 = P.tcp4(flags="A", payload=b"t" * 1420)


def _to_mac(frame: bytes, mac: str) -> bytes:
    """`frame` sent to Ethernet destination `mac`."""
    return bytes.fromhex(mac.replace(":", "")) + frame[6:]


def _version(frame: bytes, version: int) -> bytes:
    raw = bytearray(frame)
    raw[14] = (version << 4) | (raw[14] & 0x0F)
    return bytes(raw)


def _with_src(frame: bytes, src: IPAddress) -> bytes:
    """`frame` (Ethernet/IP/TCP) from another source address, checksums recomputed."""
    pkt = Ether(frame)
    ip = pkt[IP] if IP in pkt else pkt[IPv6]
    ip.src = str(src)
    if IP in pkt:
        del pkt[IP].chksum
    del pkt[TCP].chksum
    return bytes(pkt)


def _truncated_ip_len(frame: bytes, claimed: int) -> bytes:
    """`frame` with its IPv4 total length rewritten (checksum left as is)."""
    raw = bytearray(frame)
    raw[16:18] = claimed.to_bytes(2, "big")
    return bytes(raw)


def _v6_plen(frame: bytes, claimed: int) -> bytes:
    raw = bytearray(frame)
    raw[18:20] = claimed.to_bytes(2, "big")
    return bytes(raw)


def _ihl(frame: bytes, ihl: int) -> bytes:
    raw = bytearray(frame)
    raw[14] = 0x40 | ihl
    return bytes(raw)


# --- the connection table's sets (docs/conn-table.md) ----------------------------------------
#
# Rows about one set of CONN_WAYS ways. Flows 1-8 share the set of flow 0 (F4 or F6), found
# with lb.dataplane.flowhash (Lab.set_mates); "udp" is a UDP flow of the same set. Flows 0-7 are
# seeded from Python in that order, flow 8 is new. Seeded entries name backend 2, the ring
# backend 1.

Which = int | str
SEEDED, RING = 2, 1
# Seconds since flows 0-7 were last seen: flow 3 is the least recently seen, then flow 5.
AGES = dict(enumerate((50, 40, 30, 80, 20, 70, 10, 60)))


def set_flow(lab: Lab, base: Flow, which: Which) -> Flow:
    """Flow `which` of `base`'s set (see above)."""
    if which == "udp":
        return lab.set_mates(base, 1, "udp")[0]
    assert isinstance(which, int)
    return (base, *lab.set_mates(base, CONN_WAYS))[which]


def fill_set(base: Flow, ages: dict[Which, float]) -> Callable[[Lab], None]:
    """Seed these flows of `base`'s set, in order, last seen `age` seconds ago."""

    def seed(lab: Lab) -> None:
        for which, age in ages.items():
            lab.conn(set_flow(lab, base, which), SEEDED, age)

    return seed


def drop_from_set(base: Flow, which: Which) -> Callable[[Lab], None]:
    """Delete flow `which` of `base`'s set from Python."""
    return lambda lab: without_conn(set_flow(lab, base, which))(lab)


def flow_step(flow: Flow, flags: str, backend_idx: int) -> Step:
    """A TCP packet of `flow` (SYN: empty, else with data) sent to backend 1 or 2 of TWO4/6."""
    payload = b"" if "S" in flags else b"hello"
    if flow.src.version == 4:
        frame = P.tcp4(src=flow.src, dst=flow.dst, sport=flow.sport, dport=flow.dport,
                       flags=flags, payload=payload)
        return Step(frame, XDP_TX, enc(frame, REAL4[backend_idx - 1],
                                       P.rss_src4(flow.src, flow.sport)))
    frame = P.tcp6(src=flow.src, dst=flow.dst, sport=flow.sport, dport=flow.dport, flags=flags,
                   payload=payload)
    return Step(frame, XDP_TX, enc(frame, REAL6[backend_idx - 1],
                                   P.rss_src6(flow.src, flow.sport)))


def set_steps(base: Flow, *sends: tuple[Which, str, int]) -> Callable[[Lab], list[Step]]:
    """Packets (flow, TCP flags, expected backend) of flows of `base`'s set, in order."""
    return lambda lab: [flow_step(set_flow(lab, base, w), flags, idx) for w, flags, idx in sends]


def set_holds(base: Flow, expect: dict[Which, int | None]) -> Callable[[Lab], None]:
    """Each listed flow of the set maps to this backend (None: evicted), nothing else is
    in the table."""

    def check(lab: Lab) -> None:
        for which, idx in expect.items():
            got = lab.lookup_conn(set_flow(lab, base, which))
            if idx is None:
                assert got is None, f"flow {which} of the set was not evicted"
            else:
                assert got is not None, f"flow {which} of the set was evicted"
                assert got.real_idx == idx, (
                    f"flow {which} of the set points at backend {got.real_idx}, not {idx}")
        conn_count_is(sum(idx is not None for idx in expect.values()))(lab)

    return check


def one_evicted(base: Flow) -> Callable[[Lab], None]:
    """Flow 8 of `base`'s set is in, and exactly one of flows 0-7 was evicted."""

    def check(lab: Lab) -> None:
        assert lab.lookup_conn(set_flow(lab, base, 8)) is not None, "the 9th flow is not in"
        gone = [i for i in range(CONN_WAYS) if lab.lookup_conn(set_flow(lab, base, i)) is None]
        assert len(gone) == 1, f"flows {gone} of the set were evicted, expected one"
        conn_count_is(CONN_WAYS)(lab)

    return check


def kept(*which: Which) -> dict[Which, int | None]:
    """These flows keep their seeded entries."""
    return dict.fromkeys(which, SEEDED)


def set_cases(family: str, base: Flow, vip: Callable[[Lab], None]) -> list[Case]:
    """The set rows of one address family."""
    return [
        Case(f"{family} full set: a 9th new flow evicts the least recently seen",
             seeds(vip, fill_set(base, AGES)), set_steps(base, (8, "S", RING)),
             {"STAT_LRU_MISS_SYN": 1, "STAT_CONN_EVICT": 1},
             set_holds(base, {3: None, 8: RING, **kept(0, 1, 2, 4, 5, 6, 7)})),
        Case(f"{family} full set: a hit makes its flow recent, the next oldest is evicted",
             seeds(vip, fill_set(base, AGES)), set_steps(base, (3, "A", SEEDED), (8, "S", RING)),
             {"STAT_LRU_HIT": 1, "STAT_LRU_MISS_SYN": 1, "STAT_CONN_EVICT": 1},
             set_holds(base, {5: None, 8: RING, **kept(0, 1, 2, 3, 4, 6, 7)})),
        Case(f"{family} full set: an expired UDP entry is reused before a live flow is evicted",
             seeds(vip, fill_set(base, {0: 100, 1: 110, "udp": 31, 2: 120, 3: 130, 4: 140,
                                        5: 150, 6: 160})),
             set_steps(base, (8, "S", RING)), MISS_SYN,
             set_holds(base, {"udp": None, 8: RING, **kept(0, 1, 2, 3, 4, 5, 6)})),
        Case(f"{family} full set: a SYN of a flow in it rewrites its own way, nothing evicted",
             seeds(vip, fill_set(base, AGES)), set_steps(base, (3, "S", RING)), MISS_SYN,
             set_holds(base, {3: RING, **kept(0, 1, 2, 4, 5, 6, 7)})),
        Case(f"{family} set filled by 8 SYNs: a 9th evicts one of them",
             vip, set_steps(base, *((i, "S", RING) for i in range(CONN_WAYS + 1))),
             {"STAT_LRU_MISS_SYN": CONN_WAYS + 1, "STAT_CONN_EVICT": 1}, one_evicted(base)),
        Case(f"{family} full set: a way freed from Python is taken before any eviction",
             seeds(vip, fill_set(base, AGES), drop_from_set(base, 5)),
             set_steps(base, (8, "S", RING)), MISS_SYN,
             set_holds(base, {5: None, 8: RING, **kept(0, 1, 2, 3, 4, 6, 7)})),
    ]


BROADCAST = "ff:ff:ff:ff:ff:ff"
OTHER_HOST_MAC = "02:00:00:00:00:99"
NOT_OURS = {"STAT_PASS_NOT_OURS": 1}

MAC_CASES = [
    Case("broadcast frame to a VIP is not balanced (passed)", V4,
         passed(_to_mac(SYN4, BROADCAST)), NOT_OURS, table_empty),
    Case("IPv4 multicast frame to a VIP is not balanced", V4,
         passed(_to_mac(SYN4, "01:00:5e:00:00:01")), NOT_OURS),
    Case("IPv6 multicast frame to a VIP is not balanced", V6,
         passed(_to_mac(SYN6, "33:33:00:00:00:01")), NOT_OURS),
    Case("broadcast echo request to a VIP gets no reply", V4,
         passed(_to_mac(ECHO4, BROADCAST)), NOT_OURS),
    Case("another host's unicast frame (promiscuous NIC) is not balanced",
         seeds(V4, with_config(lb_mac=P.LB_MAC)),
         passed(_to_mac(SYN4, OTHER_HOST_MAC)), NOT_OURS, table_empty),
    Case("a frame to the interface's own MAC is balanced, sent from that MAC",
         seeds(V4, with_config(lb_mac=P.LB_MAC)),
         tx(SYN4, enc(SYN4, REAL4[0], RSS4)), MISS_SYN),
    Case("an echo reply leaves from the interface's own MAC",
         seeds(V4, with_config(lb_mac=P.LB_MAC)),
         tx(ECHO4, P.echo_reply(ECHO4)), {"STAT_ICMP_ECHO": 1}),
]

# Sources that must never get an ICMP error (RFC 1122 3.2.2, RFC 4443 2.4(e)).
BAD_ICMP_SOURCES4 = ("224.0.0.5", "255.255.255.255", "0.0.0.0", "127.0.0.1", "240.0.0.1")
BAD_ICMP_SOURCES6 = ("ff02::1", "::", "::1")
ICMP_SOURCE_CASES = [
    *(Case(f"IPv4 too big from {src}: no frag-needed, dropped", V4,
           dropped(_with_src(BIG4_DF, ipaddress.ip_address(src))),
           {"STAT_ICMP_SRC_BAD": 1, **MISS}) for src in BAD_ICMP_SOURCES4),
    *(Case(f"IPv6 too big from {src}: no packet-too-big, dropped", V6,
           dropped(_with_src(BIG6, ipaddress.ip_address(src))),
           {"STAT_ICMP_SRC_BAD": 1, **MISS}) for src in BAD_ICMP_SOURCES6),
]


SET_CASES = [
    *set_cases("IPv4", F4, TWO4),
    *set_cases("IPv6", F6, TWO6),
    Case("IPv4 full set: a UDP entry within its timeout is live, evicted as the least recent",
         seeds(TWO4, fill_set(F4, {0: 1, 1: 2, "udp": 29, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7})),
         set_steps(F4, (8, "S", RING)), {"STAT_LRU_MISS_SYN": 1, "STAT_CONN_EVICT": 1},
         set_holds(F4, {"udp": None, 8: RING, **kept(0, 1, 2, 3, 4, 5, 6)})),
    Case("IPv4 set with a free way: taken before an expired UDP entry",
         seeds(TWO4, fill_set(F4, {0: 10, "udp": 31, 1: 10, 2: 10, 3: 10, 4: 10, 5: 10})),
         set_steps(F4, (8, "S", RING)), MISS_SYN,
         set_holds(F4, {8: RING, **kept("udp", 0, 1, 2, 3, 4, 5)})),
    Case("IPv4 packets of a full set's flows all hit their own ways",
         seeds(TWO4, fill_set(F4, AGES)),
         set_steps(F4, *((i, "A", SEEDED) for i in range(CONN_WAYS))),
         {"STAT_LRU_HIT": CONN_WAYS}, set_holds(F4, kept(*range(CONN_WAYS)))),
]


CASES: list[Case] = [
    # --- not ours: passed untouched ------------------------------------------------------
    Case("ARP frame is passed", V4,
         passed(bytes(ether() / ARP(psrc=str(CLIENT4), pdst=str(VIP4)))),
         {"STAT_PASS_NOT_IP": 1}),
    Case("VLAN-tagged ARP is passed", V4,
         passed(bytes(ether(5) / ARP(psrc=str(CLIENT4), pdst=str(VIP4)))),
         {"STAT_PASS_NOT_IP": 1}),
    Case("Ethernet header alone, IPv4 EtherType, is passed (it names no destination)", V4,
         passed(SYN4[:14]), {"STAT_PASS_NOT_IP": 1}),
    Case("Ethernet header alone, ARP EtherType, is passed", V4,
         passed(bytes(ether() / ARP())[:14]), {"STAT_PASS_NOT_IP": 1}),
    Case("truncated 802.1Q tag is passed", V4, passed(VLAN_SYN4[:16]),
         {"STAT_PASS_NOT_IP": 1}),
    Case("IPv4 non-VIP TCP is passed", V4, passed(P.tcp4(dst=NONVIP4)),
         {"STAT_PASS_NON_VIP": 1}),
    Case("IPv6 non-VIP TCP is passed", V6, passed(P.tcp6(dst=NONVIP6)),
         {"STAT_PASS_NON_VIP": 1}),
    Case("IPv4 VIP address, other port is passed", V4, passed(P.tcp4(dport=81)),
         {"STAT_PASS_NON_VIP": 1}),
    Case("IPv4 VIP address and port, other protocol is passed", V4, passed(P.udp4(dport=80)),
         {"STAT_PASS_NON_VIP": 1}),
    Case("IPv6 VIP address, other port is passed", V6, passed(P.tcp6(dport=81)),
         {"STAT_PASS_NON_VIP": 1}),
    Case("IPv4 GRE to a VIP address is passed", V4,
         passed(bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4), proto=47) / Raw(b"g" * 8))),
         {"STAT_PASS_NOT_IP": 1}),
    Case("IPv6 no-next-header to a VIP address is passed", V6,
         passed(bytes(ether() / IPv6(src=str(CLIENT6), dst=str(VIP6), nh=59))),
         {"STAT_PASS_NOT_IP": 1}),
    Case("IPv4 VLAN non-VIP is passed", V4, passed(P.tcp4(dst=NONVIP4, vlan=9)),
         {"STAT_PASS_NON_VIP": 1}),

    # --- IPv4 forwarding ---------------------------------------------------------------------
    Case("IPv4 TCP SYN -> IPIP to the backend, RSS source, inserted", V4,
         tx(SYN4, enc(SYN4, REAL4[0], RSS4)), MISS_SYN,
         all_of(conn_is(F4, 1, fresh=True, closing=False, udp=False, vip_num=0),
                conn_count_is(1), stats_are(vip=(1, ip_len(SYN4), 1),
                                          reals={1: (1, ip_len(SYN4) + 20)}))),
    Case("IPv4 TCP SYN with VLAN keeps the tag", V4,
         tx(VLAN_SYN4, enc(VLAN_SYN4, REAL4[0], RSS4)), MISS_SYN),
    Case("IPv4 UDP -> IPIP, inserted", vip_with(proto="udp"),
         tx(UDP4, enc(UDP4, REAL4[0], RSS4)), MISS, conn_is(UF4, 1, fresh=True, udp=True)),
    Case("IPv4 insert records the VIP number", vip_with(proto="udp", num=5),
         tx(UDP4, enc(UDP4, REAL4[0], RSS4)), MISS, conn_is(UF4, 1, udp=True, vip_num=5)),
    Case("IPv4 outer source is the LB with F_SRC_LB", vip_with(flags=F_SRC_LB),
         tx(SYN4, enc(SYN4, REAL4[0], LB_SRC4)), MISS_SYN),
    Case("IPv4 GUE, RSS source", vip_with(flags=F_ENCAP_GUE),
         tx(SYN4, enc(SYN4, REAL4[0], RSS4, P.gue_sport(F4.hash()))), MISS_SYN,
         stats_are(reals={1: (1, ip_len(SYN4) + 28)})),
    Case("IPv4 GUE, LB source", vip_with(flags=F_ENCAP_GUE | F_SRC_LB),
         tx(SYN4, enc(SYN4, REAL4[0], LB_SRC4, P.gue_sport(F4.hash()))), MISS_SYN),
    Case("IPv4 VIP, IPv6 backend: IPv4-in-IPv6, RSS source", vip_with(backends=(REAL6[0],)),
         tx(SYN4, enc(SYN4, REAL6[0], RSS46)), MISS_SYN,
         stats_are(reals={1: (1, ip_len(SYN4) + 40)})),
    Case("IPv4 VIP, IPv6 backend: LB source", vip_with(backends=(REAL6[0],), flags=F_SRC_LB),
         tx(SYN4, enc(SYN4, REAL6[0], LB_SRC6)), MISS_SYN),
    Case("IPv4 VIP, IPv6 backend: GUE over IPv6",
         vip_with(backends=(REAL6[0],), flags=F_ENCAP_GUE),
         tx(SYN4, enc(SYN4, REAL6[0], RSS46, P.gue_sport(F4.hash()))), MISS_SYN,
         stats_are(reals={1: (1, ip_len(SYN4) + 48)})),
    Case("IPv4 DSCP/ECN and TTL copied to the outer header", V4,
         tx(DSCP4, enc(DSCP4, REAL4[0], RSS4)), MISS_SYN),
    Case("IPv4 DF copied to the outer header", V4,
         tx(DF4, enc(DF4, REAL4[0], RSS4)), MISS_SYN),
    Case("IPv4 padding of a minimum-size frame stays behind the outer packet", V4,
         tx(PADDED4, enc(SYN4, REAL4[0], RSS4) + PADDED4[len(SYN4):]), MISS_SYN),
    Case("IPv4 bytes after the IP packet of a 65-byte frame are trimmed", V4,
         tx(SYN4 + b"\xee" * (65 - len(SYN4)), enc(SYN4, REAL4[0], RSS4)), MISS_SYN),
    Case("IPv4 bytes after the IP packet are trimmed before encapsulating", V4,
         tx(SYN4 + b"\xee" * 200, enc(SYN4, REAL4[0], RSS4)), MISS_SYN),
    Case("IPv4 trailer does not count toward max_frame: the trimmed frame fits", V4,
         tx(FIT_TRAILER4 + b"\xee" * 60, enc(FIT_TRAILER4, REAL4[0], RSS4)), MISS),
    Case("IPv6 bytes after the IP packet are trimmed before encapsulating", V6,
         tx(SYN6 + b"\xee" * 100, enc(SYN6, REAL6[0], RSS6)), MISS_SYN),
    Case("IPv4 port-0 VIP takes every port", vip_with(port=0),
         tx(PORT0_FRAME4, enc(PORT0_FRAME4, REAL4[0], P.rss_src4(CLIENT4, 40000))), MISS_SYN),
    Case("IPv4 exact VIP wins over the port-0 VIP",
         seeds(vip_with(port=0, backends=(REAL4[0], REAL4[1]), ring=[1]),
               vip_with(port=80, backends=(REAL4[0], REAL4[1]), ring=[2], num=1)),
         tx(SYN4, enc(SYN4, REAL4[1], RSS4)), MISS_SYN),
    Case("IPv4 ring slot follows the documented flow hash", vip_with(backends=MANY4),
         tx(SYN4, hashed_enc(SYN4, F4, MANY4, RSS4)), MISS_SYN),
    Case("IPv4 UDP ring slot follows the documented flow hash",
         vip_with(proto="udp", backends=MANY4),
         tx(UDP4, hashed_enc(UDP4, UF4, MANY4, RSS4)), MISS),
    Case("IPv4 entry inserted from Python: the table hit wins over the ring",
         seeds(TWO4, with_conn(F4, 2)),
         tx(ACK4, enc(ACK4, REAL4[1], RSS4)), HIT,
         stats_are(vip=(1, ip_len(ACK4), 0), reals={2: (1, ip_len(ACK4) + 20), 1: (0, 0)})),
    Case("IPv4 entry deleted from Python: the next packet misses and takes the ring",
         seeds(TWO4, with_conn(F4, 2), without_conn(F4)),
         tx(ACK4, enc(ACK4, REAL4[0], RSS4)), MISS, all_of(conn_is(F4, 1), conn_count_is(1))),
    Case("IPv4 ACK hit refreshes the entry's stamp", seeds(TWO4, with_conn(F4, 2, age_s=10)),
         tx(ACK4, enc(ACK4, REAL4[1], RSS4)), HIT, conn_is(F4, 2, fresh=True, closing=False)),
    Case("IPv4 TCP SYN ignores the table and rewrites the flow's entry, no second one",
         seeds(TWO4, with_conn(F4, 2, age_s=10)),
         tx(SYN4, enc(SYN4, REAL4[0], RSS4)), MISS_SYN,
         all_of(conn_is(F4, 1, fresh=True), conn_count_is(1))),
    Case("IPv4 client FIN marks the entry closing, which still steers the flow",
         seeds(TWO4, with_conn(F4, 2)),
         tx(FIN4, enc(FIN4, REAL4[1], RSS4)), HIT, conn_is(F4, 2, closing=True)),
    Case("IPv4 closing entry steers the last ACKs and stays closing",
         seeds(TWO4, with_conn(F4, 2, age_s=10, closing=True)),
         tx(ACK4, enc(ACK4, REAL4[1], RSS4)), HIT, conn_is(F4, 2, fresh=True, closing=True)),
    Case("IPv4 TCP SYN reopens a closing entry",
         seeds(TWO4, with_conn(F4, 2, closing=True)),
         tx(SYN4, enc(SYN4, REAL4[0], RSS4)), MISS_SYN, conn_is(F4, 1, closing=False)),
    Case("IPv4 table entries are per protocol: a TCP entry does not steer UDP",
         seeds(UDP_TWO4, with_conn(F4, 2)),
         tx(UDP4, enc(UDP4, REAL4[0], RSS4)), MISS,
         all_of(conn_is(UF4, 1, udp=True), conn_is(F4, 2, udp=False), conn_count_is(2))),
    Case("IPv4 ACK miss takes the ring and inserts", TWO4,
         tx(ACK4, enc(ACK4, REAL4[0], RSS4)), MISS, conn_is(F4, 1)),
    Case("IPv4 TCP RST miss is forwarded but not inserted", TWO4,
         tx(P.tcp4(flags="R"), enc(P.tcp4(flags="R"), REAL4[0], RSS4)), MISS, table_empty),
    Case("IPv4 TCP RST hit follows the table and marks the entry closing",
         seeds(TWO4, with_conn(F4, 2)),
         tx(P.tcp4(flags="RA"), enc(P.tcp4(flags="RA"), REAL4[1], RSS4)), HIT,
         conn_is(F4, 2, closing=True)),
    Case("IPv4 UDP entry hit refreshes its stamp",
         seeds(UDP_TWO4, with_conn(UF4, 2, age_s=10)),
         tx(UDP4, enc(UDP4, REAL4[1], RSS4)), HIT, conn_is(UF4, 2, fresh=True)),
    Case("IPv4 UDP entry idle past 30 s is re-picked from the ring, same entry rewritten",
         seeds(UDP_TWO4, with_conn(UF4, 2, age_s=31)),
         tx(UDP4, enc(UDP4, REAL4[0], RSS4)), {"STAT_LRU_EXPIRED": 1, **MISS},
         all_of(conn_is(UF4, 1, fresh=True), conn_count_is(1))),
    Case("IPv4 UDP entry idle just under 30 s still steers",
         seeds(UDP_TWO4, with_conn(UF4, 2, age_s=29)),
         tx(UDP4, enc(UDP4, REAL4[1], RSS4)), HIT, conn_is(UF4, 2, fresh=True)),
    Case("IPv4 UDP timeout comes from lb_cfg",
         seeds(UDP_TWO4, with_config(udp_timeout_s=1.0), with_conn(UF4, 2, age_s=2)),
         tx(UDP4, enc(UDP4, REAL4[0], RSS4)), {"STAT_LRU_EXPIRED": 1, **MISS}),
    Case("IPv4 TCP entries never expire with tcp_timeout_s 0",
         seeds(TWO4, with_config(tcp_timeout_s=0), with_conn(F4, 2, age_s=100000)),
         tx(ACK4, enc(ACK4, REAL4[1], RSS4)), HIT),
    Case("IPv4 TCP entry idle past tcp_timeout_s (900 s) is re-picked from the ring",
         seeds(TWO4, with_conn(F4, 2, age_s=1000)),
         tx(ACK4, enc(ACK4, REAL4[0], RSS4)), {"STAT_LRU_EXPIRED": 1, **MISS},
         conn_is(F4, 1, fresh=True)),
    Case("IPv4 TCP entry idle just under tcp_timeout_s still steers",
         seeds(TWO4, with_conn(F4, 2, age_s=880)),
         tx(ACK4, enc(ACK4, REAL4[1], RSS4)), HIT, conn_is(F4, 2, fresh=True)),
    Case("IPv4 FIN of an unknown flow is forwarded but opens no entry", V4,
         tx(FIN4, enc(FIN4, REAL4[0], RSS4)), MISS, conn_is(F4, None)),
    Case("IPv6 FIN of an unknown flow is forwarded but opens no entry", V6,
         tx(FIN6, enc(FIN6, REAL6[0], RSS6)), MISS, conn_is(F6, None)),
    Case("IPv4 removed backend in the table: re-picked from the ring, entry overwritten",
         seeds(TWO4, with_conn(F4, 2), lambda lab: lab.remove_real(2)),
         tx(ACK4, enc(ACK4, REAL4[0], RSS4)), {"STAT_LRU_REAL_GONE": 1, **MISS},
         conn_is(F4, 1)),
    Case("IPv4 draining backend (in reals, out of the ring) keeps its flows",
         seeds(TWO4, with_conn(F4, 2)),
         tx(ACK4, enc(ACK4, REAL4[1], RSS4)), HIT, conn_is(F4, 2)),
    Case("IPv4 hash-src-only: two client ports, one backend",
         vip_with(flags=F_HASH_SRC_ONLY, backends=MANY4),
         _hash_src_only_steps, {"STAT_LRU_MISS_SYN": 2}, _two_ports_same_backend),
    Case("IPv4 hash-src-only: the table is keyed by the full 5-tuple",
         seeds(vip_with(flags=F_HASH_SRC_ONLY, backends=(REAL4[0], REAL4[1]), ring=[1]),
               with_conn(Flow(CLIENT4, VIP4, 40001, 80), 2)),
         tx(ACK4, enc(ACK4, REAL4[0], RSS4)), MISS,
         all_of(conn_is(F4, 1), conn_is(Flow(CLIENT4, VIP4, 40001, 80), 2))),
    Case("IPv4 LRU bypass ignores the table and does not touch it",
         seeds(vip_with(flags=F_LRU_BYPASS, backends=(REAL4[0], REAL4[1]), ring=[1]),
               with_conn(F4, 2, age_s=10)),
         tx(ACK4, enc(ACK4, REAL4[0], RSS4)), {},
         all_of(conn_is(F4, 2), conn_untouched(F4, 10), conn_count_is(1),
                stats_are(vip=(1, ip_len(ACK4), 0)))),
    Case("IPv4 LRU bypass: a SYN counts as a new connection, not inserted",
         vip_with(flags=F_LRU_BYPASS),
         tx(SYN4, enc(SYN4, REAL4[0], RSS4)), {},
         all_of(table_empty, stats_are(vip=(1, ip_len(SYN4), 1)))),
    Case("IPv4 VIP with an empty ring slot: dropped, no backend", vip_with(ring=[0]),
         dropped(SYN4), {"STAT_NO_BACKEND": 1},
         all_of(table_empty, stats_are(vip=(1, ip_len(SYN4), 0)))),
    Case("IPv4 ring slot naming an unprogrammed backend: dropped",
         seeds(vip_with(ring=[3])), dropped(SYN4), {"STAT_NO_BACKEND": 1}),
    Case("IPv4 second VIP uses its own ring",
         seeds(V4, vip_with(vip=VIP4B, backends=(REAL4[0], REAL4[1]), ring=[2], num=3)),
         tx(P.tcp4(dst=VIP4B), enc(P.tcp4(dst=VIP4B), REAL4[1], RSS4)), MISS_SYN,
         stats_are(vip=(1, ip_len(SYN4), 1), num=3)),

    # --- IPv6 forwarding ---------------------------------------------------------------------
    Case("IPv6 TCP SYN -> IPv6-in-IPv6, RSS source, inserted", V6,
         tx(SYN6, enc(SYN6, REAL6[0], RSS6)), MISS_SYN,
         all_of(conn_is(F6, 1, fresh=True, closing=False, udp=False, vip_num=0),
                conn_count_is(1), stats_are(vip=(1, ip_len(SYN6), 1),
                                          reals={1: (1, ip_len(SYN6) + 40)}))),
    Case("IPv6 TCP SYN with VLAN keeps the tag", V6,
         tx(VLAN_SYN6, enc(VLAN_SYN6, REAL6[0], RSS6)), MISS_SYN),
    Case("IPv6 UDP -> IPv6-in-IPv6", vip_with(vip=VIP6, proto="udp", backends=(REAL6[0],)),
         tx(UDP6, enc(UDP6, REAL6[0], RSS6)), MISS, conn_is(UF6, 1, fresh=True, udp=True)),
    Case("IPv6 insert records the VIP number",
         vip_with(vip=VIP6, proto="udp", backends=(REAL6[0],), num=7),
         tx(UDP6, enc(UDP6, REAL6[0], RSS6)), MISS, conn_is(UF6, 1, udp=True, vip_num=7)),
    Case("IPv6 outer source is the LB with F_SRC_LB",
         vip_with(vip=VIP6, backends=(REAL6[0],), flags=F_SRC_LB),
         tx(SYN6, enc(SYN6, REAL6[0], LB_SRC6)), MISS_SYN),
    Case("IPv6 GUE, RSS source", vip_with(vip=VIP6, backends=(REAL6[0],), flags=F_ENCAP_GUE),
         tx(SYN6, enc(SYN6, REAL6[0], RSS6, P.gue_sport(F6.hash()))), MISS_SYN),
    Case("IPv6 GUE, LB source",
         vip_with(vip=VIP6, backends=(REAL6[0],), flags=F_ENCAP_GUE | F_SRC_LB),
         tx(SYN6, enc(SYN6, REAL6[0], LB_SRC6, P.gue_sport(F6.hash()))), MISS_SYN),
    Case("IPv6 traffic class and hop limit copied, flow label not", V6,
         tx(DSCP6, enc(DSCP6, REAL6[0], RSS6)), MISS_SYN),
    Case("IPv6 port-0 VIP takes every port",
         vip_with(vip=VIP6, port=0, backends=(REAL6[0],)),
         tx(PORT0_FRAME6, enc(PORT0_FRAME6, REAL6[0], RSS6)), MISS_SYN),
    Case("IPv6 ring slot follows the documented flow hash",
         vip_with(vip=VIP6, backends=MANY6),
         tx(SYN6, hashed_enc(SYN6, F6, MANY6, RSS6)), MISS_SYN),
    Case("IPv6 GUE source port follows the flow hash",
         vip_with(vip=VIP6, backends=MANY6, flags=F_ENCAP_GUE),
         tx(SYN6, hashed_enc(SYN6, F6, MANY6, RSS6, gue=True)), MISS_SYN),
    Case("IPv6 entry inserted from Python: the table hit wins over the ring",
         seeds(TWO6, with_conn(F6, 2)),
         tx(ACK6, enc(ACK6, REAL6[1], RSS6)), HIT, conn_is(F6, 2, fresh=True)),
    Case("IPv6 entry deleted from Python: the next packet misses and takes the ring",
         seeds(TWO6, with_conn(F6, 2), without_conn(F6)),
         tx(ACK6, enc(ACK6, REAL6[0], RSS6)), MISS, all_of(conn_is(F6, 1), conn_count_is(1))),
    Case("IPv6 TCP SYN ignores the table and rewrites the flow's entry, no second one",
         seeds(TWO6, with_conn(F6, 2, age_s=10)),
         tx(SYN6, enc(SYN6, REAL6[0], RSS6)), MISS_SYN,
         all_of(conn_is(F6, 1, fresh=True), conn_count_is(1))),
    Case("IPv6 client FIN marks the entry closing, which still steers the flow",
         seeds(TWO6, with_conn(F6, 2)),
         tx(FIN6, enc(FIN6, REAL6[1], RSS6)), HIT, conn_is(F6, 2, closing=True)),
    Case("IPv6 TCP RST miss is not inserted", TWO6,
         tx(P.tcp6(flags="R"), enc(P.tcp6(flags="R"), REAL6[0], RSS6)), MISS, table_empty),
    Case("IPv6 UDP entry idle past the timeout is re-picked",
         seeds(UDP_TWO6, with_conn(UF6, 2, age_s=31)),
         tx(UDP6, enc(UDP6, REAL6[0], RSS6)), {"STAT_LRU_EXPIRED": 1, **MISS},
         all_of(conn_is(UF6, 1, fresh=True), conn_count_is(1))),
    Case("IPv6 removed backend in the table: re-picked from the ring",
         seeds(TWO6, with_conn(F6, 2), lambda lab: lab.remove_real(2)),
         tx(ACK6, enc(ACK6, REAL6[0], RSS6)), {"STAT_LRU_REAL_GONE": 1, **MISS},
         conn_is(F6, 1)),
    Case("IPv6 hash-src-only hashes the address alone",
         vip_with(vip=VIP6, flags=F_HASH_SRC_ONLY, backends=MANY6),
         tx(SYN6, hashed_enc(SYN6, F6, MANY6, RSS6, src_only=True)), MISS_SYN),
    Case("IPv6 LRU bypass ignores the table",
         seeds(vip_with(vip=VIP6, flags=F_LRU_BYPASS, backends=(REAL6[0], REAL6[1]), ring=[1]),
               with_conn(F6, 2, age_s=10)),
         tx(ACK6, enc(ACK6, REAL6[0], RSS6)), {},
         all_of(conn_is(F6, 2), conn_untouched(F6, 10))),
    Case("IPv6 VIP with an empty ring slot: dropped",
         vip_with(vip=VIP6, backends=(REAL6[0],), ring=[0]),
         dropped(SYN6), {"STAT_NO_BACKEND": 1}),
    Case("IPv6 VIP with an IPv4 backend: dropped, encap failure",
         vip_with(vip=VIP6, backends=(REAL4[0],)),
         dropped(SYN6), {"STAT_ENCAP_FAIL": 1, **MISS_SYN}),

    # --- ICMP echo ---------------------------------------------------------------------------
    Case("ICMP echo to an IPv4 VIP address is answered", V4,
         tx(ECHO4, P.echo_reply(ECHO4)), {"STAT_ICMP_ECHO": 1}),
    Case("ICMP echo to an IPv4 VIP address with VLAN is answered", V4,
         tx(bytes(ether(11) / IP(src=str(CLIENT4), dst=str(VIP4)) / ICMP(id=1, seq=9)),
            P.echo_reply(bytes(ether(11) / IP(src=str(CLIENT4), dst=str(VIP4))
                               / ICMP(id=1, seq=9)))),
         {"STAT_ICMP_ECHO": 1}),
    Case("ICMP echo to a non-VIP address is passed", V4,
         passed(bytes(ether() / IP(src=str(CLIENT4), dst=str(NONVIP4)) / ICMP(id=7))),
         {"STAT_PASS_NON_VIP": 1}),
    Case("ICMPv6 echo to an IPv6 VIP address is answered", V6,
         tx(ECHO6, P.echo_reply(ECHO6)), {"STAT_ICMP_ECHO": 1}),
    Case("ICMPv6 echo to a non-VIP address is passed", V6,
         passed(bytes(ether() / IPv6(src=str(CLIENT6), dst=str(NONVIP6))
                      / ICMPv6EchoRequest(id=7))),
         {"STAT_PASS_NON_VIP": 1}),
    Case("ICMP echo reply to a VIP address is passed", V4,
         passed(bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4)) / ICMP(type=0, id=7))),
         {"STAT_PASS_ICMP": 1}),
    Case("ICMPv6 neighbour solicitation is passed", V6,
         passed(bytes(ether() / IPv6(src=str(CLIENT6), dst="ff02::1:ff00:10")
                      / ICMPv6ND_NS(tgt=str(VIP6)))),
         {"STAT_PASS_ICMP": 1}),
    Case("ICMPv6 echo reply to a VIP address is passed", V6,
         passed(bytes(ether() / IPv6(src=str(CLIENT6), dst=str(VIP6)) / ICMPv6EchoReply())),
         {"STAT_PASS_ICMP": 1}),

    # --- ICMP errors along their flow ----------------------------------------------------------
    Case("ICMP frag-needed for a VIP flow goes to the flow's table backend, entry untouched",
         seeds(TWO4, with_conn(F4, 2, age_s=10)),
         tx(FRAG_NEEDED4, enc(FRAG_NEEDED4, REAL4[1], RSS4)), {"STAT_ICMP_FWD": 1},
         all_of(stats_are(vip=(1, ip_len(FRAG_NEEDED4), 0)), conn_untouched(F4, 10),
                conn_is(F4, 2, closing=False))),
    Case("ICMP frag-needed without a table entry hashes the reversed flow",
         vip_with(backends=MANY4),
         tx(FRAG_NEEDED4, hashed_enc(FRAG_NEEDED4, F4, MANY4, RSS4)), {"STAT_ICMP_FWD": 1},
         table_empty),
    Case("ICMP frag-needed for a UDP VIP flow, entry untouched",
         seeds(UDP_TWO4, with_conn(UF4, 2, age_s=10)),
         tx(FRAG_NEEDED4_UDP, enc(FRAG_NEEDED4_UDP, REAL4[1], RSS4)), {"STAT_ICMP_FWD": 1},
         conn_untouched(UF4, 10)),
    Case("ICMP frag-needed for an expired UDP entry takes the ring, entry left as it was",
         seeds(UDP_TWO4, with_conn(UF4, 2, age_s=31)),
         tx(FRAG_NEEDED4_UDP, enc(FRAG_NEEDED4_UDP, REAL4[0], RSS4)),
         {"STAT_ICMP_FWD": 1, "STAT_LRU_EXPIRED": 1},
         all_of(conn_is(UF4, 2), conn_untouched(UF4, 31), conn_count_is(1))),
    Case("ICMP frag-needed for a GUE VIP is sent like the flow",
         vip_with(backends=MANY4, flags=F_ENCAP_GUE),
         tx(FRAG_NEEDED4, hashed_enc(FRAG_NEEDED4, F4, MANY4, RSS4, gue=True)),
         {"STAT_ICMP_FWD": 1}),
    Case("ICMP frag-needed for a port-0 VIP flow", vip_with(port=0),
         tx(FRAG_NEEDED4, enc(FRAG_NEEDED4, REAL4[0], RSS4)), {"STAT_ICMP_FWD": 1}),
    Case("ICMP frag-needed for a non-VIP flow is passed", V4,
         passed(P.frag_needed4(quoted_src=NONVIP4)), {"STAT_PASS_NON_VIP": 1}),
    Case("ICMP port-unreachable about a VIP flow is passed", V4,
         passed(P.frag_needed4(code=3)), {"STAT_PASS_ICMP": 1}),
    Case("ICMP frag-needed quoting an ICMP packet is passed", V4,
         passed(bytes(ether() / IP(src=str(P.ROUTER4), dst=str(VIP4))
                      / ICMP(type=3, code=4, nexthopmtu=1400)
                      / Raw(bytes(IP(src=str(VIP4), dst=str(CLIENT4)) / ICMP(id=1))))),
         {"STAT_PASS_ICMP": 1}),
    Case("ICMP frag-needed with a truncated quote is dropped", V4,
         dropped(bytes(ether() / IP(src=str(P.ROUTER4), dst=str(VIP4))
                       / ICMP(type=3, code=4, nexthopmtu=1400)
                       / Raw(bytes(IP(src=str(VIP4), dst=str(CLIENT4)) / TCP())[:22]))),
         {"STAT_MALFORMED": 1}),
    Case("ICMPv6 packet-too-big for a VIP flow goes to the flow's table backend",
         seeds(TWO6, with_conn(F6, 2, age_s=10)),
         tx(PTB6, enc(PTB6, REAL6[1], RSS6)), {"STAT_ICMP_FWD": 1}, conn_untouched(F6, 10)),
    Case("ICMPv6 packet-too-big without a table entry hashes the reversed flow",
         vip_with(vip=VIP6, backends=MANY6),
         tx(PTB6, hashed_enc(PTB6, F6, MANY6, RSS6)), {"STAT_ICMP_FWD": 1}, table_empty),
    Case("ICMPv6 packet-too-big for a non-VIP flow is passed", V6,
         passed(P.packet_too_big6(quoted_src=NONVIP6)), {"STAT_PASS_NON_VIP": 1}),
    Case("ICMPv6 packet-too-big with a truncated quote is dropped", V6,
         dropped(_v6_plen(PTB6[:14 + 40 + 8 + 42], 8 + 42)),
         {"STAT_MALFORMED": 1}),

    # --- too big for the path to the backend ---------------------------------------------
    Case("IPv4 packet too big with DF: frag-needed from the VIP, MTU 1480", V4,
         tx(BIG4_DF, P.too_big_reply(BIG4_DF, 1480)), {"STAT_TOO_BIG": 1, **MISS},
         stats_are(vip=(1, ip_len(BIG4_DF), 1), reals={1: (0, 0)})),
    Case("IPv4 packet too big without DF gets the same reply", V4,
         tx(BIG4_NODF, P.too_big_reply(BIG4_NODF, 1480)), {"STAT_TOO_BIG": 1, **MISS}),
    Case("IPv4 too big with VLAN: reply keeps the tag", V4,
         tx(BIG4_VLAN, P.too_big_reply(BIG4_VLAN, 1480)), {"STAT_TOO_BIG": 1, **MISS}),
    Case("IPv4 too big for GUE: MTU 1472", vip_with(flags=F_ENCAP_GUE),
         tx(FIT4, P.too_big_reply(FIT4, 1472)), {"STAT_TOO_BIG": 1, **MISS}),
    Case("IPv4 too big for an IPv6 backend: MTU 1460", vip_with(backends=(REAL6[0],)),
         tx(FIT4, P.too_big_reply(FIT4, 1460)), {"STAT_TOO_BIG": 1, **MISS}),
    Case("IPv4 packet exactly filling max_frame is forwarded", V4,
         tx(FIT4, enc(FIT4, REAL4[0], RSS4)), MISS),
    Case("IPv4 packet one byte over max_frame gets frag-needed", V4,
         tx(OVER4, P.too_big_reply(OVER4, 1480)), {"STAT_TOO_BIG": 1, **MISS}),
    Case("IPv4 small max_frame quotes the whole short packet",
         seeds(V4, with_config(max_frame=200)),
         tx(SMALL_BIG4, P.too_big_reply(SMALL_BIG4, 200 - 14 - 20)),
         {"STAT_TOO_BIG": 1, **MISS}),
    Case("IPv4 max_frame 0 turns the check off", seeds(V4, with_config(max_frame=0)),
         tx(BIG4_DF, enc(BIG4_DF, REAL4[0], RSS4)), MISS),
    Case("IPv6 packet too big: packet-too-big from the VIP, MTU 1460, 1232-byte quote", V6,
         tx(BIG6, P.too_big_reply(BIG6, 1460)), {"STAT_TOO_BIG": 1, **MISS}),
    Case("IPv6 too big for GUE: MTU 1452",
         vip_with(vip=VIP6, backends=(REAL6[0],), flags=F_ENCAP_GUE),
         tx(BIG6, P.too_big_reply(BIG6, 1452)), {"STAT_TOO_BIG": 1, **MISS}),
    Case("ICMP error too big to forward is dropped, never answered",
         seeds(V4, with_config(max_frame=100)),
         dropped(FRAG_NEEDED4), {"STAT_ENCAP_FAIL": 1}),

    # --- fragments and options -------------------------------------------------------------
    Case("IPv4 first fragment to a VIP address is dropped", V4, dropped(FRAG_MF4),
         {"STAT_FRAG": 1}),
    Case("IPv4 later fragment to a VIP address is dropped", V4, dropped(FRAG_OFF4),
         {"STAT_FRAG": 1}),
    Case("IPv4 fragment to a non-VIP address is passed", V4, passed(FRAG_NONVIP4),
         {"STAT_PASS_NON_VIP": 1}),
    Case("IPv4 options to a VIP address are dropped", V4, dropped(OPTS4),
         {"STAT_IP_OPTIONS": 1}),
    Case("IPv4 options to a non-VIP address are passed", V4, passed(OPTS_NONVIP4),
         {"STAT_PASS_NON_VIP": 1}),
    Case("IPv6 fragment header to a VIP address is dropped", V6, dropped(FRAG6),
         {"STAT_FRAG": 1}),
    Case("IPv6 fragment header to a non-VIP address is passed", V6, passed(FRAG_NONVIP6),
         {"STAT_PASS_NON_VIP": 1}),
    Case("IPv6 hop-by-hop header to a VIP address is dropped", V6, dropped(HBH6),
         {"STAT_IP_OPTIONS": 1}),
    Case("IPv6 destination options to a non-VIP address are passed", V6,
         passed(DSTOPT_NONVIP6), {"STAT_PASS_NON_VIP": 1}),

    # --- malformed ---------------------------------------------------------------------------
    Case("truncated IPv4 header is passed (it names no destination)", V4,
         passed(SYN4[:14 + 12]), {"STAT_PASS_NOT_IP": 1}),
    Case("IPv4 total length beyond the frame to a non-VIP address is passed", V4,
         passed(_truncated_ip_len(P.tcp4(dst=NONVIP4), 200)), {"STAT_PASS_NON_VIP": 1}),
    Case("IPv4 IHL below 5 to a non-VIP address is passed", V4,
         passed(_ihl(P.tcp4(dst=NONVIP4), 4)), {"STAT_PASS_NON_VIP": 1}),
    Case("truncated TCP header to a non-VIP address is passed", V4,
         passed(_truncated_ip_len(P.tcp4(dst=NONVIP4)[:14 + 20 + 10], 30)),
         {"STAT_PASS_NON_VIP": 1}),
    Case("truncated UDP header to a non-VIP address is passed", V4,
         passed(_truncated_ip_len(P.udp4(dst=NONVIP4)[:14 + 20 + 4], 24)),
         {"STAT_PASS_NON_VIP": 1}),
    Case("truncated ICMP header to a non-VIP address is passed", V4,
         passed(_truncated_ip_len(ECHO_NONVIP4[:14 + 20 + 4], 24)), {"STAT_PASS_NON_VIP": 1}),
    Case("truncated TCP header to a non-VIP IPv6 address is passed", V6,
         passed(_v6_plen(P.tcp6(dst=NONVIP6), 8)), {"STAT_PASS_NON_VIP": 1}),
    Case("IPv6 payload length beyond the frame to a non-VIP address is passed", V6,
         passed(_v6_plen(P.tcp6(dst=NONVIP6), 400)), {"STAT_PASS_NON_VIP": 1}),
    Case("IPv4 total length beyond the frame is dropped", V4,
         dropped(_truncated_ip_len(SYN4, 200)), {"STAT_MALFORMED": 1}),
    Case("IPv4 total length below the header is dropped", V4,
         dropped(_truncated_ip_len(SYN4, 12)), {"STAT_MALFORMED": 1}),
    Case("IPv4 IHL below 5 is dropped", V4, dropped(_ihl(SYN4, 4)), {"STAT_MALFORMED": 1}),
    Case("IPv6 packet in an IPv4 EtherType is passed (not to a VIP address as IPv4)", V4,
         passed(bytes(Ether(src=P.PEER_MAC, dst=P.LB_MAC, type=0x0800)
                      / IPv6(src=str(CLIENT6), dst=str(VIP6)) / TCP())),
         {"STAT_PASS_NON_VIP": 1}),
    Case("IPv4 header with version 6 to a VIP address is dropped", V4,
         dropped(_version(SYN4, 6)), {"STAT_MALFORMED": 1}),
    Case("truncated TCP header to a VIP is dropped", V4,
         dropped(_truncated_ip_len(SYN4[:14 + 20 + 10], 30)), {"STAT_MALFORMED": 1}),
    Case("truncated UDP header to a VIP is dropped", vip_with(proto="udp"),
         dropped(_truncated_ip_len(UDP4[:14 + 20 + 4], 24)), {"STAT_MALFORMED": 1}),
    Case("truncated IPv6 header is passed (it names no destination)", V6,
         passed(SYN6[:14 + 30]), {"STAT_PASS_NOT_IP": 1}),
    Case("IPv6 payload length beyond the frame is dropped", V6,
         dropped(_v6_plen(SYN6, 400)), {"STAT_MALFORMED": 1}),
    Case("IPv6 payload shorter than a TCP header is dropped", V6,
         dropped(_v6_plen(SYN6, 8)), {"STAT_MALFORMED": 1}),
    Case("truncated ICMP header is dropped", V4,
         dropped(_truncated_ip_len(ECHO4[:14 + 20 + 4], 24)), {"STAT_MALFORMED": 1}),
    *SET_CASES,
    *MAC_CASES,
    *ICMP_SOURCE_CASES,
]


# --- the test --------------------------------------------------------------------------------

_FIELD_NAMES = {
    "dst": "destination", "src": "source", "tos": "TOS (DSCP/ECN)", "tc": "traffic class",
    "ttl": "TTL", "hlim": "hop limit", "len": "length", "plen": "payload length",
    "proto": "protocol", "nh": "next header", "flags": "flags (DF)", "id": "ID",
    "chksum": "checksum", "cksum": "checksum", "sport": "source port",
    "dport": "destination port", "vlan": "VLAN id", "prio": "VLAN priority",
    "fl": "flow label", "mtu": "MTU", "nexthopmtu": "next-hop MTU", "type": "type",
}


def _field_rank(name: str) -> int:
    return {"dst": 0, "src": 1, "chksum": 3, "cksum": 3}.get(name, 2)


def _label(layers: list[Packet], i: int) -> str:
    ips = [j for j, layer in enumerate(layers) if isinstance(layer, IP | IPv6)]
    layer = layers[i]
    if isinstance(layer, IP | IPv6) and len(ips) > 1:
        return ("outer " if i == ips[0] else "inner ") + layer.name
    return str(layer.name)


def _first_difference(got: bytes, want: bytes) -> str | None:
    g, w = P._layers(Ether(got)), P._layers(Ether(want))
    for i, (gl, wl) in enumerate(zip(g, w, strict=False)):
        if type(gl) is not type(wl):
            return f"layer {i} is {gl.name}, expected {wl.name}"
        # Addresses first, checksums last: a wrong address also makes the checksum wrong,
        # and the address is the property worth naming.
        names = sorted((f.name for f in wl.fields_desc), key=_field_rank)
        for name in names:
            gv, wv = gl.getfieldval(name), wl.getfieldval(name)
            if gv != wv:
                label = _label(w, i)
                if label.startswith("outer") and name == "dst":
                    return f"outer destination is not the backend: got {gv}, expected {wv}"
                what = _FIELD_NAMES.get(name, name)
                return f"{label} {what} is wrong: got {gv!r}, expected {wv!r}"
    if len(got) != len(want):
        return f"frame is {len(got)} bytes, expected {len(want)}"
    return None


def _outer_ipv4_offset(frame: bytes) -> int | None:
    """Offset of the frame's first IPv4 header (the one the program wrote), if any."""
    off = 14
    if frame[12:14] == b"\x81\x00":
        off = 18
    return off if frame[off - 2 : off] == b"\x08\x00" and len(frame) >= off + 20 else None


def _with_id_of(got: bytes, want: bytes) -> bytes:
    """`got` with the outer IPv4 ID of `want` (checksum fixed) when DF is clear there: such
    a datagram gets a random ID (RFC 6864 4.1), proven by test_outer_ids_vary_without_df."""
    off = _outer_ipv4_offset(got)
    if off is None or _outer_ipv4_offset(want) != off or got[off + 6] & 0x40:
        return got
    hdr = bytearray(got[off : off + 20])
    hdr[4:6] = want[off + 4 : off + 6]
    hdr[10:12] = b"\0\0"
    s = sum(int.from_bytes(hdr[i : i + 2], "big") for i in range(0, 20, 2))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = (~s & 0xFFFF).to_bytes(2, "big")
    return got[:off] + bytes(hdr) + got[off + 20 :]


def _check_frame(got: bytes, want: bytes) -> None:
    bad = P.bad_checksums(got)
    assert not bad, f"checksum wrong in the output: {bad}"
    got = _with_id_of(got, want)
    if got != want:
        diff = _first_difference(got, want) or "bytes differ"
        pytest.fail(f"{diff}\n got: {got.hex()}\nwant: {want.hex()}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_packet_case(lab: Lab, case: Case) -> None:
    case.seed(lab)
    steps = case.steps(lab) if callable(case.steps) else case.steps
    expected = dict.fromkeys(GLOB_STATS, 0)
    for name, n in case.counters.items():
        expected[name] += n
    for step in steps:
        res = lab.run(step.frame)
        assert res.verdict == step.verdict, (
            f"verdict is {VERDICT_NAMES.get(res.verdict)}, "
            f"expected {VERDICT_NAMES[step.verdict]}")
        expected[f"STAT_{VERDICT_NAMES[step.verdict]}"] += 1
        if step.expect is None:
            assert res.packet == step.frame, "the frame was modified but not sent"
        else:
            want = step.expect(lab) if callable(step.expect) else step.expect
            _check_frame(res.packet, want)
    got = lab.counters()
    wrong = {k: f"{got[k]} (expected {v})" for k, v in expected.items() if got[k] != v}
    assert not wrong, f"global counters wrong: {wrong}"
    if case.check is not None:
        case.check(lab)


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 118
    assert len({c.id for c in CASES}) == len(CASES), "two packet cases share a description"


def test_gue_frames_carry_the_ip_packet(lab: Lab) -> None:
    vip_with(flags=F_ENCAP_GUE)(lab)
    res = lab.run(SYN4)
    inner = P.gue_inner(res.packet)
    assert inner is not None, "no GUE payload"
    assert bytes(inner) == P.l3_bytes(SYN4), "the GUE payload is not the original packet"
    assert Ether(res.packet)[UDP].chksum == 0, "the outer UDP checksum is not zero"
    assert Ether(res.packet)[UDP].dport == GUE_PORT, "not sent to the GUE port"


def test_one_flow_always_gets_the_same_outer_source(lab: Lab) -> None:
    V4(lab)
    outs = {Ether(lab.run(P.tcp4(flags=f)).packet)[IP].src for f in ("S", "A", "PA", "FA")}
    assert outs == {str(RSS4)}, f"one flow got several outer sources: {outs}"
    other = Ether(lab.run(P.tcp4(sport=40001)).packet)[IP].src
    assert other != str(RSS4), "two client ports share an RSS source"


def test_many_flows_spread_over_the_ring(lab: Lab) -> None:
    vip_with(backends=MANY4)(lab)
    seen: dict[str, int] = {}
    for sport in range(20000, 20500):
        out = Ether(lab.run(P.tcp4(sport=sport)).packet)
        assert UDP not in out and out[IP].proto == 4
        seen[out[IP].dst] = seen.get(out[IP].dst, 0) + 1
    assert set(seen) == {str(a) for a in MANY4}, f"some backend got nothing: {seen}"
    assert min(seen.values()) > 60, f"flows are badly spread: {seen}"


def test_new_conns_count_misses_only(lab: Lab) -> None:
    V4(lab)
    lab.run(SYN4)
    lab.run(ACK4)
    lab.run(ACK4)
    pkts, _, new = lab.vip_counters(0)
    assert (pkts, new) == (3, 1), f"packets/new_conns are {pkts}/{new}, expected 3/1"


def test_udp_v6_too_big_keeps_the_tag(lab: Lab) -> None:
    vip_with(vip=VIP6, proto="udp", backends=(REAL6[0],))(lab)
    frame = P.udp6(vlan=3, dport=80, payload=b"u" * 1452)
    res = lab.run(frame)
    assert res.verdict == XDP_TX
    _check_frame(res.packet, P.too_big_reply(frame, 1460))


def test_echo_reply_checksum_is_valid_for_every_id(lab: Lab) -> None:
    # Incremental updates may give 0x0000 where a full sum gives 0xffff: both are valid
    # (RFC 1624 section 3), so check that the checksum verifies rather than its value.
    V4(lab)
    V6(lab)
    for ident in (0, 1, 0xF7FF, 0xFFFF):
        frame4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4)) / ICMP(id=ident, seq=ident))
        reply4 = Ether(lab.run(frame4).packet)
        assert checksum(bytes(reply4[ICMP])) == 0, f"ICMP checksum wrong for id {ident:#x}"
        frame6 = bytes(ether() / IPv6(src=str(CLIENT6), dst=str(VIP6))
                       / ICMPv6EchoRequest(id=ident, seq=ident))
        reply6 = Ether(lab.run(frame6).packet)
        icmp6 = bytes(reply6[IPv6].payload)
        assert in6_chksum(58, reply6[IPv6], icmp6) == 0, f"ICMPv6 checksum wrong for id {ident:#x}"


def test_entries_decode_what_the_program_wrote(lab: Lab) -> None:
    vip_with(num=3)(lab)
    vip_with(proto="udp", num=5)(lab)
    for frame in (SYN4, UDP4, FIN4):
        assert lab.run(frame).verdict == XDP_TX
    e = lab.conns.entries()
    got = sorted(zip(e.real_idx.tolist(), e.vip_num.tolist(), e.udp.tolist(),
                     e.closing.tolist(), strict=True))
    assert got == [(1, 3, False, True), (1, 5, True, False)], (
        f"entries (real_idx, vip_num, udp, closing) are {got}")
    assert all(0 <= a < FRESH_S for a in e.age_s.tolist()), f"entry ages are {e.age_s}"


def test_deleting_a_flow_the_table_does_not_hold_is_false(lab: Lab) -> None:
    V4(lab)
    assert not lab.delete_conn(F4), "a delete on an empty table reported an entry"
    assert lab.run(SYN4).verdict == XDP_TX
    assert not lab.delete_conn(Flow(CLIENT4, VIP4, 40001, 80)), "another port's flow deleted"
    assert lab.delete_conn(F4) and lab.conn_count() == 0, "the flow's entry was not deleted"


@pytest.mark.parametrize("base", [F4, F6, UF4, UF6], ids=["IPv4", "IPv6", "IPv4 UDP", "IPv6 UDP"])
def test_set_mates_share_the_flows_set(lab: Lab, base: Flow) -> None:
    mates = lab.set_mates(base, CONN_WAYS)
    assert len(set(mates)) == CONN_WAYS and base not in mates, "the set's flows repeat"
    assert {lab.set_of(f) for f in mates} == {lab.set_of(base)}, "a flow is in another set"
    assert {f.proto for f in mates} == {base.proto}, "a flow of another protocol"


def _arm(lab: Lab, *addrs: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Arm the VIP address filter with these addresses, as the control plane does."""
    MapIO(lab.b).write_vip_filter(
        [(4 if a.version == 4 else 6, a.packed.ljust(16, b"\0")) for a in addrs])


@pytest.mark.parametrize(("vip", "syn"), [(V4, SYN4), (V6, SYN6)], ids=["IPv4", "IPv6"])
def test_the_armed_vip_filter_lets_vip_addresses_through(
    lab: Lab, vip: Callable[[Lab], None], syn: bytes
) -> None:
    vip(lab)
    _arm(lab, P.VIP4, P.VIP6)
    assert lab.run(syn).verdict == XDP_TX, "a VIP address whose bit is set was filtered out"
    # Armed without the VIP's address: the program must trust the filter (so the bit the
    # control plane computes in Python is the one the program tests).
    _arm(lab, P.NONVIP4)
    before = lab.counters()["STAT_PASS_NON_VIP"]
    assert lab.run(syn).verdict == XDP_PASS, "the program ignored the armed filter"
    assert lab.counters()["STAT_PASS_NON_VIP"] == before + 1


def test_an_unarmed_vip_filter_filters_nothing(lab: Lab) -> None:
    V4(lab)
    lab.b.vip_filter[lab.b.vip_filter.Key(0)] = lab.b.vip_filter.Leaf()
    assert lab.run(SYN4).verdict == XDP_TX, "an unarmed (all-zero) filter dropped a VIP"


def test_outer_ids_vary_without_df_and_are_zero_with_df(lab: Lab) -> None:
    # RFC 6864 4.1: a datagram that may be fragmented (DF clear) needs an ID; an atomic one
    # (DF set) may carry 0. The packet cases compare everything else byte for byte.
    vip_with(proto="udp")(lab)
    ids = {Ether(lab.run(P.udp4(dport=80, sport=41000 + i)).packet)[IP].id for i in range(16)}
    assert len(ids) > 1, f"DF clear, but every outer ID is {ids}"
    df = P.udp4(dport=80, flags="DF")
    assert Ether(lab.run(df).packet)[IP].id == 0
    lab.config(max_frame=200)
    big = P.udp4(dport=80, payload=b"x" * 400)
    replies = {Ether(lab.run(big).packet)[IP].id for _ in range(8)}
    assert len(replies) > 1, "a frag-needed reply (DF clear) needs an ID"


def test_each_vip_counts_what_it_sent_to_each_backend(lab: Lab) -> None:
    # Two VIPs share backend 1; VIP 1 also uses backend 2. The per-backend totals sum over
    # VIPs; the pairs keep them apart (packets, client IP bytes, new connections).
    vip_with(backends=(REAL4[0],), ring=[1])(lab)
    vip_with(port=443, backends=(REAL4[0], REAL4[1]), ring=[2], num=1)(lab)
    assert lab.run(SYN4).verdict == XDP_TX
    assert lab.run(ACK4).verdict == XDP_TX
    syn443 = P.tcp4(dport=443)
    assert lab.run(syn443).verdict == XDP_TX
    assert lab.pair_counters(0, 1) == (2, ip_len(SYN4) + ip_len(ACK4), 1)
    assert lab.pair_counters(1, 2) == (1, ip_len(syn443), 1)
    assert lab.pair_counters(1, 1) is None, "VIP 1 sent nothing to backend 1"
    assert lab.real_counters(1)[0] == 2 and lab.real_counters(2)[0] == 1


def test_a_pair_whose_slot_another_holds_counts_in_pair_stats_and_takes_it_when_freed(
    lab: Lab,
) -> None:
    # pair_cache is direct-mapped: a colliding pair (here VIP 7 -> backend 9, written into
    # the slot of VIP 0 -> backend 1 on every CPU) sends the other to pair_stats; the pair's
    # counters are the sum, and freeing VIP 7 frees the slot for it.
    vip_with(backends=(REAL4[0],), ring=[1])(lab)
    t = lab.b.pair_cache
    key = t.Key(pair_slot(0, 1, lab.b.config.pair_slots_log2))
    held = t.Leaf()
    for c in held:
        c.key.vip_num, c.key.real_idx, c.packets = 7, 9, 5
    t[key] = held
    assert lab.run(SYN4).verdict == XDP_TX
    assert lab.b.pair_stats.Key(0, 1) in lab.b.pair_stats, "the held slot was not left alone"
    assert lab.pair_counters(0, 1) == (1, ip_len(SYN4), 1)
    assert [(c.key.vip_num, c.key.real_idx, c.packets) for c in t[key]] == [(7, 9, 5)] * len(held)
    MapIO(lab.b).drop_pairs([7], [])
    assert all(c.key.real_idx == 0 and c.packets == 0 for c in t[key]), "VIP 7's slot kept"
    assert lab.run(ACK4).verdict == XDP_TX
    assert all((c.key.vip_num, c.key.real_idx) in ((0, 0), (0, 1)) for c in t[key])
    assert lab.pair_counters(0, 1) == (2, ip_len(SYN4) + ip_len(ACK4), 1)
    MapIO(lab.b).drop_pairs([], [1])
    assert lab.pair_counters(0, 1) is None, "freeing backend 1 left its pair's counters"
