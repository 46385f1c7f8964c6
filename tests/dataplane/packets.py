"""Packet builders and reference models for the balancer's packet tests.

Everything here is written from the documented behaviour in xdp/*.h, independently of the
C code: the RSS-friendly outer sources and GUE source port (xdp/balancer/encap.h), the expected
encapsulated frames and ICMP replies. The flow hashes (xdp/common/hash.h) are
lb/dataplane/flowhash.py's, which tests/kernel checks against the header. Constants that C
defines are read from the headers, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP, ICMPerror, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
)
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from lb.config import xdp_source_dir

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# MAC addresses: the frame comes from the router (PEER) to the LB; encapsulated frames go to
# the configured gateway (GW), deliberately different from PEER so the test tells them apart.
PEER_MAC = "02:00:00:00:00:aa"
LB_MAC = "02:00:00:00:00:01"
GW_MAC = "02:00:00:00:00:fe"

VIP4 = ipaddress.IPv4Address("198.18.0.10")
VIP4B = ipaddress.IPv4Address("198.18.0.11")
VIP6 = ipaddress.IPv6Address("2001:db8::10")
NONVIP4 = ipaddress.IPv4Address("198.18.9.9")
NONVIP6 = ipaddress.IPv6Address("2001:db8:9::9")
CLIENT4 = ipaddress.IPv4Address("198.18.2.1")
CLIENT6 = ipaddress.IPv6Address("2001:db8:2::1")
REAL4 = [ipaddress.IPv4Address(f"198.18.1.{i}") for i in range(1, 9)]
REAL6 = [ipaddress.IPv6Address(f"2001:db8:1::{i}") for i in range(1, 9)]
LB_SRC4 = ipaddress.IPv4Address("198.18.0.1")
LB_SRC6 = ipaddress.IPv6Address("2001:db8::1")
RSS4 = ipaddress.IPv4Network("198.19.0.0/16")
RSS6 = ipaddress.IPv6Network("2001:db8:ffff:ffff::/64")
GUE_PORT = 6080
ROUTER4 = ipaddress.IPv4Address("198.18.3.1")
ROUTER6 = ipaddress.IPv6Address("2001:db8:3::1")

ETH_HLEN = 14
IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41
IPPROTO_UDP = 17


def c_define(header: str, name: str) -> int:
    """The integer value of `#define NAME <literal>` in xdp/<header>."""
    text = (xdp_source_dir() / header).read_text()
    m = re.search(rf"^#define\s+{name}\s+(0x[0-9a-fA-F]+|[0-9]+)\s*$", text, re.M)
    if not m:
        raise LookupError(f"#define {name} not found in xdp/{header}")
    return int(m.group(1), 0)


GUE_SPORT_BASE = c_define("common/consts.h", "ENCAP_GUE_SPORT_BASE")
GUE_SPORT_MASK = c_define("common/consts.h", "ENCAP_GUE_SPORT_MASK")
ICMP_TTL = c_define("balancer/icmp.h", "ICMP_TTL")
# Minimum-MTU rules for how much of the original a too-big reply quotes (xdp/balancer/icmp.h).
ICMP4_QUOTE_MAX = 576 - 20 - 8
ICMP6_QUOTE_MAX = 1280 - 40 - 8


# --- outer header model (xdp/balancer/encap.h) ----------------------------------------------


def rss_src4(client: ipaddress.IPv4Address, sport: int, prefix: ipaddress.IPv4Network = RSS4
             ) -> ipaddress.IPv4Address:
    """RSS-friendly outer IPv4 source: /16 prefix, low 16 bits from client address and port."""
    c = int(client)
    low = ((c >> 16) ^ c ^ sport) & 0xFFFF
    return ipaddress.IPv4Address((int(prefix.network_address) & 0xFFFF0000) | low)


def rss_src6(client: IPAddress, sport: int, prefix: ipaddress.IPv6Network = RSS6
             ) -> ipaddress.IPv6Address:
    """RSS-friendly outer IPv6 source: /64 prefix, low 64 bits from client address and port."""
    raw = client.packed.ljust(16, b"\0")
    iid = bytes(x ^ y for x, y in zip(raw[:8], raw[8:], strict=True))
    iid = iid[:6] + bytes(x ^ y for x, y in zip(iid[6:], sport.to_bytes(2, "big"), strict=True))
    return ipaddress.IPv6Address(prefix.network_address.packed[:8] + iid)


def gue_sport(hash_value: int) -> int:
    """GUE source port of a flow with this flow hash."""
    return GUE_SPORT_BASE | (hash_value & GUE_SPORT_MASK)


def ether(vlan: int | None = None, *, src: str = PEER_MAC, dst: str = LB_MAC) -> Packet:
    """Ethernet header (plus an 802.1Q tag when `vlan` is given), addresses explicit."""
    eth = Ether(src=src, dst=dst)
    if vlan is not None:
        return eth / Dot1Q(vlan=vlan, prio=5)
    return eth


def l3_bytes(frame: bytes) -> bytes:
    """The IP packet of a frame (after Ethernet and at most one 802.1Q tag)."""
    off = ETH_HLEN + (4 if frame[12:14] == b"\x81\x00" else 0)
    return frame[off:]


def encapsulated(
    frame: bytes,
    backend: IPAddress,
    outer_src: IPAddress,
    *,
    gue_port: int | None = None,
    gue_src_port: int = 0,
) -> bytes:
    """The frame the balancer should send: `frame`'s IP packet inside an outer header."""
    vlan = Ether(frame)[Dot1Q].vlan if frame[12:14] == b"\x81\x00" else None
    inner = l3_bytes(frame)
    version = inner[0] >> 4
    if version == 4:
        tos, ttl = inner[1], inner[8]
        df = bool(inner[6] & 0x40)
        ip_len = struct.unpack("!H", inner[2:4])[0]
    else:
        tos = ((inner[0] & 0x0F) << 4) | (inner[1] >> 4)
        ttl = inner[7]
        df = False
        ip_len = 40 + struct.unpack("!H", inner[4:6])[0]
    payload: Packet = Raw(inner)
    # The outer length covers the IP packet as its header states it; Ethernet padding after
    # it stays behind the packet, untouched.
    if gue_port is not None:
        payload = UDP(sport=gue_src_port, dport=gue_port, chksum=0, len=8 + ip_len) / payload
    eth = ether(vlan, src=LB_MAC, dst=GW_MAC)
    if isinstance(eth.lastlayer(), Dot1Q):
        eth[Dot1Q].prio = Ether(frame)[Dot1Q].prio
    extra = 8 if gue_port is not None else 0
    if backend.version == 4:
        proto = IPPROTO_UDP if gue_port is not None else IPPROTO_IPIP
        outer: Packet = IP(src=str(outer_src), dst=str(backend), tos=tos, ttl=ttl, id=0,
                           flags="DF" if df else 0, proto=proto, len=20 + extra + ip_len)
    else:
        inner_nh = IPPROTO_IPIP if version == 4 else IPPROTO_IPV6
        nh = IPPROTO_UDP if gue_port is not None else inner_nh
        outer = IPv6(src=str(outer_src), dst=str(backend), tc=tos, fl=0, hlim=ttl, nh=nh,
                     plen=extra + ip_len)
    return bytes(eth / outer / payload)


def too_big_reply(frame: bytes, mtu: int) -> bytes:
    """The ICMP frag-needed / ICMPv6 packet-too-big the balancer answers `frame` with."""
    vlan = Ether(frame)[Dot1Q].vlan if frame[12:14] == b"\x81\x00" else None
    inner = l3_bytes(frame)
    eth = ether(vlan, src=LB_MAC, dst=PEER_MAC)
    if isinstance(eth.lastlayer(), Dot1Q):
        eth[Dot1Q].prio = Ether(frame)[Dot1Q].prio
    if inner[0] >> 4 == 4:
        ip_len = struct.unpack("!H", inner[2:4])[0]
        quote = inner[: min(ip_len, ICMP4_QUOTE_MAX)]
        src, dst = ipaddress.IPv4Address(inner[16:20]), ipaddress.IPv4Address(inner[12:16])
        reply: Packet = (IP(src=str(src), dst=str(dst), ttl=ICMP_TTL, id=0, tos=0)
                         / ICMP(type=3, code=4, nexthopmtu=mtu) / Raw(quote))
    else:
        ip_len = 40 + struct.unpack("!H", inner[4:6])[0]
        quote = inner[: min(ip_len, ICMP6_QUOTE_MAX)]
        src6, dst6 = ipaddress.IPv6Address(inner[24:40]), ipaddress.IPv6Address(inner[8:24])
        reply = (IPv6(src=str(src6), dst=str(dst6), hlim=ICMP_TTL, tc=0, fl=0)
                 / ICMPv6PacketTooBig(mtu=mtu) / Raw(quote))
    return bytes(eth / reply)


def echo_reply(frame: bytes) -> bytes:
    """The echo reply the balancer answers an echo request to a VIP address with."""
    pkt = Ether(frame)
    eth = pkt.copy()
    eth.src, eth.dst = pkt.dst, pkt.src
    if IP in pkt:
        ip = eth[IP]
        ip.src, ip.dst = pkt[IP].dst, pkt[IP].src
        ip.ttl = ICMP_TTL
        ip.chksum = None
        eth[ICMP].type = 0
        eth[ICMP].chksum = None
    else:
        ip6 = eth[IPv6]
        ip6.src, ip6.dst = pkt[IPv6].dst, pkt[IPv6].src
        ip6.hlim = ICMP_TTL
        req = pkt[ICMPv6EchoRequest]
        ip6.remove_payload()
        ip6.add_payload(ICMPv6EchoReply(id=req.id, seq=req.seq, data=req.data))
    return bytes(eth)


# --- checksum verification ------------------------------------------------------------------

# Layers whose checksum covers data a quote has cut short: never verified.
_QUOTED = (IPerror, TCPerror, UDPerror, ICMPerror, IPerror6)


def _layers(pkt: Packet) -> list[Packet]:
    out = []
    layer: Any = pkt
    while layer is not None and not isinstance(layer, Raw):
        out.append(layer)
        layer = layer.payload if layer.payload else None
    return out


def bad_checksums(frame: bytes) -> list[str]:
    """Names of the layers of `frame` whose checksum is wrong (GUE payloads included)."""
    bad = []
    pkt = Ether(frame)
    for i, layer in enumerate(_layers(pkt)):
        if isinstance(layer, _QUOTED):
            break
        for field in ("chksum", "cksum"):
            if field not in layer.fields:
                continue
            have = layer.getfieldval(field)
            if isinstance(layer, UDP) and have == 0:
                continue  # zero UDP checksum: GUE's outer header, documented
            clone = Ether(frame)
            _layers(clone)[i].setfieldval(field, None)
            want = _layers(Ether(bytes(clone)))[i].getfieldval(field)
            if have != want:
                bad.append(f"{layer.name} {field} {have:#06x} (should be {want:#06x})")
    return bad


def gue_inner(frame: bytes) -> Packet | None:
    """The IP packet carried in a GUE frame's UDP payload, parsed."""
    pkt = Ether(frame)
    if UDP not in pkt or pkt[UDP].dport != GUE_PORT:
        return None
    raw = bytes(pkt[UDP].payload)
    return IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)


# --- building blocks for the input packets --------------------------------------------------


def tcp4(src: IPAddress = CLIENT4, dst: IPAddress = VIP4, sport: int = 40000, dport: int = 80,
         flags: str = "S", vlan: int | None = None, payload: bytes = b"", **ip: Any) -> bytes:
    """An Ethernet/IPv4/TCP frame from the router to the LB."""
    return bytes(ether(vlan) / IP(src=str(src), dst=str(dst), **ip)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=1000) / Raw(payload))


def udp4(src: IPAddress = CLIENT4, dst: IPAddress = VIP4, sport: int = 40000, dport: int = 53,
         vlan: int | None = None, payload: bytes = b"q", **ip: Any) -> bytes:
    """An Ethernet/IPv4/UDP frame."""
    return bytes(ether(vlan) / IP(src=str(src), dst=str(dst), **ip)
                 / UDP(sport=sport, dport=dport) / Raw(payload))


def tcp6(src: IPAddress = CLIENT6, dst: IPAddress = VIP6, sport: int = 40000, dport: int = 80,
         flags: str = "S", vlan: int | None = None, payload: bytes = b"", **ip: Any) -> bytes:
    """An Ethernet/IPv6/TCP frame."""
    return bytes(ether(vlan) / IPv6(src=str(src), dst=str(dst), **ip)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=1000) / Raw(payload))


def udp6(src: IPAddress = CLIENT6, dst: IPAddress = VIP6, sport: int = 40000, dport: int = 53,
         vlan: int | None = None, payload: bytes = b"q", **ip: Any) -> bytes:
    """An Ethernet/IPv6/UDP frame."""
    return bytes(ether(vlan) / IPv6(src=str(src), dst=str(dst), **ip)
                 / UDP(sport=sport, dport=dport) / Raw(payload))


def frag_needed4(quoted_src: IPAddress = VIP4, quoted_dst: IPAddress = CLIENT4,
                 sport: int = 80, dport: int = 40000, proto: str = "tcp", mtu: int = 1400,
                 code: int = 4, vlan: int | None = None) -> bytes:
    """ICMP frag-needed from a router about a packet quoted_src -> quoted_dst (VIP -> client)."""
    l4: Packet = (TCP(sport=sport, dport=dport, flags="A", seq=5) if proto == "tcp"
                  else UDP(sport=sport, dport=dport))
    quoted = IP(src=str(quoted_src), dst=str(quoted_dst), flags="DF") / l4 / Raw(b"d" * 40)
    return bytes(ether(vlan) / IP(src=str(ROUTER4), dst=str(quoted_src))
                 / ICMP(type=3, code=code, nexthopmtu=mtu) / Raw(bytes(quoted)))


def packet_too_big6(quoted_src: IPAddress = VIP6, quoted_dst: IPAddress = CLIENT6,
                    sport: int = 80, dport: int = 40000, proto: str = "tcp", mtu: int = 1400,
                    vlan: int | None = None) -> bytes:
    """ICMPv6 packet-too-big from a router about a packet VIP -> client."""
    l4: Packet = (TCP(sport=sport, dport=dport, flags="A", seq=5) if proto == "tcp"
                  else UDP(sport=sport, dport=dport))
    quoted = IPv6(src=str(quoted_src), dst=str(quoted_dst)) / l4 / Raw(b"d" * 40)
    return bytes(ether(vlan) / IPv6(src=str(ROUTER6), dst=str(quoted_src))
                 / ICMPv6PacketTooBig(mtu=mtu) / Raw(bytes(quoted)))
