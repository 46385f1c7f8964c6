"""The balancer's event ring (xdp/balancer/events.h): what to report, and the records read back.

`EventsControl` writes ev_cfg[0] (which event types, 1 in N, one VIP, capture) and reads the
per-CPU counts of records written and lost to a full ring; `RingReader` polls the ring through
BCC and hands back `Record`s. The EV_* names are events.h's, verbatim (tests/test_consts.py
holds them to the header); the record head's layout is the compiled program's (ev_frame's
`hdr`), never a copy.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import Any

from lb.consts import GLOB_STATS, STAT_INDEX, XDP_DROP, XDP_TX

# The verdict word (an int the program's pipeline returns and a record carries).
EV_ACTION_MASK = 0xF
EV_REASON_SHIFT = 4
EV_REASON_MASK = 0x3F
EV_F_NEW_FLOW = 1 << 10
EV_F_GUARD = 1 << 11
EV_F_FLOOD = 1 << 12
EV_F_VIP = 1 << 13
EV_VIP_SHIFT = 14
EV_VIP_MASK = 0xFFFF

# Event types (ev_cfg.flags) and capture.
EV_T_DROP = 1 << 0
EV_T_PASS = 1 << 1
EV_T_FLOW = 1 << 2
EV_T_FWD = 1 << 3
EV_T_ICMP = 1 << 4
EV_T_GUARD = 1 << 5
EV_CAPTURE = 1 << 8

# Record kinds (ev_hdr.kind).
EV_K_EVENT = 1
EV_K_RX = 2
EV_K_TX = 3

EV_SNAPLEN = 192
EV_CAP_SNAPLEN = 2048

#: Event type names, as lbctl monitor's --type and the API's `type` take them.
EVENT_TYPES: dict[str, int] = {
    "drop": EV_T_DROP,
    "pass": EV_T_PASS,
    "flow": EV_T_FLOW,
    "fwd": EV_T_FWD,
    "icmp": EV_T_ICMP,
    "guard": EV_T_GUARD,
}
ALL_TYPES = EV_T_DROP | EV_T_PASS | EV_T_FLOW | EV_T_FWD | EV_T_ICMP | EV_T_GUARD
#: Why a forwarded packet went to its backend, by the reason its verdict word names.
WHY = {
    "STAT_LRU_HIT": "table",
    "STAT_LRU_MISS_SYN": "ring",
    "STAT_LRU_MISS_OTHER": "ring",
    "STAT_SECOND_HOP": "second hop",
    "STAT_ICMP_FWD": "table or ring, for an ICMP error of the flow",
}
_REPLIES = (STAT_INDEX["STAT_ICMP_ECHO"], STAT_INDEX["STAT_TOO_BIG"])


def reason_name(slot: int) -> str:
    """The glob_stat name of a reason slot, without its STAT_ prefix, lower case."""
    name = GLOB_STATS[slot] if 0 <= slot < len(GLOB_STATS) else f"STAT_{slot}"
    return name.removeprefix("STAT_").lower()


def event_type(code: int) -> int:
    """The EV_T_* type of a verdict word (events.h's events_type)."""
    action = code & EV_ACTION_MASK
    reason = (code >> EV_REASON_SHIFT) & EV_REASON_MASK
    if action == XDP_DROP:
        return EV_T_DROP
    if action != XDP_TX:
        return EV_T_PASS
    if reason in _REPLIES:
        return EV_T_ICMP
    return EV_T_FLOW if code & EV_F_NEW_FLOW else EV_T_FWD


@dataclass(frozen=True)
class Record:
    """One record of the ring: an event snapshot or a captured frame."""

    ts_ns: int
    code: int
    frame_len: int
    ifindex: int
    kind: int
    data: bytes

    @property
    def action(self) -> int:
        """The XDP action."""
        return self.code & EV_ACTION_MASK

    @property
    def reason(self) -> str:
        """The reason's glob_stat name (STAT_*)."""
        slot = (self.code >> EV_REASON_SHIFT) & EV_REASON_MASK
        return GLOB_STATS[slot] if slot < len(GLOB_STATS) else f"STAT_{slot}"

    @property
    def vip_num(self) -> int | None:
        """The VIP number, when the packet reached one."""
        if not self.code & EV_F_VIP:
            return None
        return (self.code >> EV_VIP_SHIFT) & EV_VIP_MASK

    @property
    def types(self) -> int:
        """The EV_T_* types this record reports (a guard change adds EV_T_GUARD)."""
        return event_type(self.code) | (EV_T_GUARD if self.code & EV_F_GUARD else 0)


_READERS: weakref.WeakKeyDictionary[Any, RingReader] = weakref.WeakKeyDictionary()


class EventsControl:
    """ev_cfg[0] and the per-CPU ev_state counters of one loaded balancer."""

    def __init__(self, balancer: Any) -> None:
        self._cfg = balancer.maps["ev_cfg"]
        self._state = balancer.maps["ev_state"]

    def set(self, flags: int, sample: int = 1, vip_num: int | None = None) -> None:
        """Report `flags` (EV_T_* | EV_CAPTURE; 0 = off), 1 in `sample`, of one VIP or all."""
        leaf = self._cfg.Leaf()
        leaf.flags = flags
        leaf.sample = max(1, sample)
        leaf.vip = 0 if vip_num is None else vip_num + 1
        self._cfg[self._cfg.Key(0)] = leaf

    def off(self) -> None:
        """Report nothing (the hot path then reads one word and goes on)."""
        self.set(0)

    def counters(self) -> tuple[int, int]:
        """(records written, records lost to a full ring), summed over CPUs."""
        sent = lost = 0
        for v in self._state[self._state.Key(0)]:
            sent += int(v.sent)
            lost += int(v.lost)
        return sent, lost


class RingReader:
    """Reads the events ring of one loaded balancer (one per ring: `RingReader.of`)."""

    @classmethod
    def of(cls, balancer: Any) -> RingReader:
        """The reader of this balancer's ring, made on first use: BCC registers a ring with
        its poller once per table, and a second callback would get every record twice."""
        reader = _READERS.get(balancer)
        if reader is None:
            reader = _READERS[balancer] = cls(balancer)
        return reader

    def __init__(self, balancer: Any) -> None:
        self._bpf = balancer.bpf
        leaf = balancer.maps["ev_frame"].Leaf
        # A per-CPU table's Leaf is an array of the value type, one per CPU.
        hdr_type: Any = dict(getattr(leaf, "_type_", leaf)._fields_)["hdr"]
        self._hdr_type = hdr_type
        self._hdr_size = ctypes.sizeof(hdr_type)
        self._batch: list[Record] = []
        self._cb = self._on_record  # kept alive: BCC holds only a C pointer to it
        balancer.maps["events"].open_ring_buffer(self._cb)

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        raw = ctypes.string_at(data, size)
        h = self._hdr_type.from_buffer_copy(raw[: self._hdr_size])
        self._batch.append(Record(int(h.ts_ns), int(h.code), int(h.frame_len), int(h.ifindex),
                                  int(h.kind), raw[self._hdr_size:self._hdr_size + h.cap_len]))
        return 0

    def poll(self, timeout_ms: int = 100) -> list[Record]:
        """Records written since the last poll, waiting up to `timeout_ms` for the first."""
        self._bpf.ring_buffer_poll(timeout_ms)
        out, self._batch = self._batch, []
        return out

    def drain(self) -> list[Record]:
        """Records in the ring now, without waiting."""
        self._bpf.ring_buffer_consume()
        out, self._batch = self._batch, []
        return out
