"""Drain completion: the flows the connection table still sends to a backend.

A draining backend is out of the ring and keeps its tracked flows; it is drained once the
connection table tracks no live flow of the VIP to it. An entry counts when it names the
backend's index, carries the VIP's destination (address, protocol, and port unless the VIP
is on every port), and is live:

- TCP: open (atime 0), or closing (the client sent FIN or RST, atime = when; see
  xdp/balancer.c) for less than `closing_grace_s`;
- UDP: seen within the UDP idle timeout of lb_cfg (30 s when unset).

The walk is one BPF_MAP_LOOKUP_BATCH per 4096 entries (lb.stats); it is a snapshot, so a
flow that starts or ends meanwhile may be missed or counted once more.
"""

from __future__ import annotations

import ctypes
import socket
import time
from typing import TYPE_CHECKING, Any

from lb.consts import FAMILY_V4, FAMILY_V6
from lb.model import VipSpec
from lb.stats import BATCH, lookup_batch

if TYPE_CHECKING:
    from lb.dataplane import Balancer

#: A closing TCP entry counts this long after the client's FIN or RST (the last ACKs).
CLOSING_GRACE_S = 2.0
#: UDP idle timeout when lb_cfg holds none (UDP_TIMEOUT_DEFAULT_S in xdp/consts.h).
UDP_TIMEOUT_DEFAULT_S = 30.0

_NS = 1_000_000_000


def udp_timeout_ns(balancer: Balancer) -> int:
    """The UDP idle timeout the data plane applies, in nanoseconds."""
    leaf = balancer.lb_cfg[balancer.lb_cfg.Key(0)]
    return int(leaf.udp_timeout_ns) or int(UDP_TIMEOUT_DEFAULT_S * _NS)


def count_flows(
    balancer: Balancer,
    vip: VipSpec,
    real_idx: int,
    *,
    closing_grace_s: float = CLOSING_GRACE_S,
    now_ns: int | None = None,
) -> int:
    """Live flows of `vip` that the connection table sends to backend `real_idx`."""
    now = time.monotonic_ns() if now_ns is None else now_ns  # bpf_ktime_get_ns's clock
    udp_ns = udp_timeout_ns(balancer)
    grace_ns = int(closing_grace_s * _NS)
    family = FAMILY_V4 if vip.address.version == 4 else FAMILY_V6
    dst = vip.address.packed.ljust(16, b"\0")
    proto = socket.IPPROTO_TCP if vip.protocol == "tcp" else socket.IPPROTO_UDP
    port = socket.htons(vip.port)
    n = 0
    table: Any = balancer.conn_table
    for keys, values, count in lookup_batch(table, BATCH, want_values=True):
        for i in range(count):
            v = values[i]
            if int(v.real_idx) != real_idx:
                continue
            k = keys[i]
            if int(k.family) != family or int(k.proto) != proto:
                continue
            if vip.port and int(k.dport) != port:
                continue
            if ctypes.string_at(ctypes.addressof(k.dst), 16) != dst:
                continue
            atime = int(v.atime)
            if proto == socket.IPPROTO_TCP:
                live = atime == 0 or now - atime < grace_ns
            else:
                live = now - atime < udp_ns
            n += live
    return n
