"""Drain completion: the flows the connection table still sends to a backend.

A draining backend is out of the ring and keeps its tracked flows; it is drained once the
connection table tracks no live flow of the VIP to it. An entry counts when it names the
backend's index and the VIP's number (as vip_map holds it) and is live:

- TCP: open (not closing), or closing (the client sent FIN or RST; the data plane marks the
  entry and keeps refreshing its stamp, xdp/balancer/balancer.c) and seen less than
  `closing_grace_s` ago;
- UDP: seen within the UDP idle timeout of lb_cfg (30 s when unset).

Ages come from the entries' stamps, in units of 16.78 ms (docs/conn-table.md). The scan is
numpy over the table mapped into this process (lb.dataplane.conntab); it is a snapshot, so a
flow that starts or ends meanwhile may be missed or counted once more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lb.consts import CLOSING_GRACE_S
from lb.control.model import VipSpec
from lb.dataplane.conntab import ConnTable, live_flows, tcp_timeout_ns, udp_timeout_ns

if TYPE_CHECKING:
    from lb.dataplane.loader import Balancer


def vip_number(balancer: Balancer, vip: VipSpec) -> int | None:
    """The VIP's number as the data plane holds it (None: not programmed)."""
    leaf = balancer.vip_map.get(balancer.vip_key(vip.address, vip.port, vip.protocol))
    return None if leaf is None else int(leaf.vip_num)


def count_flows(
    balancer: Balancer,
    vip: VipSpec,
    real_idx: int,
    *,
    closing_grace_s: float = CLOSING_GRACE_S,
    later_s: float = 0.0,
    table: ConnTable | None = None,
) -> int:
    """Live flows of `vip` that the connection table sends to backend `real_idx`.

    `later_s` counts as if that many seconds had passed without a packet (for tests);
    `table` reuses a mapping of the connection table (one is made otherwise).
    """
    num = vip_number(balancer, vip)
    if num is None:
        return 0
    e = (table or ConnTable(balancer)).entries()
    mine = (e.real_idx == real_idx) & (e.vip_num == num)
    live = live_flows(e, udp_timeout_ns(balancer) / 1e9, tcp_timeout_ns(balancer) / 1e9,
                      closing_grace_s, later_s=later_s)  # fmt: skip
    return int((mine & live).sum())
