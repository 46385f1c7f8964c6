"""The connection table from user space: the BPF array mapped into this process.

`conn_table` is a set-associative cache of flows (docs/conn-table.md): CONN_SETS sets of
CONN_WAYS slots, each slot a 64-bit tag and a 64-bit meta word. It is created with
BPF_F_MMAPABLE, so `ConnTable` maps it (mmap of the map fd) and reads and writes slots in
place, with no syscall per entry: one flow is a few loads, and counting or decoding every
slot is numpy over the mapping.

User space follows the data plane's lock-free protocol, word by word (8-byte aligned loads
and stores are single accesses on x86, which keeps stores, and loads, in program order):

- read: tag, then meta, then the tag again; a hit only when the tag did not change;
- write: claim the slot with compare-and-swap of its tag to CONN_TAG_BUSY, store meta, store
  the flow's tag; delete: compare-and-swap the flow's tag to CONN_TAG_EMPTY.

`purge` frees every slot naming a VIP number or a backend index the control plane freed
(lb/control/reconcile.py runs it): numpy selects the slots over the mapping, then each is deleted
as above, by compare-and-swap of the tag it was read with, so a slot the data plane
rewrote for another flow meanwhile is left alone.

Freeing slots (purge, delete) goes through the C extension lb.dataplane._conntab when it is built:
one call compare-and-swaps every selected tag (`lock cmpxchg`, a few ns a slot, without
the GIL). Otherwise, and for single slots (insert's claim, restoring()), compare-and-swap
comes from the GCC runtime's libatomic (`__atomic_compare_exchange_8`) through ctypes,
about 0.6 us a slot. XXX: without either it falls back to compare-then-store, so a write
racing with the data plane's claim of the same slot can leave that slot with one flow's
tag and another's meta until either flow is written again.

Ages use the data plane's clock, CLOCK_MONOTONIC_COARSE (bpf_ktime_get_coarse_ns), in
stamp units of 2**CONN_STAMP_NS_SHIFT ns (16.78 ms) modulo 2**26 units (about 13 days).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from lb.consts import (
    CLOSING_GRACE_S,
    CONN_F_CLOSING,
    CONN_F_UDP,
    CONN_REAL_MASK,
    CONN_STAMP_MASK,
    CONN_STAMP_NS_SHIFT,
    CONN_STAMP_SHIFT,
    CONN_TAG_BUSY,
    CONN_TAG_EMPTY,
    CONN_VIP_MASK,
    CONN_VIP_SHIFT,
    CONN_WAYS,
    UDP_TIMEOUT_DEFAULT_S,
)
from lb.dataplane.bpf import map_info, obj_get
from lb.dataplane.flowhash import Flow5, Flows, conn_index, conn_index_many, conn_tag, conn_tag_many
from lb.errors import KernelError

if TYPE_CHECKING:
    from lb.dataplane.loader import Balancer

try:
    from lb.dataplane import _conntab
except ImportError:  # not built (no compiler at install time): libatomic through ctypes
    _conntab = None  # type: ignore[assignment]

#: The clock of bpf_ktime_get_coarse_ns (Linux clockid 6; `time` names it from Python 3.13).
CLOCK_MONOTONIC_COARSE: int = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)
#: One stamp unit in seconds.
STAMP_S = (1 << CONN_STAMP_NS_SHIFT) / 1e9
#: Sets decoded per numpy pass by count() and entries() (8 MiB of table), to bound memory.
CHUNK_SETS = 1 << 16
#: Sets per numpy pass of purge (512 KiB of table): its temporaries stay in the L2 cache
#: (about 10% faster than CHUNK_SETS: 17 ms for 8,388,608 slots on a 2-CPU VM).
PURGE_CHUNK_SETS = 1 << 12
#: A purge matches up to this many values of a field by comparisons, more by a lookup table.
PURGE_COMPARE_MAX = 4
#: Attempts at claiming a slot the data plane keeps winning before giving up.
CLAIM_TRIES = 8
_U64 = np.uint64
_SLOT_WORDS = 2  # tag, meta
_SLOT_BYTES = _SLOT_WORDS * 8
_SEQ_CST = 5  # __ATOMIC_SEQ_CST
#: A slot's meta bits that hold its backend index and its VIP number.
_REAL_BITS = CONN_REAL_MASK
_VIP_BITS = CONN_VIP_MASK << CONN_VIP_SHIFT
#: The meta word of a slot (read-only view of a chunk) -> which slots to free.
_Match = Callable[[NDArray[np.uint64]], NDArray[np.bool_]]


def now_stamp() -> int:
    """The data plane's clock now, in stamp units (the `stamp` field's domain)."""
    ns = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    return (ns >> CONN_STAMP_NS_SHIFT) & CONN_STAMP_MASK


def udp_timeout_ns(balancer: Balancer) -> int:
    """The UDP idle timeout the data plane applies (lb_cfg, else its default), in ns."""
    leaf = balancer.lb_cfg[balancer.lb_cfg.Key(0)]
    return int(leaf.udp_timeout_ns) or UDP_TIMEOUT_DEFAULT_S * 1_000_000_000


def tcp_timeout_ns(balancer: Balancer) -> int:
    """The idle timeout of TCP entries the data plane applies (lb_cfg; 0 = never), in ns."""
    return int(balancer.lb_cfg[balancer.lb_cfg.Key(0)].tcp_timeout_ns)


def live_flows(e: ConnEntries, udp_s: float, tcp_s: float, closing_grace_s: float,
               *, later_s: float = 0.0) -> NDArray[np.bool_]:  # fmt: skip
    """Which entries are live flows: UDP seen within its timeout; TCP seen within its
    timeout (tcp_s 0: no timeout) and not closing, or closing for less than the grace.
    The others are reusable slots the data plane replaces before live ones."""
    age = e.age_s + later_s
    tcp = ~e.udp & (~e.closing | (age < closing_grace_s))
    if tcp_s > 0:
        tcp &= age <= tcp_s
    return (e.udp & (age <= udp_s)) | tcp


def make_meta(real_idx: int, vip_num: int, *, udp: bool, closing: bool, stamp: int) -> int:
    """A slot's meta word (layout in xdp/common/consts.h)."""
    if not 0 < real_idx <= CONN_REAL_MASK:
        raise ValueError(f"real_idx must be in 1..{CONN_REAL_MASK}, got {real_idx}")
    if not 0 <= vip_num <= CONN_VIP_MASK:
        raise ValueError(f"vip_num must be in 0..{CONN_VIP_MASK}, got {vip_num}")
    return (
        real_idx
        | vip_num << CONN_VIP_SHIFT
        | (CONN_F_UDP if udp else 0)
        | (CONN_F_CLOSING if closing else 0)
        | (stamp & CONN_STAMP_MASK) << CONN_STAMP_SHIFT
    )


def _field_value(name: str, value: int, mask: int) -> int:
    if not 0 <= value <= mask:
        raise ValueError(f"{name} must be in 0..{mask}, got {value}")
    return int(value)


def _field_match(values: Iterable[int], shift: int, mask: int, *,
                 outside: bool = False) -> _Match | None:
    """Which slots' field (meta >> shift & mask) is one of `values` (`outside`: none of them).

    Values the field cannot hold name no slot. None when nothing can match (no values in
    the field's range, not `outside`).
    """
    vals = sorted({int(v) for v in values if 0 <= v <= mask})
    if not vals and not outside:
        return None
    if not outside and len(vals) <= PURGE_COMPARE_MAX:
        bits = _U64(mask << shift)
        wants = [_U64(v << shift) for v in vals]

        def compare(meta: NDArray[np.uint64]) -> NDArray[np.bool_]:
            field = meta & bits
            hit: NDArray[np.bool_] = field == wants[0]
            for w in wants[1:]:
                hit |= field == w
            return hit

        return compare
    table = np.full(mask + 1, outside, np.bool_)
    table[vals] = not outside
    sh, mk = _U64(shift), _U64(mask)

    def look_up(meta: NDArray[np.uint64]) -> NDArray[np.bool_]:
        # Field values fit in 20 bits: the int64 view of the uint64 indices is the same.
        return table[((meta >> sh) & mk).view(np.int64)]

    return look_up


def _any_of(matches: Iterable[_Match | None]) -> _Match | None:
    """A match of the slots any of `matches` selects (None: none can select anything)."""
    ms = [m for m in matches if m is not None]
    if len(ms) < 2:
        return ms[0] if ms else None

    def either(meta: NDArray[np.uint64]) -> NDArray[np.bool_]:
        hit = ms[0](meta)
        for m in ms[1:]:
            hit |= m(meta)
        return hit

    return either


def _stamp_ago(age_s: float) -> int:
    ns = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE) - round(age_s * 1e9)
    return (ns >> CONN_STAMP_NS_SHIFT) & CONN_STAMP_MASK


@dataclass(frozen=True)
class ConnEntry:
    """One flow's entry: backend index, VIP number, flags, seconds since last seen."""

    real_idx: int
    vip_num: int
    udp: bool
    closing: bool
    age_s: float

    @classmethod
    def decode(cls, meta: int, now: int) -> ConnEntry:
        """Decode a meta word; `now` in stamp units."""
        age = (now - (meta >> CONN_STAMP_SHIFT)) & CONN_STAMP_MASK
        return cls(
            real_idx=meta & CONN_REAL_MASK,
            vip_num=(meta >> CONN_VIP_SHIFT) & CONN_VIP_MASK,
            udp=bool(meta & CONN_F_UDP),
            closing=bool(meta & CONN_F_CLOSING),
            age_s=age * STAMP_S,
        )


@dataclass(frozen=True)
class ConnEntries:
    """Every valid slot of the table, decoded into parallel arrays."""

    real_idx: NDArray[np.uint32]
    vip_num: NDArray[np.uint32]
    udp: NDArray[np.bool_]
    closing: NDArray[np.bool_]
    age_s: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.real_idx)


class _Atomic:
    """64-bit compare-and-swap on an address (libatomic), or its non-atomic stand-in."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("atomic")
        self._cas: Any = None
        if name is not None:
            try:
                # getattr: a literal __name inside a class body would be name-mangled.
                fn = getattr(ctypes.CDLL(name), "__atomic_compare_exchange_8")
            except (OSError, AttributeError):
                return
            fn.restype = ctypes.c_bool
            # The expected value goes by address (where a failed swap writes what it found).
            fn.argtypes = [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int,
            ]  # fmt: skip
            self._cas = fn

    @property
    def lock_free(self) -> bool:
        """Whether compare-and-swap is the real (atomic) one."""
        return self._cas is not None

    def cas(self, addr: int, expected: int, new: int) -> bool:
        """Store `new` at `addr` if it holds `expected`; whether it did."""
        if self._cas is not None:
            seen = ctypes.c_uint64(expected)
            return bool(self._cas(addr, ctypes.addressof(seen), new, _SEQ_CST, _SEQ_CST))
        word = ctypes.c_uint64.from_address(addr)
        if word.value != expected:
            return False
        word.value = new
        return True

    def cas_many(self, addrs: NDArray[np.int64], expected: NDArray[np.uint64], new: int) -> int:
        """cas() at each address with its expected value; how many swapped.

        `expected` is scratch: a failed swap overwrites its entry with what it found.
        """
        if self._cas is None:
            return sum(self.cas(int(a), int(e), new)
                       for a, e in zip(addrs, expected, strict=True))  # fmt: skip
        expected = np.ascontiguousarray(expected, _U64)
        seen = expected.ctypes.data + 8 * np.arange(len(expected), dtype=np.int64)
        # map() straight over the C function: about 0.6 us a slot (cas() in a loop: 1 us).
        n = itertools.repeat
        return sum(map(self._cas, addrs.tolist(), seen.tolist(), n(new), n(_SEQ_CST),
                       n(_SEQ_CST)))  # fmt: skip


_atomic = _Atomic()


class ConnTable:
    """The balancer's connection table, mapped into this process."""

    def __init__(self, balancer: Balancer) -> None:
        table = balancer.conn_table
        fd = int(table.map_fd)
        info = map_info(fd)
        set_size = ctypes.sizeof(table.Leaf)
        slot_size = _SLOT_WORDS * 8
        if info.value_size != set_size or set_size != CONN_WAYS * slot_size:
            raise KernelError(
                f"conn_table holds {info.value_size}-byte values; this control plane reads"
                f" sets of {CONN_WAYS} x {slot_size}-byte slots (docs/conn-table.md)"
            )
        sets = info.max_entries
        if sets & (sets - 1):
            raise KernelError(f"conn_table has {sets} sets, not a power of two")
        self.sets = sets
        self.ways = CONN_WAYS
        self.map_id = info.id
        self._balancer = balancer
        try:
            self._mm = mmap.mmap(fd, sets * set_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        except OSError as e:
            raise KernelError(
                f"conn_table cannot be mapped ({e.strerror}): it is not the mmapable array"
                " this control plane expects (an older data plane's table?)"
            ) from e
        # [set, way, 0] is the tag, [set, way, 1] the meta word.
        self._w: NDArray[np.uint64] = np.frombuffer(self._mm, dtype=_U64).reshape(
            sets, CONN_WAYS, _SLOT_WORDS
        )
        self._base: int = self._w.ctypes.data

    @classmethod
    def current(
        cls, balancer: Balancer, mapped: ConnTable | None, *, close_old: bool = False
    ) -> ConnTable:
        """`mapped` while it still maps the balancer's table, else a new mapping.

        A hitless upgrade (Balancer.take_over) may bring another conn_table map; the old
        mapping is closed only with `close_old` (a caller that knows no reader holds it).
        """
        if mapped is not None and mapped.map_id == map_info(int(balancer.conn_table.map_fd)).id:
            return mapped
        if mapped is not None and close_old:
            mapped.close()
        return cls(balancer)

    @property
    def capacity(self) -> int:
        """Slots in the table (sets x ways)."""
        return self.sets * self.ways

    def close(self) -> None:
        """Unmap the table (the map itself lives on while the program or a pin holds it)."""
        if self._mm.closed:
            return
        del self._w
        self._base = 0
        self._mm.close()

    def __enter__(self) -> ConnTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _addr(self, s: int, way: int, word: int) -> int:
        return self._base + ((s * CONN_WAYS + way) * _SLOT_WORDS + word) * 8

    def _find(self, s: int, tag: int) -> Iterator[tuple[int, int]]:
        """(way, meta) of the slots of set `s` holding `tag`, each read tag-meta-tag."""
        w = self._w[s]
        for way in range(CONN_WAYS):
            if int(w[way, 0]) != tag:
                continue
            meta = int(w[way, 1])
            if int(w[way, 0]) == tag:
                yield way, meta

    def lookup(self, flow: Flow5) -> ConnEntry | None:
        """The flow's entry, or None when the table has none for it."""
        s, tag = conn_index(flow, self.sets), conn_tag(flow)
        for _, meta in self._find(s, tag):
            return ConnEntry.decode(meta, now_stamp())
        return None

    def insert(self, flow: Flow5, real_idx: int, vip_num: int, *, udp: bool = False,
               closing: bool = False, age_s: float = 0.0) -> None:
        """Write the flow's entry, choosing its slot as the data plane does."""
        meta = make_meta(real_idx, vip_num, udp=udp, closing=closing, stamp=_stamp_ago(age_s))
        s, tag = conn_index(flow, self.sets), conn_tag(flow)
        for _ in range(CLAIM_TRIES):
            pick = self._pick(s, tag)
            if pick is None:
                continue
            way, seen = pick
            if not _atomic.cas(self._addr(s, way, 0), seen, CONN_TAG_BUSY):
                continue
            self._w[s, way, 1] = meta
            self._w[s, way, 0] = tag
            return
        raise KernelError(
            f"conn_table set {s}: every slot stayed busy (written by the data plane)"
            f" over {CLAIM_TRIES} attempts"
        )

    def _pick(self, s: int, tag: int) -> tuple[int, int] | None:
        """(way, tag seen) to write `tag` into, by conn_insert's preference
        (xdp/balancer/conn.h): the flow's own slot, a free one, an expired entry, the
        least recently seen."""
        w = self._w[s]
        now = now_stamp()
        udp_timeout = udp_timeout_ns(self._balancer) >> CONN_STAMP_NS_SHIFT
        tcp_timeout = tcp_timeout_ns(self._balancer) >> CONN_STAMP_NS_SHIFT
        rank, pick, oldest = 0, None, -1
        for way in range(CONN_WAYS):
            t = int(w[way, 0])
            if t == tag:
                return way, t
            if t == CONN_TAG_BUSY or rank >= 3:
                continue
            if t == CONN_TAG_EMPTY:
                rank, pick = 3, (way, t)
                continue
            if rank == 2:
                continue
            m = int(w[way, 1])
            age = (now - (m >> CONN_STAMP_SHIFT)) & CONN_STAMP_MASK
            expired = age > udp_timeout if m & CONN_F_UDP else 0 < tcp_timeout < age
            if expired:
                rank, pick = 2, (way, t)
            elif age > oldest:
                rank, pick, oldest = 1, (way, t), age
        return pick

    def delete(self, flow: Flow5) -> bool:
        """Remove the flow's entry; whether it had one."""
        s, tag = conn_index(flow, self.sets), conn_tag(flow)
        ways = np.flatnonzero(self._w[s, :, 0] == _U64(tag))
        if not len(ways):
            return False
        return self._free(s * CONN_WAYS + ways, np.full(len(ways), tag, _U64)) > 0

    def _free(self, slot: NDArray[np.int64], tag: NDArray[np.uint64]) -> int:
        """Free each slot (index into the table's slots) that still holds its `tag`: a
        compare-and-swap of the tag from that value to CONN_TAG_EMPTY, so a slot the data
        plane rewrote meanwhile is left alone; how many it freed."""
        offsets = np.ascontiguousarray(slot, np.int64) * _SLOT_BYTES
        expected = np.ascontiguousarray(tag, _U64)
        if _conntab is not None:
            return _conntab.cas_many(self._mm, offsets, expected, CONN_TAG_EMPTY)
        return _atomic.cas_many(self._base + offsets, expected.copy(), CONN_TAG_EMPTY)

    @contextmanager
    def restoring(self, flow: Flow5) -> Iterator[None]:
        """Put the flow's set back as it was on entry, where the flow's entry now sits.

        For a packet run that must leave no trace (lb.ops.explain): the slot the program wrote
        the flow into gets its previous content back, a flow it evicted included. Slots the
        data plane rewrote for other flows meanwhile are left alone.
        """
        s, tag = conn_index(flow, self.sets), conn_tag(flow)
        before = self._w[s].copy()
        try:
            yield
        finally:
            for way in range(CONN_WAYS):
                old_tag, old_meta = int(before[way, 0]), int(before[way, 1])
                if old_tag == tag or not _atomic.cas(self._addr(s, way, 0), tag, CONN_TAG_BUSY):
                    continue
                self._w[s, way, 1] = old_meta
                self._w[s, way, 0] = old_tag

    def clear(self) -> None:
        """Empty every slot (plain stores: a flow the data plane writes meanwhile may stay)."""
        for lo in range(0, self.sets, CHUNK_SETS):
            self._w[lo : lo + CHUNK_SETS, :, 0] = CONN_TAG_EMPTY

    def purge(self, *, vip_num: int | None = None, real_idx: int | None = None) -> int:
        """Free every slot naming this VIP number, this backend index, or (both given) the
        pair; returns how many slots it freed.

        For numbers and indices the control plane freed (lb/control/reconcile.py runs it): once the
        data plane can no longer write slots naming them (the VIP out of vip_map; the
        backend out of every ring and zeroed in reals), before they are handed out again.
        """
        if vip_num is None and real_idx is None:
            raise ValueError("purge needs vip_num, real_idx or both (clear() frees every slot)")
        bits = want = 0
        if vip_num is not None:
            bits |= _VIP_BITS
            want |= _field_value("vip_num", vip_num, CONN_VIP_MASK) << CONN_VIP_SHIFT
        if real_idx is not None:
            bits |= _REAL_BITS
            want |= _field_value("real_idx", real_idx, CONN_REAL_MASK)
        b, w = _U64(bits), _U64(want)
        return self._purge(lambda meta: (meta & b) == w)

    def purge_any(self, *, vip_nums: Iterable[int] = (), real_idx: Iterable[int] = ()) -> int:
        """Free every slot naming one of `vip_nums` or one of `real_idx` (one pass over the
        table whatever their number); returns how many slots it freed.

        Values as read from the maps: one the slot's field cannot hold names no slot.
        """
        match = _any_of([
            _field_match(vip_nums, CONN_VIP_SHIFT, CONN_VIP_MASK),
            _field_match(real_idx, 0, CONN_REAL_MASK),
        ])  # fmt: skip
        return 0 if match is None else self._purge(match)

    def purge_unless(self, *, vip_nums: Iterable[int], real_idx: Iterable[int]) -> int:
        """Free every slot whose VIP number is not one of `vip_nums` or whose backend index is
        not one of `real_idx`; returns how many slots it freed.

        For a control plane that finds maps it did not write (a start, a failed write): a
        slot naming a number no vip_map entry holds, or a backend whose reals slot is empty,
        is left over from a VIP or backend whose purge never ran.
        """
        match = _any_of([
            _field_match(vip_nums, CONN_VIP_SHIFT, CONN_VIP_MASK, outside=True),
            _field_match(real_idx, 0, CONN_REAL_MASK, outside=True),
        ])  # fmt: skip
        assert match is not None  # `outside` always matches something
        return self._purge(match)

    def purge_pairs(self, pairs: Iterable[tuple[int, int]], *, outside: bool = False) -> int:
        """Free every slot naming one of these (VIP number, backend index) pairs (one pass
        over the table); with `outside`, every slot naming a pair not listed. Returns how
        many slots it freed.

        For a backend that leaves one VIP while another keeps its index: the index stays
        programmed, so the VIP's old slots naming it would go on steering its flows there.
        """
        want = {(int(v), int(r)) for v, r in pairs
                if 0 <= v <= CONN_VIP_MASK and 0 < r <= CONN_REAL_MASK}  # fmt: skip
        if not want and not outside:
            return 0
        bits = _U64(_VIP_BITS | _REAL_BITS)
        keys = np.array(sorted(v << CONN_VIP_SHIFT | r for v, r in want), dtype=_U64)
        if not outside and len(keys) <= PURGE_COMPARE_MAX:

            def compare(meta: NDArray[np.uint64]) -> NDArray[np.bool_]:
                field = meta & bits
                hit: NDArray[np.bool_] = field == keys[0]
                for k in keys[1:]:
                    hit |= field == k
                return hit

            return self._purge(compare)

        def look_up(meta: NDArray[np.uint64]) -> NDArray[np.bool_]:
            hit: NDArray[np.bool_] = np.isin(meta & bits, keys, invert=outside)
            return hit

        return self._purge(look_up)

    def _purge(self, match: _Match) -> int:
        """Free the slots holding a flow whose meta word `match` selects; how many it freed."""
        flat = self._w.reshape(-1, _SLOT_WORDS)
        step = PURGE_CHUNK_SETS * CONN_WAYS
        freed = 0
        for lo in range(0, len(flat), step):
            # A first pass on meta alone (vectorised); a free slot keeps its old meta word,
            # so the candidates are read again, each tag-meta-tag like a lookup (whole arrays
            # in turn: x86 keeps loads in order).
            slot = np.flatnonzero(match(flat[lo : lo + step, 1])) + lo
            if not len(slot):
                continue
            tag = flat[slot, 0]
            meta = flat[slot, 1]
            ok = (tag > CONN_TAG_BUSY) & (tag == flat[slot, 0]) & match(meta)
            if ok.any():
                # delete()'s compare-and-swap of the tag the slot was read with.
                freed += self._free(slot[ok], tag[ok])
        return freed

    def count(self) -> int:
        """Slots holding a flow (a snapshot: the data plane writes meanwhile)."""
        n = 0
        for lo in range(0, self.sets, CHUNK_SETS):
            tags = self._w[lo : lo + CHUNK_SETS, :, 0]
            n += int(np.count_nonzero(tags > CONN_TAG_BUSY))
        return n

    def count_live(self, closing_grace_s: float = CLOSING_GRACE_S) -> int:
        """Entries that are live flows (live_flows): what an operator calls connections."""
        b = self._balancer
        live = live_flows(self.entries(), udp_timeout_ns(b) / 1e9, tcp_timeout_ns(b) / 1e9,
                          closing_grace_s)  # fmt: skip
        return int(live.sum())

    def entries(self) -> ConnEntries:
        """Every slot holding a flow, decoded (a snapshot; each slot read tag-meta-tag)."""
        metas: list[NDArray[np.uint64]] = []
        for lo in range(0, self.sets, CHUNK_SETS):
            chunk = self._w[lo : lo + CHUNK_SETS]
            before = chunk[:, :, 0].copy()
            meta = chunk[:, :, 1].copy()
            keep = (before > CONN_TAG_BUSY) & (before == chunk[:, :, 0])
            metas.append(meta[keep])
        # After the reads, so no stamp is newer than `now` (a negative age would wrap).
        now = _U64(now_stamp())
        m = np.concatenate(metas) if metas else np.zeros(0, _U64)
        age = (now - (m >> _U64(CONN_STAMP_SHIFT))) & _U64(CONN_STAMP_MASK)
        return ConnEntries(
            real_idx=(m & _U64(CONN_REAL_MASK)).astype(np.uint32),
            vip_num=((m >> _U64(CONN_VIP_SHIFT)) & _U64(CONN_VIP_MASK)).astype(np.uint32),
            udp=(m & _U64(CONN_F_UDP)) != 0,
            closing=(m & _U64(CONN_F_CLOSING)) != 0,
            age_s=age.astype(np.float64) * STAMP_S,
        )

    def insert_many(self, flows: Flows, real_idx: Any, vip_num: Any, *, udp: bool = False,
                    age_s: float = 0.0) -> int:
        """Write many flows' entries at once (vectorised); returns how many were written.

        Each flow takes its own slot if it has one, else a free slot of its set; a flow
        whose set has no free slot left is not written (no eviction). Claims are plain
        stores, not compare-and-swap: meant for filling a table the data plane does not
        write to meanwhile (a benchmark's prefill); use insert() on a live table.
        """
        n = len(flows)
        if n == 0:
            return 0
        real = np.broadcast_to(np.asarray(real_idx, _U64), (n,))
        vip = np.broadcast_to(np.asarray(vip_num, _U64), (n,))
        if (real == 0).any() or (real > CONN_REAL_MASK).any() or (vip > CONN_VIP_MASK).any():
            raise ValueError("real_idx must be in 1..CONN_REAL_MASK, vip_num in 0..CONN_VIP_MASK")
        idx = conn_index_many(flows, self.sets).astype(np.int64)
        tag = conn_tag_many(flows)
        meta = (real | (vip << _U64(CONN_VIP_SHIFT)) | _U64(CONN_F_UDP if udp else 0)
                | _U64(_stamp_ago(age_s)) << _U64(CONN_STAMP_SHIFT))  # fmt: skip
        # One write per (set, tag), the last one given; grouped by set for the ranks below.
        order = np.lexsort((np.arange(n), tag, idx))
        idx, tag, meta = idx[order], tag[order], meta[order]
        last = np.ones(n, bool)
        last[:-1] = (idx[1:] != idx[:-1]) | (tag[1:] != tag[:-1])
        idx, tag, meta = idx[last], tag[last], meta[last]
        tags = self._w[idx, :, 0]  # (flows, ways), a copy
        own = tags == tag[:, None]
        has_own = own.any(axis=1)
        way = np.where(has_own, own.argmax(axis=1), -1)
        # The k-th new flow of a set takes the set's k-th free slot.
        new = ~has_own
        nidx = idx[new]
        first = np.ones(len(nidx), bool)
        first[1:] = nidx[1:] != nidx[:-1]
        pos = np.arange(len(nidx))
        rank = pos - np.maximum.accumulate(np.where(first, pos, 0))
        free = tags[new] == CONN_TAG_EMPTY
        target = (np.cumsum(free, axis=1) == (rank + 1)[:, None]) & free
        way[new] = np.where(target.any(axis=1), target.argmax(axis=1), -1)
        ok = way >= 0
        slot = idx[ok] * CONN_WAYS + way[ok]
        flat = self._w.reshape(-1, _SLOT_WORDS)
        flat[slot, 0] = CONN_TAG_BUSY
        flat[slot, 1] = meta[ok]
        flat[slot, 0] = tag[ok]
        return int(ok.sum())


def clear_pinned(path: Path) -> int:
    """Empty a pinned conn_table (what an LB host that never saw the flows holds); returns
    how many slots held a flow. Plain stores, as ConnTable.clear: a flow the data plane
    writes meanwhile may stay. For tests and the lab; the daemon never calls it."""
    fd = obj_get(path)
    try:
        info = map_info(fd)
        if info.value_size != CONN_WAYS * _SLOT_BYTES or info.max_entries & (info.max_entries - 1):
            raise KernelError(f"{path}: not a conn_table ({info.max_entries} x"
                              f" {info.value_size}-byte values)")
        size = info.max_entries * info.value_size
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            w = np.frombuffer(mm, dtype=_U64).reshape(info.max_entries, CONN_WAYS, _SLOT_WORDS)
            held = int(np.count_nonzero(w[:, :, 0] != CONN_TAG_EMPTY))
            w[:, :, 0] = CONN_TAG_EMPTY
            del w
        return held
    finally:
        os.close(fd)
