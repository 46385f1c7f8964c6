"""Random and mutated frames through the balancer: it never aborts, never grows a frame past
the largest encapsulation, and never changes a frame it does not send.

Templates reach every deep path (VIPs of every kind are seeded: IPIP, GUE, IPv4-in-IPv6,
port 0, LRU bypass, hash-src-only, empty ring slots, an IPv6 VIP with an IPv4 backend),
then get truncated at every header boundary, their IHL and length fields rewritten, bits
flipped, garbage appended, or are replaced by random bytes. The seed is printed; set
XLB_FUZZ_SEED to replay a failure.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw

from lb.consts import (
    F_ENCAP_GUE,
    F_HASH_SRC_ONLY,
    F_LRU_BYPASS,
    F_SRC_LB,
    VERDICT_NAMES,
    XDP_ABORTED,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
)
from tests.dataplane import packets as P
from tests.dataplane.lab import Flow, Lab

pytestmark = pytest.mark.bpf

RUNS = 30_000
# Largest growth of a frame: GUE over IPv6 (40 + 8); a too-big reply adds at most the same
# (IPv6 + ICMPv6 = 48 in front of a quote no longer than the original packet).
MAX_GROWTH = 48
ENCAP_GROWTH = {20, 28, 40, 48}
#: Frames up to this length keep their padding (xdp/balancer/encap.h ENCAP_KEEP_PAD).
ENCAP_KEEP_PAD = 64
# BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header.
MIN_FRAME = 14
MAX_FRAME = 1600

V4 = [P.VIP4, P.VIP4B, ipaddress.IPv4Address("198.18.0.12"),
      ipaddress.IPv4Address("198.18.0.13")]
V6 = [P.VIP6, ipaddress.IPv6Address("2001:db8::11"), ipaddress.IPv6Address("2001:db8::12")]


def _seed_maps(lab: Lab) -> None:
    # Backends 1-4 IPv4, 5-8 IPv6; 9 is referenced by rings but never programmed.
    for i in range(4):
        lab.real(1 + i, P.REAL4[i])
        lab.real(5 + i, P.REAL6[i])
    lab.vip(V4[0], 80, "tcp", num=0)
    lab.ring(0, [1, 2, 5, 0, 9])
    lab.vip(V4[0], 53, "udp", num=1, flags=F_ENCAP_GUE)
    lab.ring(1, [1, 6, 3])
    lab.vip(V4[1], 0, "tcp", num=2, flags=F_LRU_BYPASS | F_SRC_LB)
    lab.ring(2, [2, 4])
    lab.vip(V4[1], 0, "udp", num=3, flags=F_HASH_SRC_ONLY)
    lab.ring(3, [3, 7])
    lab.vip(V4[2], 443, "tcp", num=4, flags=F_ENCAP_GUE | F_SRC_LB)
    lab.ring(4, [5, 6])
    lab.vip(V6[0], 80, "tcp", num=5)
    lab.ring(5, [5, 6, 0, 2])  # 2 is IPv4: IPv6 VIP, IPv4 backend
    lab.vip(V6[0], 0, "udp", num=6, flags=F_ENCAP_GUE)
    lab.ring(6, [7, 8])
    lab.vip(V6[1], 443, "tcp", num=7, flags=F_LRU_BYPASS | F_HASH_SRC_ONLY)
    lab.ring(7, [8])
    lab.vip(V6[2], 0, "tcp", num=8, flags=F_ENCAP_GUE | F_SRC_LB)
    lab.ring(8, [5, 9])
    lab.vip(V6[2], 53, "udp", num=9)
    lab.ring(9, [1, 5])  # 1 is IPv4: half the flows cannot be encapsulated
    lab.conn(Flow(P.CLIENT4, V4[0], 40000, 80), 3)
    lab.conn(Flow(P.CLIENT6, V6[0], 40000, 80), 8)
    lab.conn(Flow(P.CLIENT4, V4[0], 40001, 53, "udp"), 2, age_s=100)


def _eth(rng: random.Random) -> Packet:
    return P.ether(rng.choice([None, None, None, 7]))


def _templates(rng: random.Random) -> list[bytes]:
    """Frames that reach every branch of the program, before mutation."""
    out: list[Packet] = []
    c4, c6 = str(P.CLIENT4), str(P.CLIENT6)
    for _ in range(3):
        for vip in [*V4, P.NONVIP4]:
            for dport in (80, 53, 443, 8080):
                for flags in ("S", "A", "R", "PA"):
                    out.append(_eth(rng) / IP(src=c4, dst=str(vip), tos=rng.randrange(256),
                                              flags=rng.choice([0, "DF"]))
                               / TCP(sport=rng.choice([40000, 40001, 5000]), dport=dport,
                                     flags=flags) / Raw(b"t" * rng.choice([0, 10, 1460])))
                out.append(_eth(rng) / IP(src=c4, dst=str(vip))
                           / UDP(sport=rng.choice([40001, 6080]), dport=dport)
                           / Raw(b"u" * rng.choice([0, 20, 1472])))
            out.append(_eth(rng) / IP(src=c4, dst=str(vip)) / ICMP(id=rng.randrange(65536)))
            out.append(_eth(rng) / IP(src=c4, dst=str(vip), flags="MF")
                       / TCP(dport=80) / Raw(b"f" * 24))
            out.append(_eth(rng) / IP(src=c4, dst=str(vip), frag=rng.randrange(1, 8000))
                       / Raw(b"f" * 24))
            out.append(_eth(rng) / IP(src=c4, dst=str(vip), options=[IPOption_RR()])
                       / TCP(dport=80))
            for proto in ("tcp", "udp"):
                out.append(Ether(P.frag_needed4(quoted_src=vip, proto=proto,
                                                sport=rng.choice([80, 53, 443, 8080]))))
            out.append(_eth(rng) / IP(src=c4, dst=str(vip)) / UDP(sport=50000, dport=6080)
                       / Raw(bytes(rng.randrange(256) for _ in range(rng.randrange(60)))))
        # Half of ring 9's slots name an IPv4 backend: enough flows that some reach
        # STAT_ENCAP_FAIL (an IPv6 VIP, an IPv4 backend) whatever the seed.
        out += [_eth(rng) / IPv6(src=c6, dst=str(V6[2])) / UDP(sport=41000 + k, dport=53)
                for k in range(6)]
        for vip6 in [*V6, P.NONVIP6]:
            for dport in (80, 53, 443):
                out.append(_eth(rng) / IPv6(src=c6, dst=str(vip6), tc=rng.randrange(256))
                           / TCP(sport=40000, dport=dport, flags=rng.choice(["S", "A", "R"]))
                           / Raw(b"t" * rng.choice([0, 10, 1440])))
                out.append(_eth(rng) / IPv6(src=c6, dst=str(vip6))
                           / UDP(sport=rng.randrange(1024, 65536), dport=dport)
                           / Raw(b"u" * rng.choice([0, 1452])))
            out.append(_eth(rng) / IPv6(src=c6, dst=str(vip6)) / ICMPv6EchoRequest(id=3))
            out.append(_eth(rng) / IPv6(src=c6, dst=str(vip6)) / ICMPv6DestUnreach()
                       / Raw(b"x" * 48))
            for proto in ("tcp", "udp"):
                out.append(Ether(P.packet_too_big6(quoted_src=vip6, proto=proto,
                                                   sport=rng.choice([80, 53, 443]))))
            for ext in (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(),
                        IPv6ExtHdrFragment(m=1), IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment()):
                out.append(_eth(rng) / IPv6(src=c6, dst=str(vip6)) / ext / TCP(dport=80))
            out.append(_eth(rng) / IPv6(src=c6, dst=str(vip6)) / UDP(sport=50000, dport=6080)
                       / Raw(bytes(rng.randrange(256) for _ in range(rng.randrange(60)))))
            out.append(_eth(rng) / IPv6(src=c6, dst=str(vip6))
                       / ICMPv6PacketTooBig(mtu=1280) / Raw(b"\x60" + b"\0" * 10))
    out.append(_eth(rng) / ARP())
    out.append(Ether(src=P.PEER_MAC, dst=P.LB_MAC) / Dot1Q(vlan=1) / Dot1Q(vlan=2)
               / IP(dst=str(P.VIP4)) / TCP(dport=80))
    return [bytes(p) for p in out]


def _boundaries(frame: bytes) -> list[int]:
    """Offsets where a header ends (Ethernet, VLAN, IP, transport, ICMP quote)."""
    l2 = 18 if frame[12:14] == b"\x81\x00" else 14
    cuts = [12, 14, l2]
    ver = frame[l2] >> 4 if len(frame) > l2 else 0
    ip_hdr = 20 if ver == 4 else 40
    cuts += [l2 + 1, l2 + ip_hdr - 1, l2 + ip_hdr]
    for extra in (4, 8, 13, 14, 20):
        cuts.append(l2 + ip_hdr + extra)
    for quote in (0, 4, ip_hdr, ip_hdr + 4):
        cuts.append(l2 + ip_hdr + 8 + quote)
        cuts.append(l2 + ip_hdr + 8 + quote - 1)
    return sorted({c for c in cuts if MIN_FRAME <= c < len(frame)})


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    raw = bytearray(frame)
    l2 = 18 if raw[12:14] == b"\x81\x00" else 14
    kind = rng.randrange(10)
    if kind == 0 and len(raw) > l2:  # IHL / version nibble
        raw[l2] = (raw[l2] & 0xF0) | rng.randrange(16) if rng.random() < 0.7 else rng.randrange(256)
    elif kind == 1 and len(raw) > l2 + 6:  # IPv4 total length or IPv6 payload length
        off = l2 + (2 if raw[l2] >> 4 == 4 else 4)
        raw[off:off + 2] = struct.pack("!H", rng.choice(
            [0, 1, 19, 20, 27, 28, 40, 47, 48, len(raw) - l2, len(raw) - l2 + 1, 65535,
             rng.randrange(65536)]))
    elif kind == 2:  # random truncation
        raw = raw[: rng.randrange(MIN_FRAME, len(raw) + 1)]
    elif kind == 3:  # garbage appended
        raw += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif kind == 4:  # bit flips in the headers
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(min(len(raw), 120))
            raw[i] ^= 1 << rng.randrange(8)
    elif kind == 5 and len(raw) > l2 + 9:  # protocol / next header
        off = l2 + (9 if raw[l2] >> 4 == 4 else 6)
        raw[off] = rng.choice([0, 1, 4, 6, 17, 41, 43, 44, 47, 50, 58, 59, 60, rng.randrange(256)])
    elif kind == 6 and len(raw) > l2 + 20:  # fragment fields
        raw[l2 + 6:l2 + 8] = struct.pack("!H", rng.randrange(65536))
    elif kind == 7:  # EtherType
        raw[l2 - 2:l2] = rng.choice([b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x88\xa8"])
    elif kind == 8 and len(raw) > l2 + 48:  # ICMP quote fields (inner version, lengths)
        i = rng.randrange(l2 + 28, min(len(raw), l2 + 100))
        raw[i] = rng.randrange(256)
    else:  # random bytes after the Ethernet header
        raw[l2:] = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
    return bytes(raw[:MAX_FRAME])


def _frames(rng: random.Random, templates: list[bytes]) -> list[bytes]:
    frames = list(templates)
    for t in templates:
        frames += [t[:cut] for cut in _boundaries(t)]
    while len(frames) < RUNS:
        r = rng.random()
        if r < 0.2:
            frame = rng.choice(templates)
        elif r < 0.85:
            frame = rng.choice(templates)
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                frame = _mutate(rng, frame)
        else:
            ethertype = rng.choice([b"\x08\x00", b"\x86\xdd", b"\x81\x00", bytes(2)])
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            if ethertype in (b"\x08\x00", b"\x86\xdd") and body and rng.random() < 0.5:
                body = bytes([0x45 if ethertype == b"\x08\x00" else 0x60]) + body[1:]
            frame = bytes.fromhex(P.LB_MAC.replace(":", "")) + bytes(6) + ethertype + body
        frames.append(frame)
    return frames


def _check(frame: bytes, verdict: int, out: bytes) -> str | None:
    """What is wrong with the program's answer to `frame`, if anything."""
    if verdict == XDP_ABORTED:
        return "XDP_ABORTED"
    if verdict not in (XDP_PASS, XDP_DROP, XDP_TX):
        return f"unexpected verdict {verdict}"
    if len(out) > len(frame) + MAX_GROWTH:
        return f"output {len(out)} bytes for a {len(frame)}-byte input"
    if verdict != XDP_TX:
        return None if out == frame else f"{VERDICT_NAMES[verdict]} but the frame was changed"
    gw = bytes.fromhex(P.GW_MAC.replace(":", ""))
    if out[:6] == gw:
        l2 = 18 if frame[12:14] == b"\x81\x00" else 14
        # Only the IP packet is sent on: a trailer after it is trimmed, but the padding of a
        # frame of at most 64 bytes stays behind the outer packet (xdp/balancer/encap.h).
        if frame[l2 - 2 : l2] == b"\x08\x00":
            ip_len = int.from_bytes(frame[l2 + 2 : l2 + 4], "big")
        else:
            ip_len = 40 + int.from_bytes(frame[l2 + 4 : l2 + 6], "big")
        pad = frame[l2 + ip_len :] if len(frame) <= ENCAP_KEEP_PAD else b""
        if not out.endswith(pad):
            return "the padding of a minimum-size frame was not kept"
        out = out[: len(out) - len(pad)]
        grow = len(out) - (l2 + ip_len)
        if grow not in ENCAP_GROWTH:
            return f"encapsulation added {grow} bytes"
        if out[l2 + grow:] != frame[l2 : l2 + ip_len]:
            return "the encapsulated packet differs from the original"
        if out[6:12] != frame[0:6]:
            return "encapsulated frame's source MAC is not the original destination MAC"
        return None
    if out[:6] != frame[6:12]:
        return "XDP_TX frame is neither encapsulated nor a reply to the sender"
    return None


@pytest.mark.parametrize("max_frame", [1514, 300])
def test_fuzz_never_aborts_or_grows_past_the_largest_encap(lab: Lab, max_frame: int) -> None:
    env = os.environ.get("XLB_FUZZ_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(1 << 32)
    print(f"fuzz seed {seed} (replay: XLB_FUZZ_SEED={seed})")
    rng = random.Random(seed)
    lab.config(max_frame=max_frame)
    _seed_maps(lab)
    frames = _frames(rng, _templates(rng))
    assert len(frames) >= 20_000
    verdicts = dict.fromkeys((XDP_PASS, XDP_DROP, XDP_TX), 0)
    run = lab.runner.run
    started = time.monotonic()
    for i, frame in enumerate(frames):
        res = run(frame)
        problem = _check(frame, res.verdict, res.packet)
        assert problem is None, (
            f"{problem}; frame #{i} (XLB_FUZZ_SEED={seed}, max_frame={max_frame}): "
            f"{frame.hex()} -> {res.packet.hex()}")
        verdicts[res.verdict] += 1
    elapsed = time.monotonic() - started
    print(f"{len(frames)} frames in {elapsed:.1f} s: "
          + ", ".join(f"{VERDICT_NAMES[v]} {n}" for v, n in verdicts.items()))
    counters = lab.counters()
    # The deep paths were reached, not just the parser.
    for slot in ("STAT_ICMP_FWD", "STAT_ICMP_ECHO", "STAT_TOO_BIG", "STAT_FRAG",
                 "STAT_IP_OPTIONS", "STAT_NO_BACKEND", "STAT_ENCAP_FAIL", "STAT_LRU_HIT",
                 "STAT_MALFORMED", "STAT_PASS_NOT_IP", "STAT_PASS_ICMP"):
        assert counters[slot] > 0, f"the fuzz never reached {slot} (seed {seed})"
    assert counters["STAT_XDP_TX"] == verdicts[XDP_TX]
