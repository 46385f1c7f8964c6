"""The daemon's event stream: one ring reader, many subscribers, none able to grow memory.

`EventHub` owns the balancer's ring (lb.dataplane.events) while anybody listens: a reader
thread polls it and offers every record to each `Subscription` whose `EventFilter` wants it.
A subscription is a bounded queue: when its reader is slow or gone, new records are dropped
and counted there (`dropped`), never queued. What the kernel samples is the union of what the
subscribers ask (types, capture, one VIP when they all name the same one; the smallest 1-in-N)
and is switched off when the last one leaves, so an unwatched balancer pays one word's read.
Records lost to a full ring are the kernel's count (`ring_lost`).

`describe` turns a record into what `lbctl monitor` and `GET /v1/events` show: the verdict,
its reason (the glob_stat name the counters use), the VIP, the flow, and for a forwarded
packet the backend (the outer destination of the frame as sent) and why it was chosen.
"""

from __future__ import annotations

import ipaddress
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lb.consts import STAT_INDEX, VERDICT_NAMES
from lb.dataplane.events import (
    ALL_TYPES,
    EV_CAPTURE,
    EV_F_FLOOD,
    EV_F_GUARD,
    EV_F_NEW_FLOW,
    EV_K_EVENT,
    EV_K_RX,
    EVENT_TYPES,
    WHY,
    EventsControl,
    Record,
    RingReader,
    event_type,
)
from lb.dataplane.loader import read_runtime_config
from lb.errors import InvalidInput

#: Records a subscriber may have waiting before new ones are dropped (per subscriber).
QUEUE_MAX = 4096
_TYPE_NAMES = {v: k for k, v in EVENT_TYPES.items()}
_PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
_ETH_VLAN = (0x8100, 0x88A8)
_IPPROTO_IPIP, _IPPROTO_IPV6, _IPPROTO_UDP = 4, 41, 17


def parse_types(names: Iterable[str]) -> int:
    """EV_T_* bits of type names (drop, pass, flow, fwd, icmp, guard); none given: all."""
    bits = 0
    for n in names:
        if n not in EVENT_TYPES:
            raise InvalidInput(f"type: {n!r} is none of {', '.join(EVENT_TYPES)}", field="type")
        bits |= EVENT_TYPES[n]
    return bits or ALL_TYPES


def parse_reasons(names: Iterable[str]) -> frozenset[int]:
    """glob_stat slots of reason names (no_backend or STAT_NO_BACKEND); none given: any."""
    out = set()
    for n in names:
        key = n if n.startswith("STAT_") else "STAT_" + n.upper()
        if key not in STAT_INDEX:
            raise InvalidInput(f"reason: {n!r} is not a counter name", field="reason")
        out.add(STAT_INDEX[key])
    return frozenset(out)


@dataclass(frozen=True)
class EventFilter:
    """What one subscriber wants: types (EV_T_*), reasons (slots; empty = any), VIP numbers
    (None = any), capture (frames as received and sent instead of events), 1 in `sample`."""

    types: int = ALL_TYPES
    reasons: frozenset[int] = frozenset()
    vips: frozenset[int] | None = None
    capture: bool = False
    sample: int = 1

    def wants(self, rec: Record) -> bool:
        """Does this subscriber get `rec`?"""
        if self.capture:
            if rec.kind == EV_K_EVENT:
                return False
        elif rec.kind not in (EV_K_EVENT, EV_K_RX):
            return False  # while someone captures, an event is the frame as received
        if not rec.types & self.types:
            return False
        if self.reasons and (rec.code >> 4) & 0x3F not in self.reasons:
            return False
        if self.vips is not None and not (rec.code & EV_F_GUARD):
            return rec.vip_num is not None and rec.vip_num in self.vips
        return True


@dataclass
class Subscription:
    """One subscriber's bounded queue; records that find it full are dropped and counted."""

    filter: EventFilter
    maxlen: int = QUEUE_MAX
    dropped: int = 0
    delivered: int = 0
    _items: deque[Record] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: threading.Event = field(default_factory=threading.Event)
    #: Called (from the reader thread) after records were queued: an asyncio waker, say.
    notify: Callable[[], None] | None = None

    def offer(self, rec: Record) -> None:
        """Queue `rec`, or count it dropped when the queue is full."""
        with self._lock:
            if len(self._items) >= self.maxlen:
                self.dropped += 1
                return
            self._items.append(rec)
        self._ready.set()

    def take(self, limit: int = 512) -> list[Record]:
        """Up to `limit` queued records, oldest first, without waiting."""
        with self._lock:
            n = min(limit, len(self._items))
            out = [self._items.popleft() for _ in range(n)]
            if not self._items:
                self._ready.clear()
        self.delivered += len(out)
        return out

    def wait(self, timeout: float) -> list[Record]:
        """`take`, after waiting up to `timeout` s for a record."""
        self._ready.wait(timeout)
        return self.take()


class EventHub:
    """The ring's one reader in the daemon, fanning records out to subscribers."""

    def __init__(self, balancer: Any, poll_ms: int = 100) -> None:
        self._balancer = balancer
        self._control = EventsControl(balancer)
        self._control.off()
        self._reader: RingReader | None = None
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._poll_ms = poll_ms
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: the offset that makes it wall-clock time.
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()

    def subscribe(self, flt: EventFilter, maxlen: int = QUEUE_MAX) -> Subscription:
        """A new subscription (starts the reader and the kernel's sampling if needed)."""
        sub = Subscription(flt, maxlen=maxlen)
        with self._lock:
            self._subs.append(sub)
            self._configure()
            if self._thread is None:
                if self._reader is None:
                    self._reader = RingReader.of(self._balancer)
                self._reader.drain()  # what an earlier listener left is not this one's
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="xlb-events",
                                                daemon=True)
                self._thread.start()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove `sub`; the last one out switches sampling off and stops the reader."""
        thread = None
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
            self._configure()
            if not self._subs:
                thread, self._thread = self._thread, None
                self._stop.set()
        if thread is not None:
            thread.join(timeout=5)

    def gue_port(self) -> int | None:
        """The GUE port in lb_cfg now (to read GUE frames), None while unconfigured."""
        rc = read_runtime_config(self._balancer)
        return rc.gue_port if rc is not None else None

    def ring_counters(self) -> tuple[int, int]:
        """(records written, records lost to a full ring) since the program was loaded."""
        return self._control.counters()

    def close(self) -> None:
        """Drop every subscriber, switch sampling off."""
        for sub in list(self._subs):
            self.unsubscribe(sub)
        self._control.off()

    def _configure(self) -> None:
        subs = self._subs
        if not subs:
            self._control.off()
            return
        flags = 0
        vips: set[int] | None = set()
        for s in subs:
            flags |= s.filter.types | (EV_CAPTURE if s.filter.capture else 0)
            if s.filter.vips is None or vips is None:
                vips = None
            else:
                vips |= s.filter.vips
        vip = next(iter(vips)) if vips is not None and len(vips) == 1 else None
        self._control.set(flags, min(s.filter.sample for s in subs), vip)

    def _run(self) -> None:
        reader = self._reader
        assert reader is not None
        while not self._stop.is_set():
            recs = reader.poll(self._poll_ms)
            if not recs:
                continue
            with self._lock:
                subs = list(self._subs)
            for sub in subs:
                got = False
                for r in recs:
                    if sub.filter.wants(r):
                        sub.offer(r)
                        got = True
                if got and sub.notify is not None:
                    sub.notify()


def _l4(proto: int, b: bytes, off: int, out: dict[str, Any]) -> None:
    out["protocol"] = _PROTOS.get(proto, str(proto))
    if proto in (6, 17) and len(b) >= off + 4:
        out["source_port"], out["destination_port"] = struct.unpack_from("!HH", b, off)
        if proto == 6 and len(b) >= off + 14:
            flags = b[off + 13]
            out["tcp_flags"] = "".join(c for i, c in enumerate("FSRPAU") if flags & (1 << i))
    elif proto in (1, 58) and len(b) > off:
        out["icmp_type"] = b[off]


def _ip(b: bytes, off: int) -> tuple[dict[str, Any], int, int] | None:
    """(addresses, next protocol, offset of the payload) of the IP header at `off`."""
    if len(b) < off + 20:
        return None
    if b[off] >> 4 == 4:
        ihl = (b[off] & 0xF) * 4
        return ({"source": str(ipaddress.IPv4Address(b[off + 12:off + 16])),
                 "destination": str(ipaddress.IPv4Address(b[off + 16:off + 20]))},
                b[off + 9], off + ihl)
    if b[off] >> 4 == 6 and len(b) >= off + 40:
        return ({"source": str(ipaddress.IPv6Address(b[off + 8:off + 24])),
                 "destination": str(ipaddress.IPv6Address(b[off + 24:off + 40]))},
                b[off + 6], off + 40)
    return None


def parse_frame(b: bytes, gue_port: int | None = None) -> dict[str, Any]:
    """The flow of an Ethernet frame; an encapsulated one (IPIP, IPv6, GUE to `gue_port`) as
    its inner flow plus `backend` (the outer destination) and `encap`."""
    off = 12
    if len(b) < 14:
        return {}
    ethertype = struct.unpack_from("!H", b, off)[0]
    while ethertype in _ETH_VLAN and len(b) >= off + 6:
        off += 4
        ethertype = struct.unpack_from("!H", b, off)[0]
    ip = _ip(b, off + 2)
    if ip is None:
        return {"ethertype": f"0x{ethertype:04x}"}
    flow, proto, l4 = ip
    out: dict[str, Any] = dict(flow)
    inner_at, encap = None, None
    if proto in (_IPPROTO_IPIP, _IPPROTO_IPV6):
        inner_at, encap = l4, "ipip" if proto == _IPPROTO_IPIP else "ip6ip6"
    elif (proto == _IPPROTO_UDP and gue_port and len(b) >= l4 + 12
          and struct.unpack_from("!H", b, l4 + 2)[0] == gue_port):
        first = b[l4 + 8]
        # GUE version 1 carries the IP packet right after UDP; version 0 has a header.
        inner_at = l4 + 8 if first >> 6 == 1 else l4 + 12 + (first & 0x1F) * 4
        encap = "gue"
    if inner_at is not None:
        inner = _ip(b, inner_at)
        if inner is not None:
            out = dict(inner[0])
            out["backend"], out["encap"] = flow["destination"], encap
            _l4(inner[1], b, inner[2], out)
            return out
    _l4(proto, b, l4, out)
    return out


def describe(rec: Record, wall_offset_ns: int = 0, vip_names: dict[int, str] | None = None,
             gue_port: int | None = None) -> dict[str, Any]:
    """A record as the API and `lbctl monitor -o json` show it."""
    reason = rec.reason
    out: dict[str, Any] = {
        "time_ns": rec.ts_ns + wall_offset_ns,
        "type": _TYPE_NAMES[event_type(rec.code)],
        "verdict": VERDICT_NAMES.get(rec.action, str(rec.action)),
        "reason": reason,
        "vip": None,
        "frame_len": rec.frame_len,
        "ifindex": rec.ifindex,
    }
    if rec.vip_num is not None:
        out["vip"] = (vip_names or {}).get(rec.vip_num, f"#{rec.vip_num}")
    if out["type"] in ("flow", "fwd"):
        out["why"] = WHY.get(reason, reason)
        out["new_flow"] = bool(rec.code & EV_F_NEW_FLOW)
    if rec.code & EV_F_GUARD:
        out["guard"] = "flood" if rec.code & EV_F_FLOOD else "calm"
    out["flow"] = parse_frame(rec.data, gue_port)
    if rec.kind == EV_K_RX:
        out["flow"].pop("backend", None)  # a frame as received: no backend in it yet
    return out
