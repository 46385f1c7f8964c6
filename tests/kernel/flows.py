"""One tracked flow seeded straight into the maps, and a snapshot of what must survive.

The VIP's ring sends every new flow to backend 1, while the connection table pins the test
flow to backend 2: a packet that reaches backend 2 proves the tracked entry steered it.
Used by the restart test in two processes, so everything here is plain data.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

from lb.consts import STAT_INDEX, XDP_TX
from lb.dataplane.conntab import ConnTable
from lb.dataplane.flowhash import Flow5
from lb.dataplane.keys import set_addr
from lb.dataplane.loader import Balancer

VIP = ipaddress.IPv4Address("198.18.0.10")
CLIENT = ipaddress.IPv4Address("198.18.2.1")
SPORT, DPORT = 40001, 80
RING_BACKEND = ipaddress.IPv4Address("198.18.1.2")  # reals[1], every ring slot
CONN_BACKEND = ipaddress.IPv4Address("198.18.1.3")  # reals[2], the tracked flow's backend
CLIENT_MAC, LB_MAC, GW_MAC = "02:00:00:00:00:aa", "02:00:00:00:00:01", "02:00:00:00:00:fe"
LRU_HIT = STAT_INDEX["STAT_LRU_HIT"]
# Per-CPU counter values written on CPU 0; they must read back unchanged after a restart.
SEEDED_HITS, SEEDED_VIP_PACKETS = 11, 3


def write_config(
    path: Path, pin_dir: Path, state_dir: Path, *, gateway_mac: str | None = GW_MAC
) -> Path:
    """A TOML settings file for these tests (sizes of tests/conftest.py's TEST_CONFIG)."""
    mac = f'gateway_mac = "{gateway_mac}"\n' if gateway_mac else ""
    path.write_text(
        f'pin_dir = "{pin_dir}"\nstate_dir = "{state_dir}"\n'
        "[dataplane]\nring_size = 4099\nmax_vips = 16\nmax_reals = 64\nconn_table_size = 65536\n"
        f'[runtime]\n{mac}src_v4 = "198.18.0.1"\nsrc_v6 = "2001:db8::1"\n'
        'rss_v4 = "198.19.0.0/16"\nrss_v6 = "2001:db8:0:7::/64"\n'
        "gue_port = 7000\nmax_frame = 1600\nudp_timeout_s = 12.5\n"
    )
    return path


#: The test flow (5-tuple as the client sent it).
FLOW = Flow5(CLIENT, VIP, SPORT, DPORT, socket.IPPROTO_TCP)


def seed(b: Balancer) -> None:
    """VIP tcp 198.18.0.10:80 (VIP number 0), two backends, the tracked flow, some counters."""
    for idx, addr in ((1, RING_BACKEND), (2, CONN_BACKEND)):
        real = b.reals.Leaf()
        set_addr(real.addr, addr)
        b.reals[b.reals.Key(idx)] = real
    for slot in range(b.config.ring_size):
        b.ch_rings[b.ch_rings.Key(slot)] = b.ch_rings.Leaf(1)
    b.vip_addrs[b.vip_addr_key(VIP)] = b.vip_addrs.Leaf(1)
    meta = b.vip_map.Leaf()
    meta.vip_num = 0
    b.vip_map[b.vip_key(VIP, DPORT, "tcp")] = meta
    with ConnTable(b) as table:
        table.insert(FLOW, 2, 0)
    hits = b.glob_stats.Leaf()
    hits[0] = SEEDED_HITS
    b.glob_stats[b.glob_stats.Key(LRU_HIT)] = hits
    vstats = b.vip_stats.Leaf()
    vstats[0].packets = SEEDED_VIP_PACKETS
    b.vip_stats[b.vip_stats.Key(0)] = vstats


def snapshot(b: Balancer) -> dict[str, Any]:
    """What a restart must keep: the tracked flow, the VIP, the ring, the counters."""
    with ConnTable(b) as table:
        conn = table.lookup(FLOW)
    return {
        "conn_real": None if conn is None else conn.real_idx,
        "vip_present": b.vip_map.get(b.vip_key(VIP, DPORT, "tcp")) is not None,
        "ring_slot_0": int(b.ch_rings[b.ch_rings.Key(0)].value),
        "lru_hits": sum(int(v) for v in b.glob_stats[b.glob_stats.Key(LRU_HIT)]),
        "vip_packets": sum(int(v.packets) for v in b.vip_stats[b.vip_stats.Key(0)]),
    }


SEEDED = {
    "conn_real": 2,
    "vip_present": True,
    "ring_slot_0": 1,
    "lru_hits": SEEDED_HITS,
    "vip_packets": SEEDED_VIP_PACKETS,
}


def packet(lb_mac: str = LB_MAC) -> bytes:
    """A mid-flow TCP ACK of the tracked flow (not a SYN, so the ring is not consulted), to
    the LB's MAC `lb_mac` (an attached program balances only frames to its interface's)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(
        Ether(src=CLIENT_MAC, dst=lb_mac)
        / IP(src=str(CLIENT), dst=str(VIP))
        / TCP(sport=SPORT, dport=DPORT, flags="A", seq=1000, ack=2000)
        / (b"x" * 16)
    )


def backend_of(verdict: int, out: bytes) -> str | None:
    """The outer destination of a forwarded packet, or None when it was not sent."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    if verdict != XDP_TX:
        return None
    return str(Ether(out)[IP].dst)

