"""Flow explain: where the live program sends one flow, and why.

The question "which backend gets client C's flow to VIP V, and why?" is answered by the
program itself: a packet of that flow is synthesised and run with BPF_PROG_TEST_RUN
(lb.dataplane.testrun), and the outer destination of the frame it sends back is the backend.
It runs through the balancer's own instructions loaded a second time with private counter
maps (lb.dataplane.shadow): every map that steers (VIPs, rings, backends, connection table,
lb_cfg) is the live one, but the packet is never counted as traffic in the VIP, backend or
global statistics, and the counters reported with the answer are exactly the ones this
packet moved, whatever other traffic flows meanwhile.

Why is read from the flow's own connection-table slot, never from a shared counter: the
program follows the flow's entry when it has one that is live (not past its idle timeout)
and names a backend that is still present, on a VIP that uses the table (`conn_table`);
otherwise the Maglev ring slot chose (`ring`). The slot is read before the run and again
after it (a hit keeps the entry's backend).

Side effects, and how they are undone:

- TCP: the packet is an ACK, never a SYN, so it is explained as the flow's next packet.
- A run that misses the table inserts the flow (any miss but a TCP RST or FIN does),
  possibly in the slot of another flow of its set (a full set evicts its least recently
  seen flow). When the flow had no live entry before the run, the set gets its previous
  content back afterwards (ConnTable.restoring; an expired entry of the flow is written
  back as it was), so explaining leaves no trace. A real packet of the very same flow
  arriving during the microseconds of the run would lose its fresh entry and be re-hashed
  to the same backend.
- A hit refreshes the entry's stamp, as the flow's next packet would.

Second chance (docs/second-chance.md): a packet that misses the table and hashes to a slot
whose backend changed within the VIP's window leaves with the slot's previous backend as
its second hop, read back from the GUE header of the frame sent (`second_hop`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Literal

from lb.consts import (
    CONN_STAMP_NS_SHIFT,
    F_LRU_BYPASS,
    GLOB_STATS,
    REAL_NONE,
    VERDICT_NAMES,
    XDP_PASS,
    XDP_TX,
)
from lb.control.model import vip_id
from lb.dataplane.conntab import STAMP_S, ConnEntry, tcp_timeout_ns, udp_timeout_ns
from lb.dataplane.flowhash import Flow5
from lb.dataplane.keys import IPAddress, proto_name, raw_addr
from lb.dataplane.loader import Balancer
from lb.dataplane.shadow import ShadowProgram
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
    #: Global counters this packet moved (counted apart from the traffic's).
    counters: dict[str, int] = field(default_factory=dict)
    #: The second hop the frame carries (second chance), None when it carries none.
    second_hop: str | None = None


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_packet(flow: Flow5, dst_mac: bytes = DST_MAC) -> bytes:
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
    return dst_mac + SRC_MAC + struct.pack("!H", ethertype) + ip + l4


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


# GUE second-hop header (xdp/common/gue.h) after an outer IPv4 / IPv6 + UDP header.
_GUE_PRIV_SECOND = 0x786C
_GUE_AT = {ETH_P_IP: 14 + 20 + 8, ETH_P_IPV6: 14 + 40 + 8}


def second_hop_of(frame: bytes) -> IPAddress | None:
    """The second hop named by a GUE frame the balancer sent, or None."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    at = _GUE_AT.get(ethertype)
    if at is None or len(frame) < at + 8 or frame[at] >> 6 != 0:
        return None
    size = 4 if ethertype == ETH_P_IP else 16
    ptype, _hops, _family = struct.unpack("!HBB", frame[at + 4 : at + 8])
    if ptype != _GUE_PRIV_SECOND or len(frame) < at + 8 + size:
        return None
    return ipaddress.ip_address(frame[at + 8 : at + 8 + size])


class Explainer:
    """Explains flows on one loaded balancer."""

    def __init__(self, balancer: Balancer, reader: StatsReader | None = None) -> None:
        self._b = balancer
        self._reader = reader or StatsReader(balancer)
        self._shadow: ShadowProgram | None = None

    def _vip(self, flow: Flow5) -> tuple[str, int] | None:
        """(VIP id, flags) of the VIP the flow's packets meet, None when there is none."""
        vip_map = self._b.vip_map
        for port in (flow.dport, 0):
            key = self._b.vip_key(flow.dst, port, flow.proto)
            try:
                meta = vip_map[key]
            except KeyError:
                continue
            return vip_id(proto_name(flow.proto), flow.dst, port), int(meta.flags)
        return None

    def _serves(self, entry: ConnEntry) -> bool:
        """Whether the program follows this entry (lb_pick): live, naming a present backend."""
        age = round(entry.age_s / STAMP_S)
        if entry.udp:
            if age > udp_timeout_ns(self._b) >> CONN_STAMP_NS_SHIFT:
                return False
        else:
            tcp = tcp_timeout_ns(self._b) >> CONN_STAMP_NS_SHIFT
            if tcp and age > tcp:
                return False
        if entry.real_idx == REAL_NONE:
            return False
        reals = self._b.reals
        try:
            real = reals[reals.Key(entry.real_idx)]
        except (KeyError, IndexError):
            return False
        return any(raw_addr(real.addr))

    def _program(self) -> ShadowProgram:
        """The shadow of the program now loaded (loaded again after an upgrade)."""
        if self._shadow is None or self._shadow.prog_id != self._b.prog_id:
            if self._shadow is not None:
                self._shadow.close()
            self._shadow = ShadowProgram(self._b)
        return self._shadow

    def _glob(self, shadow: ShadowProgram) -> list[int]:
        return [shadow.words("glob_stats", i)[0] for i in range(len(GLOB_STATS))]

    def _dst_mac(self) -> bytes:
        """The interface's MAC when the program knows it (it balances only frames to it)."""
        mac = bytes(self._b.lb_cfg[self._b.lb_cfg.Key(0)].lb_mac)
        return mac if any(mac) else DST_MAC

    def close(self) -> None:
        """Release the shadow program."""
        if self._shadow is not None:
            self._shadow.close()
            self._shadow = None

    def explain(self, flow: Flow5) -> Explanation:
        """Run one packet of `flow` through the live program's logic and tell what happened."""
        names = {i: a for a, i in self._reader.real_indices().items()}
        table = self._reader.conn_table()
        vip = self._vip(flow)
        packet = build_packet(flow, self._dst_mac())
        with _lock:
            shadow = self._program()
            before = table.lookup(flow)
            live = (
                before is not None
                and vip is not None
                and not vip[1] & F_LRU_BYPASS
                and self._serves(before)
            )
            with contextlib.nullcontext() if live else table.restoring(flow):
                g0 = self._glob(shadow)
                result = TestRunner(shadow.prog_fd).run(packet)
                g1 = self._glob(shadow)
                after = table.lookup(flow)
                if before is not None and not live:
                    # The run may have replaced the flow's expired entry: put it back.
                    table.insert(flow, before.real_idx, before.vip_num, udp=before.udp,
                                 closing=before.closing, age_s=before.age_s)  # fmt: skip
        moved = {n: b - a for n, a, b in zip(GLOB_STATS, g0, g1, strict=True) if b != a}
        verdict = VERDICT_NAMES.get(result.verdict, str(result.verdict))
        backend: str | None = None
        encap: Literal["ipip", "gue"] | None = None
        outer_source: str | None = None
        second: IPAddress | None = None
        if result.verdict == XDP_TX:
            outer = _outer(result.packet)
            if outer is not None:
                backend, outer_source, encap = str(outer[1]), str(outer[0]), outer[2]
                if encap == "gue":
                    second = second_hop_of(result.packet)
        reason: Reason
        if vip is None:
            reason = "not_a_vip"
        elif backend is not None:
            # The flow's own slot decides: a live entry before the run that still names the
            # backend the packet went to after it.
            followed = (
                live
                and before is not None
                and after is not None
                and after.real_idx == before.real_idx
                and names.get(before.real_idx) == backend
            )
            reason = "conn_table" if followed else "ring"
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
            vip_id=vip[0] if vip is not None else None,
            in_conn_table=before is not None,
            conn_table_backend=names.get(before.real_idx) if before is not None else None,
            encap=encap,
            outer_source=outer_source,
            counters=moved,
            second_hop=None if second is None else str(second),
        )
