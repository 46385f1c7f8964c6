"""Second chance (docs/second-chance.md) through BPF_PROG_TEST_RUN: the balancer carries a
slot's previous backend as a second hop, the backends' decap (XDP and tc) keeps what is its
own and passes the rest on.

Balancer rows seed a ring whose words hold (backend, second hop) and check the frame sent
and the counters. Decap rows run inside a namespace of their own, where real sockets make
the lookups answer: a listener, an established connection, a connected and an unconnected
UDP socket on the VIP.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from lb.consts import F_ENCAP_GUE, RING_PREV_SHIFT, XDP_PASS, XDP_TX
from lb.dataplane import netns as labnet
from lb.dataplane.decap import TC_ACT_OK, Decap
from lb.dataplane.testrun import TestRunner
from tests.dataplane import packets as P
from tests.dataplane.lab import Flow, Lab

pytestmark = [pytest.mark.bpf]

GUE_PRIV_SECOND = P.c_define("common/gue.h", "GUE_PRIV_SECOND")
GUE_HOPS_INITIAL = P.c_define("common/gue.h", "GUE_HOPS_INITIAL")
TC_ACT_REDIRECT = 7

CLIENT4, VIP4, VIP6, CLIENT6 = P.CLIENT4, P.VIP4, P.VIP6, P.CLIENT6
REAL4, REAL6 = P.REAL4, P.REAL6
F4 = Flow(CLIENT4, VIP4, 40000, 80)
F6 = Flow(CLIENT6, VIP6, 40000, 80)


def tcp4(flags: str, payload: bytes = b"") -> bytes:
    """Client -> VIP4 TCP with DF set, so the outer IPv4 ID is 0 (without DF it is random)."""
    return bytes(P.ether() / IP(src=str(CLIENT4), dst=str(VIP4), flags="DF")
                 / TCP(sport=40000, dport=80, flags=flags, seq=1000) / Raw(payload))


SYN4 = tcp4("S")
ACK4 = tcp4("A", b"hello")
ACK6 = P.tcp6(flags="A", payload=b"hello")
UDP4 = bytes(P.ether() / IP(src=str(CLIENT4), dst=str(VIP4), flags="DF")
             / UDP(sport=40000, dport=80) / Raw(b"q"))



def gue_second(second: ipaddress.IPv4Address | ipaddress.IPv6Address, inner_v4: bool,
               hops: int = GUE_HOPS_INITIAL) -> bytes:
    """The GUE header naming a second hop (xdp/common/gue.h), written from the format."""
    hlen = 2 if second.version == 4 else 5
    return (bytes([hlen, 4 if inner_v4 else 41, 0, 0])
            + struct.pack("!HBB", GUE_PRIV_SECOND, hops, second.version) + second.packed)


def with_second(plain: bytes, second: Any, inner_v4: bool) -> bytes:
    """A GUE variant 1 frame with the second-hop GUE header put between UDP and inner IP."""
    pkt = Ether(plain)
    outer = pkt[IP] if IP in pkt and pkt[IP].proto == 17 else pkt[IPv6]
    udp = pkt[UDP]
    inner = bytes(udp.payload)
    udp.remove_payload()
    udp.add_payload(Raw(gue_second(second, inner_v4) + inner))
    udp.len = None
    if isinstance(outer, IP):
        outer.len = None
        outer.chksum = None
    else:
        outer.plen = None
    return bytes(pkt)


def ring_with(lab: Lab, num: int, real: int, prev: int) -> None:
    """VIP `num`'s ring: every slot backend `real`, second hop `prev` (0 = none)."""
    lab._write_ring(num, [real | prev << RING_PREV_SHIFT] * lab.ring_size)
    lab._rings.add(num)


def seed(lab: Lab, vip: Any = VIP4, reals: tuple[Any, ...] = (REAL4[0], REAL4[1]),
         flags: int = F_ENCAP_GUE, prev: int = 2) -> None:
    lab.config()
    lab.vip(vip, 80, "tcp", num=0, flags=flags)
    lab.vip(vip, 80, "udp", num=0, flags=flags)
    for i, r in enumerate(reals, 1):
        lab.real(i, r)
    ring_with(lab, 0, 1, prev)


# --- the balancer ----------------------------------------------------------------------------


def test_table_miss_carries_the_second_hop_and_is_not_remembered(lab: Lab) -> None:
    seed(lab)
    out = lab.run(ACK4)
    plain = P.encapsulated(ACK4, REAL4[0], P.rss_src4(CLIENT4, 40000), gue_port=P.GUE_PORT,
                           gue_src_port=P.gue_sport(F4.hash()))
    assert out.verdict == XDP_TX
    assert out.packet == with_second(plain, REAL4[1], inner_v4=True)
    c = lab.counters()
    assert c["STAT_SECOND_HOP"] == 1 and c["STAT_SECOND_SKIP"] == 0
    # Remembering the first backend would cut the flow off its second hop.
    assert lab.lookup_conn(F4) is None


def test_udp_miss_carries_the_second_hop(lab: Lab) -> None:
    seed(lab)
    out = lab.run(UDP4)
    plain = P.encapsulated(UDP4, REAL4[0], P.rss_src4(CLIENT4, 40000), gue_port=P.GUE_PORT,
                           gue_src_port=P.gue_sport(Flow(CLIENT4, VIP4, 40000, 80, "udp").hash()))
    assert out.packet == with_second(plain, REAL4[1], inner_v4=True)


def test_ipv6_second_hop_is_16_bytes(lab: Lab) -> None:
    seed(lab, vip=VIP6, reals=(REAL6[0], REAL6[1]))
    out = lab.run(ACK6)
    plain = P.encapsulated(ACK6, REAL6[0], P.rss_src6(CLIENT6, 40000), gue_port=P.GUE_PORT,
                           gue_src_port=P.gue_sport(F6.hash()))
    assert out.verdict == XDP_TX
    assert out.packet == with_second(plain, REAL6[1], inner_v4=False)


@pytest.mark.parametrize("why", ["syn", "table hit", "ipip vip", "no second hop"])
def test_plain_encapsulation_without_a_second_hop(lab: Lab, why: str) -> None:
    flags = 0 if why == "ipip vip" else F_ENCAP_GUE
    seed(lab, flags=flags, prev=0 if why == "no second hop" else 2)
    frame = SYN4 if why == "syn" else ACK4
    if why == "table hit":
        lab.conn(F4, 1)
    out = lab.run(frame)
    gue = flags & F_ENCAP_GUE
    expect = P.encapsulated(frame, REAL4[0], P.rss_src4(CLIENT4, 40000),
                            gue_port=P.GUE_PORT if gue else None,
                            gue_src_port=P.gue_sport(F4.hash()))
    assert out.verdict == XDP_TX and out.packet == expect
    assert lab.counters()["STAT_SECOND_HOP"] == 0
    if why == "syn":
        assert lab.lookup_conn(F4) is not None


@pytest.mark.parametrize("why", ["removed", "other family", "too big"])
def test_unusable_second_hop_is_skipped(lab: Lab, why: str) -> None:
    reals = (REAL4[0], REAL6[1] if why == "other family" else REAL4[1])
    seed(lab, reals=reals)
    if why == "removed":
        lab.remove_real(2)
    frame = ACK4
    if why == "too big":
        # Fits with IP + UDP (28 bytes) in 1514, not with the 12 more of the hop's header.
        frame = tcp4("A", b"x" * (1514 - 14 - 28 - 40 - 4))
    out = lab.run(frame)
    expect = P.encapsulated(frame, REAL4[0], P.rss_src4(CLIENT4, 40000), gue_port=P.GUE_PORT,
                            gue_src_port=P.gue_sport(F4.hash()))
    assert out.verdict == XDP_TX and out.packet == expect
    c = lab.counters()
    assert c["STAT_SECOND_SKIP"] == 1 and c["STAT_SECOND_HOP"] == 0


# --- the backend's decap ---------------------------------------------------------------------

LB_MAC, BACKEND_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
LB_SRC4 = "198.19.0.7"
LB_SRC6 = "2001:db8:ffff:ffff::7"
SELF4, NEXT4 = "198.18.1.1", "198.18.1.2"
SELF6, NEXT6 = "2001:db8:1::1", "2001:db8:1::2"
SC_VIP4, SC_VIP6 = "198.18.0.10", "2001:db8::10"
SC_CLIENT4, SC_CLIENT6 = "198.18.2.1", "2001:db8:2::1"
PORT, UDP_PORT = 80, 53
# UDP: a connected socket's port and its client's; a port no socket has.
UDP_CONNECTED_PORT, UDP_CLIENT_PORT, UDP_NO_SOCKET_PORT = 54, 41000, 55


def hop_frame(inner: bytes, *, v6: bool = False, hops: int = GUE_HOPS_INITIAL,
              nxt: str | None = None, ttl: int = 64) -> bytes:
    """What the balancer sends a backend: the inner packet with a second hop (NEXT unless
    `nxt`), the outer TTL / hop limit `ttl`."""
    hop = ipaddress.ip_address(nxt or (NEXT6 if v6 else NEXT4))
    gh = gue_second(hop, inner_v4=inner[0] >> 4 == 4, hops=hops)
    outer: Any = (IPv6(src=LB_SRC6, dst=SELF6, hlim=ttl) if v6
                  else IP(src=LB_SRC4, dst=SELF4, ttl=ttl, flags="DF"))
    return bytes(Ether(src=LB_MAC, dst=BACKEND_MAC) / outer
                 / UDP(sport=50000, dport=P.GUE_PORT, chksum=0) / Raw(gh + inner))


def tcp_in(sport: int, flags: str, v6: bool = False) -> bytes:
    ip: Any = (IPv6(src=SC_CLIENT6, dst=SC_VIP6) if v6 else IP(src=SC_CLIENT4, dst=SC_VIP4))
    return bytes(ip / TCP(sport=sport, dport=PORT, flags=flags, seq=7, ack=9) / Raw(b"data"))


def udp_in(sport: int, dport: int = UDP_PORT, v6: bool = False) -> bytes:
    ip: Any = (IPv6(src=SC_CLIENT6, dst=SC_VIP6) if v6 else IP(src=SC_CLIENT4, dst=SC_VIP4))
    return bytes(ip / UDP(sport=sport, dport=dport) / Raw(b"q"))


class Backend:
    """A namespace with the VIPs and a client address on lo and sockets that make lookups
    answer; everything runs in it (netns.call_in), since lookups use the caller's netns."""

    def __init__(self, name: str, decap: Decap) -> None:
        self.name = name
        self.decap = decap
        self.runners = {"xdp": TestRunner(decap.xdp_fd), "tc": TestRunner(decap.tc_fd)}
        self.socks: list[socket.socket] = []
        labnet.run(name, ["ip", "link", "set", "lo", "up"])
        for a in (f"{SC_VIP4}/32", f"{SC_CLIENT4}/32"):
            labnet.run(name, ["ip", "addr", "add", a, "dev", "lo"])
        for a in (f"{SC_VIP6}/128", f"{SC_CLIENT6}/128"):
            labnet.run(name, ["ip", "addr", "add", a, "dev", "lo", "nodad"])
        self.est_port = labnet.call_in(name, self._sockets)

    def _sockets(self) -> tuple[int, int, int]:
        ports = []
        for fam, vip, client in ((socket.AF_INET, SC_VIP4, SC_CLIENT4),
                                 (socket.AF_INET6, SC_VIP6, SC_CLIENT6)):
            lsn = socket.socket(fam, socket.SOCK_STREAM)
            lsn.bind((vip, PORT))
            lsn.listen(8)
            cli = socket.socket(fam, socket.SOCK_STREAM)
            cli.bind((client, 0))
            cli.connect((vip, PORT))
            srv, _ = lsn.accept()
            self.socks += [lsn, cli, srv]
            ports.append(cli.getsockname()[1])
        # UDP on each VIP: a bound (unconnected) socket on UDP_PORT, one connected to
        # (client, UDP_CLIENT_PORT) on UDP_CONNECTED_PORT; nothing on UDP_NO_SOCKET_PORT.
        for fam, vip, client in ((socket.AF_INET, SC_VIP4, SC_CLIENT4),
                                 (socket.AF_INET6, SC_VIP6, SC_CLIENT6)):
            bound = socket.socket(fam, socket.SOCK_DGRAM)
            bound.bind((vip, UDP_PORT))
            conn = socket.socket(fam, socket.SOCK_DGRAM)
            conn.bind((vip, UDP_CONNECTED_PORT))
            conn.connect((client, UDP_CLIENT_PORT))
            self.socks += [bound, conn]
        return ports[0], ports[1], 0

    def run(self, variant: str, frame: bytes) -> tuple[int, bytes, dict[str, int]]:
        before = self.decap.counters()
        out = labnet.call_in(self.name, self.runners[variant].run, frame)
        after = self.decap.counters()
        moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        return out.verdict, out.packet, moved

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    from tests.conftest import PREFIX

    name = f"{PREFIX}-sc"
    labnet.create(name)
    d = Decap()
    b = None
    try:
        d.add_local(SELF4)
        d.add_local(SELF6)
        b = Backend(name, d)
        yield b
    finally:
        if b is not None:
            b.close()
        d.close()
        labnet.delete(name)


VARIANTS = ["xdp", "tc"]
KEEP = {"xdp": XDP_PASS, "tc": TC_ACT_OK}
FORWARD = {"xdp": XDP_TX, "tc": TC_ACT_REDIRECT}


def kept_as(frame_out: bytes, inner: bytes) -> None:
    """The packet left decapsulated: Ethernet with the inner ethertype, then `inner`."""
    assert frame_out[14:] == inner
    assert frame_out[12:14] == (b"\x08\x00" if inner[0] >> 4 == 4 else b"\x86\xdd")


@pytest.mark.parametrize("variant", VARIANTS)
def test_decap_keeps_a_syn(backend: Backend, variant: str) -> None:
    inner = tcp_in(41234, "S")
    verdict, out, moved = backend.run(variant, hop_frame(inner))
    assert verdict == KEEP[variant]
    kept_as(out, inner)
    assert moved == {"DECAP_STAT_GUE_V4": 1, "DECAP_STAT_SC_KEEP_SYN": 1}


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decap_keeps_a_packet_of_a_local_socket(backend: Backend, variant: str, v6: bool) -> None:
    port = backend.est_port[1 if v6 else 0]
    inner = tcp_in(port, "A", v6=v6)
    verdict, out, moved = backend.run(variant, hop_frame(inner, v6=v6))
    assert verdict == KEEP[variant]
    kept_as(out, inner)
    assert moved == {"DECAP_STAT_GUE_V6" if v6 else "DECAP_STAT_GUE_V4": 1,
                     "DECAP_STAT_SC_KEEP_SOCKET": 1}


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decap_forwards_a_stranger_to_the_second_hop(backend: Backend, variant: str,
                                                     v6: bool) -> None:
    # Port 80 has a listener, but this ACK completes no cookie: not ours.
    inner = tcp_in(45678, "A", v6=v6)
    frame = hop_frame(inner, v6=v6)
    verdict, out, moved = backend.run(variant, frame)
    assert verdict == FORWARD[variant]
    assert moved == {"DECAP_STAT_SC_FORWARD": 1}
    got = Ether(out)
    assert (got.src, got.dst) == (BACKEND_MAC, LB_MAC)
    outer = got[IPv6] if v6 else got[IP]
    assert (outer.src, outer.dst) == ((SELF6, NEXT6) if v6 else (SELF4, NEXT4))
    if v6:
        assert outer.hlim == 63
    else:
        assert outer.ttl == 63
        fixed = IP(bytes(outer))
        fixed.chksum = None
        assert IP(bytes(fixed)).chksum == outer.chksum
    assert got[UDP].chksum == 0
    nxt = ipaddress.ip_address(NEXT6 if v6 else NEXT4)
    assert bytes(got[UDP].payload) == gue_second(nxt, inner[0] >> 4 == 4, 0) + inner


@pytest.mark.parametrize("variant", VARIANTS)
def test_decap_second_hop_keeps_what_has_no_hop_left(backend: Backend, variant: str) -> None:
    inner = tcp_in(45678, "A")
    verdict, out, moved = backend.run(variant, hop_frame(inner, hops=0))
    assert verdict == KEEP[variant]
    kept_as(out, inner)
    assert moved == {"DECAP_STAT_GUE_V4": 1, "DECAP_STAT_SC_KEEP_LAST": 1}


def _cookie_syn_ack(sport: int) -> tuple[int, int]:
    """Send a SYN from SC_CLIENT4:sport to the listener on SC_VIP4:PORT through a raw socket
    (no client socket: the client's stack resets the answer) and return (our ISN, the
    SYN-ACK's sequence number), a SYN cookie while net.ipv4.tcp_syncookies is 2. Runs in the
    backend's namespace."""
    isn = 1_000_000
    syn = bytes(IP(src=SC_CLIENT4, dst=SC_VIP4) / TCP(sport=sport, dport=PORT, flags="S",
                                                      seq=isn))[20:]
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    try:
        raw.bind((SC_CLIENT4, 0))
        raw.settimeout(2)
        raw.sendto(syn, (SC_VIP4, 0))
        while True:
            got = IP(raw.recv(2048))
            th = got[TCP]
            if (got.src, th.sport, th.dport, th.flags) == (SC_VIP4, PORT, sport, "SA"):
                return isn, int(th.seq)
    finally:
        raw.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_decap_keeps_an_ack_completing_a_syn_cookie(backend: Backend, variant: str) -> None:
    # Cookies always (2): the listener answers the SYN with a cookie and keeps no request
    # socket, as under a SYN flood; bpf_tcp_check_syncookie then validates the client's ACK.
    key = "net.ipv4.tcp_syncookies"
    old = labnet.get_sysctl(backend.name, key)
    sport = 46000 if variant == "xdp" else 46001
    labnet.set_sysctls(backend.name, {key: 2})
    try:
        isn, cookie = labnet.call_in(backend.name, _cookie_syn_ack, sport)
        good = bytes(IP(src=SC_CLIENT4, dst=SC_VIP4) / TCP(
            sport=sport, dport=PORT, flags="A", seq=isn + 1, ack=cookie + 1) / Raw(b"data"))
        verdict, out, moved = backend.run(variant, hop_frame(good))
        assert verdict == KEEP[variant], "an ACK completing a valid cookie was passed on"
        kept_as(out, good)
        assert moved == {"DECAP_STAT_GUE_V4": 1, "DECAP_STAT_SC_KEEP_COOKIE": 1}
        # A cookie's top 8 bits count minutes (its low bits an MSS index, so +1 there is
        # another valid cookie): 16 minutes off is out of date.
        stale = (cookie + 1 + (16 << 24)) & 0xFFFFFFFF
        bad = bytes(IP(src=SC_CLIENT4, dst=SC_VIP4) / TCP(
            sport=sport, dport=PORT, flags="A", seq=isn + 1, ack=stale) / Raw(b"data"))
        verdict, _, moved = backend.run(variant, hop_frame(bad))
        assert verdict == FORWARD[variant], "an ACK with a wrong cookie was kept"
        assert moved == {"DECAP_STAT_SC_FORWARD": 1}
    finally:
        labnet.set_sysctls(backend.name, {key: old})


# Nothing to look up: kept as it is (the slot's backend, as without second chance).
OTHER_ROWS = [
    ("ICMP", bytes(IP(src=SC_CLIENT4, dst=SC_VIP4) / ICMP() / Raw(b"ping"))),
    ("IPv4 options", bytes(IP(src=SC_CLIENT4, dst=SC_VIP4, options=[IPOption_NOP()] * 4)
                           / TCP(sport=45678, dport=PORT, flags="A") / Raw(b"data"))),
    ("fragment", bytes(IP(src=SC_CLIENT4, dst=SC_VIP4, flags="MF")
                       / TCP(sport=45678, dport=PORT, flags="A") / Raw(b"data"))),
]


@pytest.mark.parametrize("inner", [r[1] for r in OTHER_ROWS], ids=[r[0] for r in OTHER_ROWS])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decap_keeps_what_it_cannot_look_up(backend: Backend, variant: str,
                                            inner: bytes) -> None:
    verdict, out, moved = backend.run(variant, hop_frame(inner))
    assert verdict == KEEP[variant], "passed on a packet it could not look up"
    kept_as(out, inner)
    assert moved == {"DECAP_STAT_GUE_V4": 1, "DECAP_STAT_SC_KEEP_OTHER": 1}


# UDP (docs/second-chance.md, UDP): only a connected socket names a flow. Rows: (description,
# inner packet, hops left, expected outcome: the decap counter it moves, kept or passed on).
UDP_ROWS = [
    ("v4 connected socket: kept", udp_in(UDP_CLIENT_PORT, UDP_CONNECTED_PORT),
     GUE_HOPS_INITIAL, "DECAP_STAT_SC_KEEP_SOCKET"),
    ("v6 connected socket: kept", udp_in(UDP_CLIENT_PORT, UDP_CONNECTED_PORT, v6=True),
     GUE_HOPS_INITIAL, "DECAP_STAT_SC_KEEP_SOCKET"),
    ("v4 other client of the connected socket's port: passed on",
     udp_in(UDP_CLIENT_PORT + 1, UDP_CONNECTED_PORT), GUE_HOPS_INITIAL,
     "DECAP_STAT_SC_FORWARD"),
    ("v4 unconnected socket: passed on", udp_in(42000), GUE_HOPS_INITIAL,
     "DECAP_STAT_SC_FORWARD"),
    ("v6 unconnected socket: passed on", udp_in(42000, v6=True), GUE_HOPS_INITIAL,
     "DECAP_STAT_SC_FORWARD"),
    ("v4 no socket: passed on", udp_in(42000, UDP_NO_SOCKET_PORT), GUE_HOPS_INITIAL,
     "DECAP_STAT_SC_FORWARD"),
    ("v6 no socket: passed on", udp_in(42000, UDP_NO_SOCKET_PORT, v6=True), GUE_HOPS_INITIAL,
     "DECAP_STAT_SC_FORWARD"),
    ("v4 no socket, no hop left (the second hop): kept", udp_in(42000, UDP_NO_SOCKET_PORT), 0,
     "DECAP_STAT_SC_KEEP_LAST"),
]


@pytest.mark.parametrize(("inner", "hops", "outcome"), [r[1:] for r in UDP_ROWS],
                         ids=[r[0] for r in UDP_ROWS])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decap_udp_kept_only_for_a_connected_socket(backend: Backend, variant: str,
                                                    inner: bytes, hops: int,
                                                    outcome: str) -> None:
    v6 = inner[0] >> 4 == 6
    verdict, out, moved = backend.run(variant, hop_frame(inner, hops=hops))
    if outcome == "DECAP_STAT_SC_FORWARD":
        assert verdict == FORWARD[variant], "a UDP packet no connected socket has was kept"
        assert moved == {outcome: 1}
        got = Ether(out)
        assert (got[IP].src, got[IP].dst) == (SELF4, NEXT4), "not passed on to the second hop"
        hop = ipaddress.ip_address(NEXT4)
        assert bytes(got[UDP].payload) == gue_second(hop, not v6, hops - 1) + inner
    else:
        assert verdict == KEEP[variant], f"not kept ({outcome})"
        kept_as(out, inner)
        assert moved == {"DECAP_STAT_GUE_V4": 1, outcome: 1}


# The hop limit: a packet that cannot go on is kept where it is, never looped.
LAST_ROWS = [
    ("the second hop is this host", {"nxt": SELF4}),
    ("the outer TTL would run out", {"ttl": 1}),
    ("v6: the second hop is this host", {"v6": True, "nxt": SELF6}),
    ("v6: the outer hop limit would run out", {"v6": True, "ttl": 1}),
]


@pytest.mark.parametrize("opts", [r[1] for r in LAST_ROWS], ids=[r[0] for r in LAST_ROWS])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decap_keeps_a_stranger_that_cannot_go_on(backend: Backend, variant: str,
                                                   opts: dict[str, Any]) -> None:
    inner = tcp_in(45678, "A")
    verdict, out, moved = backend.run(variant, hop_frame(inner, **opts))
    assert verdict == KEEP[variant], "passed on although it cannot go anywhere new"
    kept_as(out, inner)
    gue = "DECAP_STAT_GUE_V6" if opts.get("v6") else "DECAP_STAT_GUE_V4"
    assert moved == {gue: 1, "DECAP_STAT_SC_KEEP_LAST": 1}


@pytest.mark.parametrize("variant", VARIANTS)
def test_decap_strips_other_gue_variant0_headers(backend: Backend, variant: str) -> None:
    # A GUE header with private data that is not a second hop: stripped, nothing looked up.
    inner = tcp_in(45678, "A")
    gh = bytes([1, 4, 0, 0]) + b"\x12\x34\x00\x00"
    frame = bytes(Ether(src=LB_MAC, dst=BACKEND_MAC) / IP(src=LB_SRC4, dst=SELF4)
                  / UDP(sport=50000, dport=P.GUE_PORT, chksum=0) / Raw(gh + inner))
    verdict, out, moved = backend.run(variant, frame)
    assert verdict == KEEP[variant]
    kept_as(out, inner)
    assert moved == {"DECAP_STAT_GUE_V4": 1}
