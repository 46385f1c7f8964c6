"""Flow explain: where the live program sends one flow, and why.

The question "which backend gets client C's flow to VIP V, and why?" is answered by the
program itself: a packet of that flow is synthesised and run through the loaded balancer with
BPF_PROG_TEST_RUN (lb.dataplane.testrun), and the outer destination of the frame it sends back is
the backend. Why is read from the connection table: when the flow has an entry the program
follows it (`conn_table`); otherwise the Maglev ring slot chose (`ring`). The STAT_LRU_HIT
counter's delta during the run confirms it.

Side effects, and how they are undone:

- TCP: the packet is an ACK, never a SYN, so it is explained as the flow's next packet.
- A run that misses the table inserts the flow (any miss but a TCP RST does, as Katran
  does), possibly in the slot of another flow of its set (a full set evicts its least
  recently seen flow). When the flow had no entry before the run, the slot gets its previous
  content back afterwards (ConnTable.restoring), so explaining leaves no trace. A real
  packet of the very same flow arriving during the microseconds of the run would lose its
  fresh entry and be re-hashed to the same backend.
- A hit refreshes the entry's stamp, as the flow's next packet would.
- Counters: the run counts like a real packet (one packet and its bytes on the VIP and the
  backend, the global verdict counters). Explaining is rare; the counters are not rolled
  back, since per-CPU counters cannot be decremented safely while the program runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Literal

from lb.consts import VERDICT_NAMES, XDP_PASS, XDP_TX
from lb.control.model import vip_id
from lb.dataplane.conntab import ConnTable
from lb.dataplane.flowhash import Flow5
from lb.dataplane.keys import IPAddress, proto_name
from lb.dataplane.loader import Balancer
from lb.dataplane.testrun import TestRunner
from lb.ops.stats import StatsReader

Reason = Literal["conn_table", "ring", "not_a_vip", "no_backend", "dropped", "passed"]

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
TCP_ACK = 0x10
#: Frames of the synthesised packet; locally administered, never on a wire.
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
PAYLOAD = b"xlb-explain"

_lock = threading.Lock()


@dataclass(frozen=True)
class Explanation:
    """What the program did with one packet of a flow, and why."""

    flow: Flow5
    verdict: str
    reason: Reason
    backend: str | None
    vip_id: str | None
    #: True when the flow had a connection-table entry before the run.
    in_conn_table: bool
    #: Backend the connection-table entry named before the run (None: no entry).
    conn_table_backend: str | None
    #: Outer header of the frame sent (encapsulation, outer source), when forwarded.
    encap: Literal["ipip", "gue"] | None
    outer_source: str | None
    #: Global counters that moved during the run (concurrent traffic may add to them).
    counters: dict[str, int] = field(default_factory=dict)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_packet(flow: Flow5) -> bytes:
    """An Ethernet frame of the flow: a TCP ACK or a UDP datagram with a short payload."""
    proto = flow.proto
    if proto == socket.IPPROTO_TCP:
        l4 = struct.pack(
            "!HHIIBBHHH",
            flow.sport,
            flow.dport,
            1,
            1,
            5 << 4,
            TCP_ACK,
            65535,
            0,
            0,
        )
    else:
        l4 = struct.pack("!HHHH", flow.sport, flow.dport, 8 + len(PAYLOAD), 0)
    l4 += PAYLOAD
    src, dst = flow.src.packed, flow.dst.packed
    if flow.src.version == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(l4), proto)
    csum = _csum(pseudo + l4)
    off = 16 if proto == socket.IPPROTO_TCP else 6
    l4 = l4[:off] + struct.pack("!H", csum or 0xFFFF) + l4[off + 2 :]
    if flow.src.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        ethertype = ETH_P_IP
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst)
        ethertype = ETH_P_IPV6
    return DST_MAC + SRC_MAC + struct.pack("!H", ethertype) + ip + l4


def _outer(frame: bytes) -> tuple[IPAddress, IPAddress, Literal["ipip", "gue"]] | None:
    """(outer source, outer destination, encapsulation) of a frame the balancer sent."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == ETH_P_IP and len(frame) >= 34:
        proto = frame[23]
        src4, dst4 = ipaddress.IPv4Address(frame[26:30]), ipaddress.IPv4Address(frame[30:34])
        return src4, dst4, "gue" if proto == socket.IPPROTO_UDP else "ipip"
    if ethertype == ETH_P_IPV6 and len(frame) >= 54:
        proto = frame[20]
        src6, dst6 = ipaddress.IPv6Address(frame[22:38]), ipaddress.IPv6Address(frame[38:54])
        return src6, dst6, "gue" if proto == socket.IPPROTO_UDP else "ipip"
    return None


class Explainer:
    """Explains flows on one loaded balancer."""

    def __init__(self, balancer: Balancer, reader: StatsReader | None = None) -> None:
        self._b = balancer
        self._reader = reader or StatsReader(balancer)

    def _vip_id(self, flow: Flow5) -> str | None:
        vip_map = self._b.vip_map
        for port in (flow.dport, 0):
            key = self._b.vip_key(flow.dst, port, flow.proto)
            try:
                vip_map[key]
            except KeyError:
                continue
            return vip_id(proto_name(flow.proto), flow.dst, port)
        return None

    def _conn_entry(self, table: ConnTable, flow: Flow5) -> int | None:
        entry = table.lookup(flow)
        return None if entry is None else entry.real_idx

    def _glob_totals(self) -> dict[str, int]:
        return {name: sum(v) for name, v in self._reader.glob().items()}

    def explain(self, flow: Flow5) -> Explanation:
        """Run one packet of `flow` through the live program and tell what happened."""
        key = flow
        names = {i: a for a, i in self._reader.real_indices().items()}
        table = self._reader.conn_table()
        with _lock:
            before_idx = self._conn_entry(table, key)
            undo = table.restoring(key) if before_idx is None else contextlib.nullcontext()
            with undo:
                before = self._glob_totals()
                result = TestRunner(self._b.prog_fd).run(build_packet(flow))
                after = self._glob_totals()
        moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        verdict = VERDICT_NAMES.get(result.verdict, str(result.verdict))
        vip = self._vip_id(flow)
        backend: str | None = None
        encap: Literal["ipip", "gue"] | None = None
        outer_source: str | None = None
        if result.verdict == XDP_TX:
            outer = _outer(result.packet)
            if outer is not None:
                backend, outer_source, encap = str(outer[1]), str(outer[0]), outer[2]
        reason: Reason
        hit = moved.get("STAT_LRU_HIT", 0) > 0
        if vip is None:
            reason = "not_a_vip"
        elif backend is not None:
            reason = "conn_table" if before_idx is not None or hit else "ring"
        elif moved.get("STAT_NO_BACKEND", 0) > 0:
            reason = "no_backend"
        elif result.verdict == XDP_PASS:
            reason = "passed"
        else:
            reason = "dropped"
        return Explanation(
            flow=flow,
            verdict=verdict,
            reason=reason,
            backend=backend,
            vip_id=vip,
            in_conn_table=before_idx is not None,
            conn_table_backend=names.get(before_idx) if before_idx is not None else None,
            encap=encap,
            outer_source=outer_source,
            counters=moved,
        )
