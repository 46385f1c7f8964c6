"""The backend decap programs (xdp/decap/decap.c), both variants, through BPF_PROG_TEST_RUN.

Every row is (description, frame in, expected outcome, counter slot). A decapsulated frame
must leave as the Ethernet header with the inner ethertype followed by the original inner
packet byte for byte; a passed frame must leave untouched; every frame bumps exactly one slot.
A seeded fuzz checks robustness, and one netns test per attach mode (tc, XDP native, XDP
generic) checks that a backend behind a real veth answers through every tunnel kind.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet

from lb.config import xdp_source_dir
from lb.consts import FAMILY_V4, FAMILY_V6, XDP_ABORTED, XDP_DROP, XDP_PASS
from lb.dataplane import decap as decap_mod
from lb.dataplane import netlink
from lb.dataplane import netns as labnet
from lb.dataplane.decap import DECAP_STATS, TC_ACT_OK, TC_ACT_SHOT, Decap
from lb.dataplane.testrun import TestRunner
from lb.errors import InvalidInput, LimitReached, NotFound

LB_MAC = "02:00:00:00:00:01"
BACKEND_MAC = "02:00:00:00:00:02"
LB_V4, LB_V6 = "198.18.0.1", "2001:db8::1"
LOCAL_V4, LOCAL_V6 = "198.18.0.10", "2001:db8::10"
FOREIGN_V4, FOREIGN_V6 = "198.18.0.99", "2001:db8::99"
GUE_PORT = 6080
OTHER_PORT = 6081
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
VLAN_ID = 7
# Ethernet header plus one 802.1Q tag: the longest L2 header either variant leaves in front.
MAX_L2_LEN = 18

INNER_V4 = bytes(
    IP(src="198.18.1.5", dst="198.18.2.1", tos=0x10)
    / TCP(sport=40000, dport=80, flags="S")
    / b"inner v4 payload"
)
INNER_V6 = bytes(
    IPv6(src="2001:db8:1::5", dst="2001:db8:2::1")
    / UDP(sport=40000, dport=53)
    / b"inner v6 payload"
)


def eth(vlan: int | None = None) -> Packet:
    """Explicit Ethernet header (never a bare Ether(): scapy would resolve a MAC)."""
    e = Ether(src=LB_MAC, dst=BACKEND_MAC)
    return e / Dot1Q(vlan=vlan) if vlan is not None else e


def out4(dst: str = LOCAL_V4, **kw: object) -> Packet:
    """Outer IPv4 header from the balancer."""
    return IP(src=LB_V4, dst=dst, **kw)


def out6(dst: str = LOCAL_V6, **kw: object) -> Packet:
    """Outer IPv6 header from the balancer."""
    return IPv6(src=LB_V6, dst=dst, **kw)


def gue(port: int = GUE_PORT, **kw: object) -> Packet:
    """Outer UDP header of GUE variant 1."""
    return UDP(sport=50123, dport=port, **kw)


@dataclass(frozen=True)
class Case:
    """One packet row: what goes in, what must happen, which counter moves."""

    desc: str
    frame: bytes
    outcome: str  # "decap", "pass" or "drop"
    stat: str
    inner: bytes = b""
    vlan: int | None = None
    trailer: bytes = b""


def decap_row(desc: str, outer: Packet, inner: bytes, stat: str, trailer: bytes = b"") -> Case:
    """A row whose frame is `outer` carrying `inner` (and any trailing bytes)."""
    vlan = outer[Dot1Q].vlan if outer.haslayer(Dot1Q) else None
    return Case(desc, bytes(outer / inner) + trailer, "decap", stat, inner, vlan, trailer)


def pass_row(desc: str, frame: Packet, stat: str) -> Case:
    """A row that must leave untouched."""
    return Case(desc, bytes(frame), "pass", stat)


def drop_row(desc: str, frame: Packet) -> Case:
    """A tunnel packet to a local address that must be dropped as malformed."""
    return Case(desc, bytes(frame), "drop", "DECAP_STAT_DROP_MALFORMED")


NOT_LOCAL = "DECAP_STAT_PASS_NOT_LOCAL"
NOT_ENCAP = "DECAP_STAT_PASS_NOT_ENCAP"
FRAG = "DECAP_STAT_PASS_FRAG"

CASES: list[Case] = [
    decap_row("ipip", eth() / out4(proto=4), INNER_V4, "DECAP_STAT_IPIP"),
    decap_row("ip6ip6", eth() / out6(nh=41), INNER_V6, "DECAP_STAT_IP6IP6"),
    decap_row("ip4in6", eth() / out6(nh=4), INNER_V4, "DECAP_STAT_IP4IN6"),
    decap_row("gue4 inner v4", eth() / out4() / gue(), INNER_V4, "DECAP_STAT_GUE_V4"),
    decap_row("gue4 inner v6", eth() / out4() / gue(), INNER_V6, "DECAP_STAT_GUE_V4"),
    decap_row("gue6 inner v4", eth() / out6() / gue(), INNER_V4, "DECAP_STAT_GUE_V6"),
    decap_row("gue6 inner v6", eth() / out6() / gue(), INNER_V6, "DECAP_STAT_GUE_V6"),
    decap_row("gue4 udp checksum 0", eth() / out4() / gue(chksum=0), INNER_V4, "DECAP_STAT_GUE_V4"),
    decap_row("gue6 udp checksum 0", eth() / out6() / gue(chksum=0), INNER_V6, "DECAP_STAT_GUE_V6"),
    decap_row("ipip vlan", eth(VLAN_ID) / out4(proto=4), INNER_V4, "DECAP_STAT_IPIP"),
    decap_row("gue6 vlan inner v4", eth(VLAN_ID) / out6() / gue(), INNER_V4, "DECAP_STAT_GUE_V6"),
    decap_row(
        "ipip outer options",
        eth() / out4(proto=4, options=[IPOption_Router_Alert()]),
        INNER_V4,
        "DECAP_STAT_IPIP",
    ),
    decap_row(
        "ipip ethernet padding kept",
        eth() / out4(proto=4),
        INNER_V4,
        "DECAP_STAT_IPIP",
        trailer=b"\0" * 6,
    ),
    # Pass untouched.
    pass_row("ipip not local", eth() / out4(FOREIGN_V4, proto=4) / INNER_V4, NOT_LOCAL),
    pass_row("ip6ip6 not local", eth() / out6(FOREIGN_V6, nh=41) / INNER_V6, NOT_LOCAL),
    pass_row("gue6 not local", eth() / out6(FOREIGN_V6) / gue() / INNER_V4, NOT_LOCAL),
    pass_row("tcp to local v4", eth() / out4() / TCP(dport=80), NOT_ENCAP),
    pass_row("udp to local v6", eth() / out6() / UDP(dport=53) / b"q", NOT_ENCAP),
    pass_row("gue4 other port", eth() / out4() / gue(OTHER_PORT) / INNER_V4, NOT_ENCAP),
    pass_row("gue6 other port", eth() / out6() / gue(OTHER_PORT) / INNER_V6, NOT_ENCAP),
    pass_row("vlan tcp to local", eth(VLAN_ID) / out4() / TCP(dport=80), NOT_ENCAP),
    pass_row(
        "arp",
        eth() / ARP(hwsrc=LB_MAC, psrc=LB_V4, hwdst="00:00:00:00:00:00", pdst=LOCAL_V4),
        NOT_ENCAP,
    ),
    pass_row("ipip first fragment", eth() / out4(proto=4, flags="MF") / INNER_V4, FRAG),
    pass_row("gue4 later fragment", eth() / out4(proto=17, frag=3) / INNER_V4[:16], FRAG),
    # Dropped: a tunnel packet to us that cannot be decapsulated.
    drop_row("gue4 garbage payload", eth() / out4() / gue() / (b"\x00garbage" * 4)),
    drop_row("gue6 garbage payload", eth() / out6() / gue() / (b"\xf0garbage" * 4)),
    drop_row("gue4 empty payload", eth() / out4() / gue()),
    drop_row("gue4 inner header truncated", eth() / out4() / gue() / INNER_V4[:12]),
    drop_row("gue6 inner header truncated", eth() / out6() / gue() / INNER_V6[:30]),
    drop_row("gue4 inner longer than payload", eth() / out4() / gue() / INNER_V4[:-3]),
    drop_row("ip6ip6 inner longer than payload", eth() / out6(nh=41) / INNER_V6[:-1]),
    drop_row("ipip inner is ipv6", eth() / out4(proto=4) / INNER_V6),
    drop_row("ip6ip6 inner is ipv4", eth() / out6(nh=41) / INNER_V4),
    drop_row("ip4in6 inner is ipv6", eth() / out6(nh=4) / INNER_V6),
    drop_row("ipip outer length beyond frame", eth() / out4(proto=4, len=400) / INNER_V4),
    drop_row("ipip outer ihl below 5", eth() / out4(proto=4, ihl=4) / INNER_V4),
    drop_row("ip6ip6 payload length beyond frame", eth() / out6(nh=41, plen=999) / INNER_V6),
    drop_row("gue4 udp length below 8", eth() / out4() / gue(len=4) / INNER_V4),
    drop_row("gue6 udp length beyond payload", eth() / out6() / gue(len=900) / INNER_V6),
]


@dataclass(frozen=True)
class Variant:
    """One of the two programs with its own verdict numbers."""

    name: str
    passed: int
    dropped: int
    keeps_vlan: bool  # XDP keeps an in-band tag; tc moves it to skb->vlan_tci


VARIANTS = [
    Variant("xdp", XDP_PASS, XDP_DROP, keeps_vlan=True),
    Variant("tc", TC_ACT_OK, TC_ACT_SHOT, keeps_vlan=False),
]


@pytest.fixture(scope="module")
def decap() -> Iterator[Decap]:
    """The decap programs, compiled once for this module, with the backend's addresses."""
    with Decap() as d:
        d.add_local(LOCAL_V4)
        d.add_local(LOCAL_V6)
        yield d


@pytest.fixture(scope="module")
def runners(decap: Decap) -> dict[str, TestRunner]:
    """One test runner per variant."""
    return {"xdp": TestRunner(decap.xdp_fd), "tc": TestRunner(decap.tc_fd)}


def expected_output(case: Case, variant: Variant) -> bytes:
    """Ethernet header with the inner ethertype (tag kept by XDP), then the inner packet."""
    inner_type = ETH_P_IP if case.inner[0] >> 4 == 4 else ETH_P_IPV6
    if case.vlan is not None and variant.keeps_vlan:
        hdr = Ether(src=LB_MAC, dst=BACKEND_MAC, type=ETH_P_8021Q) / Dot1Q(
            vlan=case.vlan, type=inner_type
        )
    else:
        hdr = Ether(src=LB_MAC, dst=BACKEND_MAC, type=inner_type)
    return bytes(hdr) + case.inner + case.trailer


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Slots that moved."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.mark.bpf
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.desc)
def test_packet_table(
    decap: Decap, runners: dict[str, TestRunner], variant: Variant, case: Case
) -> None:
    before = decap.counters()
    res = runners[variant.name].run(case.frame)
    moved = counter_delta(before, decap.counters())
    assert moved == {case.stat: 1}, f"{case.desc}: counted {moved}, expected {case.stat} once"
    if case.outcome == "drop":
        assert res.verdict == variant.dropped, f"{case.desc}: malformed tunnel packet not dropped"
        return
    assert res.verdict == variant.passed, f"{case.desc}: verdict {res.verdict}, expected pass"
    if case.outcome == "pass":
        assert res.packet == case.frame, f"{case.desc}: a packet not for us was modified"
    else:
        assert res.packet == expected_output(case, variant), (
            f"{case.desc}: output is not the Ethernet header plus the original inner packet"
        )


@pytest.mark.bpf
def test_gue_port_is_configurable(decap: Decap, runners: dict[str, TestRunner]) -> None:
    frame_new = bytes(eth() / out4() / gue(OTHER_PORT) / INNER_V4)
    frame_old = bytes(eth() / out4() / gue(GUE_PORT) / INNER_V4)
    decap.set_gue_port(OTHER_PORT)
    try:
        assert decap.gue_port() == OTHER_PORT
        for name, runner in runners.items():
            assert runner.run(frame_new).packet != frame_new, f"{name}: new GUE port ignored"
            assert runner.run(frame_old).packet == frame_old, f"{name}: old GUE port still used"
    finally:
        decap.set_gue_port(GUE_PORT)
    with pytest.raises(InvalidInput):
        decap.set_gue_port(0)


@pytest.mark.bpf
def test_removing_a_local_address_stops_decap(decap: Decap, runners: dict[str, TestRunner]) -> None:
    extra = "198.18.0.11"
    frame = bytes(eth() / out4(extra, proto=4) / INNER_V4)
    decap.add_local(extra)
    try:
        assert [str(a) for a in decap.local_addrs()] == [LOCAL_V4, extra, LOCAL_V6]
        assert runners["xdp"].run(frame).packet != frame, "registered address not decapsulated"
    finally:
        decap.remove_local(extra)
    assert runners["xdp"].run(frame).packet == frame, "removed address still decapsulated"
    with pytest.raises(NotFound):
        decap.remove_local(extra)
    with pytest.raises(InvalidInput):
        decap.add_local("not-an-address")


@pytest.mark.bpf
def test_full_address_map_is_limit_reached() -> None:
    with Decap(max_addrs=1) as d:
        d.add_local(LOCAL_V4)
        d.add_local(LOCAL_V4)  # an update of an existing key still fits
        with pytest.raises(LimitReached):
            d.add_local(LOCAL_V6)


@pytest.mark.bpf
def test_pinned_maps_survive_a_reload(pin_dir: Path) -> None:
    with Decap(pin_dir=pin_dir, gue_port=OTHER_PORT) as d:
        d.add_local(LOCAL_V6)
    assert sorted(p.name for p in pin_dir.iterdir()) == sorted(decap_mod.MAP_NAMES)
    with Decap(pin_dir=pin_dir, gue_port=None) as d:
        assert [str(a) for a in d.local_addrs()] == [LOCAL_V6]
        assert d.gue_port() == OTHER_PORT


def _mutations(rng: random.Random, bases: list[bytes], count: int) -> Iterator[bytes]:
    """Frames near the valid ones: flipped bytes, cut lengths, random tails, pure noise."""
    for _ in range(count):
        base = bytearray(rng.choice(bases))
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                base[rng.randrange(min(len(base), 100))] = rng.randrange(256)
        elif kind == 1:
            base = base[: rng.randint(14, len(base))]
        elif kind == 2:
            cut = rng.randint(14, min(len(base), 80))
            base = base[:cut] + rng.randbytes(rng.randint(0, 80))
        else:
            base = bytearray(rng.randbytes(rng.randint(14, 160)))
            if rng.random() < 0.5:
                base[12:14] = rng.choice([ETH_P_IP, ETH_P_IPV6]).to_bytes(2, "big")
        yield bytes(base)


# The kernel's skb test-run refuses (EINVAL) a frame whose ethertype is IPv4 / IPv6 but that
# is shorter than the base IP header, before the program runs; XDP runs them all.
TC_TEST_RUN_MIN = {ETH_P_IP: 14 + 20, ETH_P_IPV6: 14 + 40}


def _runnable(variant: Variant, frame: bytes) -> bool:
    if variant.name != "tc":
        return True
    return len(frame) >= TC_TEST_RUN_MIN.get(int.from_bytes(frame[12:14], "big"), 0)


@pytest.mark.bpf
def test_fuzz_never_aborts_or_grows(decap: Decap, runners: dict[str, TestRunner]) -> None:
    seed = int(os.environ.get("XLB_FUZZ_SEED", "20261125"))
    print(f"decap fuzz seed {seed} (set XLB_FUZZ_SEED to replay another)")
    rng = random.Random(seed)
    bases = [c.frame for c in CASES]
    frames = list(_mutations(rng, bases, 2500))
    for variant in VARIANTS:
        runner = runners[variant.name]
        runnable = [f for f in frames if _runnable(variant, f)]
        before = decap.counters()
        for frame in runnable:
            res = runner.run(frame)
            msg = f"seed {seed}, {variant.name}, frame {frame.hex()}"
            assert res.verdict != XDP_ABORTED or variant.name == "tc", f"XDP_ABORTED: {msg}"
            assert res.verdict in (variant.passed, variant.dropped), f"verdict: {msg}"
            assert len(res.packet) <= len(frame), f"output grew: {msg}"
            if res.verdict == variant.passed and res.packet != frame:
                assert frame.endswith(res.packet[MAX_L2_LEN:]), f"not a decap: {msg}"
        after = decap.counters()
        assert sum(after.values()) - sum(before.values()) == len(runnable), (
            f"seed {seed}, {variant.name}: not every frame was counted exactly once"
        )


# A real veth path: what BPF_PROG_TEST_RUN's synthetic skb cannot show (GRO, checksum state,
# the stack accepting the decapsulated packet and answering it).
LAB_ATTACH = ["tc", "xdp-native", "xdp-generic"]
CLIENT_V4, CLIENT_V6 = "198.18.1.5", "2001:db8:1::5"
VIP_V4, VIP_V6 = "198.18.2.1", "2001:db8:2::1"
# How long one echo request may take to come back through ARP/ND resolution.
REPLY_WAIT_S = 2.0
ETH_P_ALL = 0x0003
# Neighbour entry state that never expires (include/uapi/linux/neighbour.h).
NUD_PERMANENT = 0x80


def _echo_frames() -> dict[str, tuple[bytes, bytes]]:
    """Kind -> (tunnel frame carrying an echo request to the VIP, reply payload marker)."""
    ping4 = IP(src=CLIENT_V4, dst=VIP_V4) / ICMP(id=7, seq=1)
    ping6 = IPv6(src=CLIENT_V6, dst=VIP_V6) / ICMPv6EchoRequest(id=7, seq=1)
    frames = {
        "DECAP_STAT_IPIP": (eth() / out4(proto=4), ping4),
        "DECAP_STAT_IP6IP6": (eth() / out6(nh=41), ping6),
        "DECAP_STAT_IP4IN6": (eth() / out6(nh=4), ping4),
        "DECAP_STAT_GUE_V4": (eth() / out4() / gue(chksum=0), ping6),
        "DECAP_STAT_GUE_V6": (eth() / out6() / gue(), ping4),
    }
    out = {}
    for kind, (outer, ping) in frames.items():
        marker = f"xlb-{kind}".encode()
        out[kind] = (bytes(outer / (ping / marker)), marker)
    return out


def _exchange(ifname: str, frames: dict[str, tuple[bytes, bytes]]) -> dict[str, bool]:
    """Send each frame from the LB side; which kinds got an echo reply back to the client."""
    got: dict[str, bool] = {}
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.bind((ifname, 0))
        s.settimeout(0.2)
        for kind, (frame, marker) in frames.items():
            s.send(frame)
            got[kind] = False
            deadline = time.monotonic() + REPLY_WAIT_S
            while not got[kind] and time.monotonic() < deadline:
                try:
                    pkt = Ether(s.recv(4096))
                except TimeoutError:
                    continue
                if (pkt.haslayer(ICMP) and pkt[ICMP].type == 0) or pkt.haslayer(ICMPv6EchoReply):
                    got[kind] = marker in bytes(pkt)
    return got


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("attach", LAB_ATTACH)
def test_veth_backend_answers_through_every_tunnel(
    decap: Decap, netns: Callable[[str], str], attach: str
) -> None:
    lb_ns, be_ns = netns("dlb"), netns("dbe")
    for name in (lb_ns, be_ns):
        netlink.set_link(name, "lo", up=True)
    netlink.add_veth(
        netlink.End(lb_ns, "lbveth", mac=LB_MAC), netlink.End(be_ns, "beveth", mac=BACKEND_MAC)
    )
    for name, ifname, addr in (
        (lb_ns, "lbveth", f"{LB_V4}/24"),
        (lb_ns, "lbveth", f"{LB_V6}/64"),
        (be_ns, "beveth", f"{LOCAL_V4}/24"),
        (be_ns, "beveth", f"{LOCAL_V6}/64"),
        (be_ns, "lo", f"{VIP_V4}/32"),
        (be_ns, "lo", f"{VIP_V6}/128"),
    ):
        netlink.add_address(name, ifname, addr)
    netlink.add_route(be_ns, "198.18.1.0/24", LB_V4)
    netlink.add_route(be_ns, "2001:db8:1::/64", LB_V6)
    with netlink.iproute(be_ns) as ipr:
        idx = ipr.link_lookup(ifname="beveth")[0]
        # Static neighbours: IPv6 neighbour discovery waits for link-local DAD (about a second
        # after link up), which is not what this test is about.
        for gw in (LB_V4, LB_V6):
            ipr.neigh("add", dst=gw, lladdr=LB_MAC, ifindex=idx, state=NUD_PERMANENT)
        if attach == "tc":
            ipr.tc("add", "clsact", idx)
            ipr.tc("add-filter", "bpf", idx, ":1", fd=decap.tc_fd, name="tc_decap",
                   parent="ffff:fff2", classid=1, direct_action=True)  # fmt: skip
    if attach != "tc":
        netlink.xdp_attach(be_ns, "beveth", decap.xdp_fd, mode=attach.removeprefix("xdp-"))
    before = decap.counters()
    got = labnet.call_in(lb_ns, _exchange, "lbveth", _echo_frames())
    moved = counter_delta(before, decap.counters())
    missing = [kind for kind, ok in got.items() if not ok]
    assert not missing, f"{attach}: no echo reply from the backend through {missing}"
    for kind in got:
        assert moved.get(kind) == 1, f"{attach}: {kind} counted {moved.get(kind)} times"


def _header() -> str:
    return (xdp_source_dir() / "decap" / "decap.h").read_text()


def test_counter_slots_match_the_header_enum() -> None:
    body = re.search(r"enum decap_stat \{(.*?)\};", _header(), re.S)
    assert body, "enum decap_stat not found in xdp/decap/decap.h"
    text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    names = [n.split("=")[0].strip() for n in text.split(",") if n.strip()]
    assert names[-1] == "DECAP_STAT_MAX"
    assert tuple(names[:-1]) == DECAP_STATS
    assert len(DECAP_STATS) == decap_mod.DECAP_STAT_MAX


def test_defaults_match_the_header() -> None:
    header = _header()
    for name in ("DECAP_MAX_ADDRS", "DECAP_DEFAULT_GUE_PORT"):
        m = re.search(rf"^#define {name} (\d+)$", header, re.M)
        assert m, f"{name} not #defined in xdp/decap/decap.h"
        assert getattr(decap_mod, name) == int(m.group(1)), f"{name} differs between C and Python"
    # Keys are written with lb.dataplane.loader.family_of, i.e. the balancer's family numbers.
    for name, value in (("DECAP_FAMILY_V4", FAMILY_V4), ("DECAP_FAMILY_V6", FAMILY_V6)):
        m = re.search(rf"^#define {name} (\d+)$", header, re.M)
        assert m and int(m.group(1)) == value, f"{name} is not the balancer's family number"


def test_every_row_names_a_real_counter() -> None:
    for case in CASES:
        assert case.stat in DECAP_STATS, f"{case.desc}: unknown counter {case.stat}"
