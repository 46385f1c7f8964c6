"""Desired state -> map writes: images, diff, write order, verify and repair.

Two halves, kept apart:

- Pure: `RingCache` (Maglev rings per VIP, rebuilt only when the VIP's ring-relevant
  backends change), `desired_image` (what every map should hold), `plan_change` (what a
  whole-state change does) and `diff_images` (map-by-map differences as `Drift`).
- Kernel: `Reconciler`, through lb.dataplane.mapio.MapIO (the maps as plain tuples; ring
  slices through the batched bpf(2) commands), brings the maps from what it knows they hold
  to the desired image, in an order that never lets the data plane see a half-programmed
  VIP:

      create: reals -> ring slots -> vip_addrs (+ its vip_filter bit) -> vip_map
      delete: vip_map -> vip_addrs -> ring slots -> reals -> purge conn_table
      after every apply whose addresses changed: vip_filter rewritten exactly, and armed

  Only ring slots that change are written. The reconciler remembers what it wrote; after a
  failed write it forgets, and the next apply reads the maps back first.

Connection-table slots name a VIP number and a backend index, which the store hands out
again once freed. So an apply that takes a number out of vip_map, or frees a backend index
(out of every ring, zeroed in reals), frees the slots naming it right after (ConnTable
purge): the data plane can no longer write such slots, and nothing names the number or
index again before the purge. An index or number handed over within one apply (a full
table) is taken out and purged first, before its new owner is written. An apply that reads
the maps back (a start, after a failed write) first frees the slots naming a number no
vip_map entry holds or a backend whose reals slot is empty: those of a purge that a crash
or an error cut short (docs/conn-table.md).

A backend can also leave one VIP (removed, or disabled there) while another VIP keeps its
index programmed: the first VIP's slots naming it would go on steering that VIP's flows to
it. So the (VIP number, backend index) pairs a change takes out of a VIP's set are purged
once that VIP's ring no longer names the backend; a read-back apply frees every slot naming
a pair no VIP's set holds. A draining backend stays in its VIP's set (its flows go on).
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lb.consts import (
    F_SRC_RANGES,
    FAMILY_V4,
    FAMILY_V6,
    REAL_F_V6,
    RING_PREV_SHIFT,
    RING_REAL_MASK,
    SRC_ALLOW,
    SRC_DENY,
)
from lb.control import maglev
from lb.control.model import (
    BackendChange,
    Drift,
    Plan,
    VipPlan,
    VipSpec,
    vip_id,
)
from lb.control.store import crash_point
from lb.dataplane.flowhash import vip_filter_bit
from lb.dataplane.keys import PROTO_NUMBERS, addr16, addr_from16, family_of, proto_name
from lb.dataplane.mapio import AddrKey, MapIO, RealVal, VipMapKey
from lb.dataplane.protect import SrcKey
from lb.errors import KernelError
from lb.timing import RING_BUCKETS, Histogram

if TYPE_CHECKING:
    from lb.dataplane.loader import Balancer

def _addr_text(family: int, raw: bytes) -> str:
    return str(addr_from16(raw, family))


def _real_identity(val: RealVal) -> str:
    """The identity (canonical address text) of the backend a reals value holds."""
    return _addr_text(FAMILY_V6 if val[1] & REAL_F_V6 else FAMILY_V4, val[0])


def vip_map_key(vip: VipSpec) -> VipMapKey:
    """The vip_map key of a VIP, as a plain tuple."""
    return (family_of(vip.address), addr16(vip.address), vip.port, PROTO_NUMBERS[vip.protocol])


def src_ranges_of(vip: VipSpec, num: int) -> dict[SrcKey, int]:
    """The src_v4 / src_v6 entries of a VIP numbered `num`."""
    family = family_of(vip.address)
    out: dict[SrcKey, int] = {}
    for verdict, nets in ((SRC_ALLOW, vip.allow), (SRC_DENY, vip.deny)):
        for net in nets:
            out[(family, num, addr16(net.network_address), net.prefixlen)] = verdict
    return out


def _src_text(key: SrcKey, names: Mapping[int, str]) -> str:
    family, num, raw, plen = key
    return f"{names.get(num, f'vip_num {num}')} {_addr_text(family, raw)}/{plen}"


def _verdict_text(v: int | None) -> str | None:
    return None if v is None else {SRC_ALLOW: "allow", SRC_DENY: "deny"}.get(v, str(v))


def key_text(key: VipMapKey) -> str:
    """A vip_map key as a VIP id (the protocol number when it is not tcp/udp)."""
    family, raw, port, proto = key
    return vip_id(proto_name(proto), addr_from16(raw, family), port)


# -- pure: rings, images, plans --------------------------------------------------------


def _ring_key(vip: VipSpec) -> tuple[tuple[str, int], ...]:
    return vip.ring_members()


#: A VIP's second-chance window as the rings see it: the previous ring's members and, per
#: member, the backend index a second hop may name (0: not a backend any more).
WindowKey = tuple[tuple[tuple[str, int], ...], tuple[int, ...]]


def window_key(vip: VipSpec, real_idx: Mapping[str, int]) -> WindowKey | None:
    """The VIP's open window for the rings (None: no second hops). A previous backend is
    a usable second hop while the VIP still has it in the data plane (active or draining)."""
    w = vip.second_window
    if w is None or not vip.second_chance_on:
        return None
    members = w.members()
    usable = {b.identity for b in vip.backends if b.in_reals}
    return members, tuple(real_idx.get(i, 0) if i in usable else 0 for i, _ in members)


def real_indices(values: array[int]) -> array[int]:
    """Ring values without their second hops: the backend index of every slot."""
    v = np.frombuffer(values, np.uint32)
    if not (v >> RING_PREV_SHIFT).any():
        return values
    return array("I", (v & RING_REAL_MASK).astype(np.uint32).tobytes())


def with_second_hops(values: array[int], prev: maglev.Ring, prev_idx: Sequence[int]) -> array[int]:
    """`values` where every slot whose backend is not the one `prev` gave it carries that
    previous backend (its index from `prev_idx`, per endpoint; 0 = none) in its high half
    (docs/second-chance.md)."""
    if prev.empty:
        return values
    table = np.asarray(prev_idx, np.uint32)
    before = table[np.frombuffer(prev.slots, np.uint32)]
    cur = np.frombuffer(values, np.uint32)
    hop = (before != 0) & (before != cur) & (cur != 0)
    if not hop.any():
        return values
    out = np.where(hop, cur | (before << RING_PREV_SHIFT), cur).astype(np.uint32)
    return array("I", out.tobytes())


def second_hop_slots(values: Sequence[int]) -> int:
    """Slots of ring values that carry a second hop."""
    return int(np.count_nonzero(np.frombuffer(_u32(values), np.uint32) >> RING_PREV_SHIFT))


def _u32(values: Sequence[int]) -> array[int]:
    if isinstance(values, array) and values.typecode == "I":
        return values
    return array("I", values)


@dataclass
class _RingEntry:
    spec: VipSpec
    key: tuple[tuple[str, int], ...]
    idx: tuple[int, ...]
    values: array[int]
    window: WindowKey | None = None


#: Provisional indices for backends a plan adds (never written: above any real index).
_PROVISIONAL = 0x8000_0000


# Fingerprints remembered before the cache starts over.
_FINGERPRINTS_KEPT = 4096


class RingCache:
    """Each VIP's ring as data-plane values (backend indices), rebuilt only on change.

    Only the values are kept, 4 bytes per slot per VIP (the Ring is dropped once
    translated). `values` returns the same array object while a VIP's ring-relevant
    backends and their indices stay the same, which lets the reconciler skip the diff.
    Rings built ahead (`prebuild`, `moved`) wait in `_pending` for the apply that follows:
    a Maglev ring depends on identities and weights only, not on backend indices.
    """

    def __init__(self, ring_size: int, seed: int = maglev.DEFAULT_SEED) -> None:
        self.ring_size = ring_size
        self.seed = seed
        self._entries: dict[str, _RingEntry] = {}
        self._pending: dict[str, tuple[tuple[tuple[str, int], ...], maglev.Ring]] = {}
        # Ring keys by spec object (held, so its id is not reused) until the next forget().
        self._keys: dict[int, tuple[VipSpec, tuple[tuple[str, int], ...]]] = {}
        self._fingerprints: dict[tuple[tuple[str, int], ...], str] = {}
        # Previous rings of open second-chance windows, by their members.
        self._previous: dict[tuple[tuple[str, int], ...], maglev.Ring] = {}
        #: Time of each ring this cache built (any thread), for /metrics.
        self.build_seconds = Histogram(RING_BUCKETS)

    def key(self, vip: VipSpec) -> tuple[tuple[str, int], ...]:
        """The VIP's ring-relevant backends: sorted (identity, weight) of those in the ring."""
        hit = self._keys.get(id(vip))
        if hit is not None and hit[0] is vip:
            return hit[1]
        k = _ring_key(vip)
        self._keys[id(vip)] = (vip, k)
        return k

    def _build(self, key: tuple[tuple[str, int], ...]) -> maglev.Ring:
        with self.build_seconds.time():
            return maglev.build_ring(
                (maglev.Endpoint(i, w) for i, w in key), self.ring_size, seed=self.seed
            )

    def _ring(self, vip_id: str, key: tuple[tuple[str, int], ...]) -> maglev.Ring:
        p = self._pending.pop(vip_id, None)
        if p is not None and p[0] == key:
            return p[1]
        return self._build(key)

    def prebuild(self, vip: VipSpec) -> None:
        """Build the VIP's ring now (e.g. while the store syncs) for the next `values`."""
        self.prebuild_all([vip])

    def prebuild_all(self, vips: Iterable[VipSpec], helper: Executor | None = None) -> None:
        """`prebuild` these VIPs' rings; with a `helper` thread, two at a time.

        The ring fill lets go of the GIL, so two rings build in parallel on two cores.
        """
        todo: list[tuple[str, tuple[tuple[str, int], ...]]] = []
        for vip in vips:
            e = self._entries.get(vip.id)
            key = self.key(vip)
            p = self._pending.get(vip.id)
            if (e is None or e.key != key) and (p is None or p[0] != key):
                todo.append((vip.id, key))
        built: dict[str, tuple[tuple[tuple[str, int], ...], maglev.Ring]] = {}
        jobs = iter(todo)  # shared: each ring is taken by whichever thread is free

        def work() -> None:
            for vid, key in jobs:
                built[vid] = (key, self._build(key))

        other = helper.submit(work) if helper is not None and len(todo) > 1 else None
        try:
            work()
        finally:
            if other is not None:
                other.result()
            self._pending.update(built)

    def values(self, vip: VipSpec, real_idx: Mapping[str, int]) -> array[int]:
        """The VIP's ring as backend indices; the same object while nothing changed."""
        e = self._entries.get(vip.id)
        if e is not None and e.spec is vip:  # specs are immutable: same object, same ring
            return e.values
        key = self.key(vip)
        # The key is sorted by identity, like the ring's endpoints.
        idx = tuple(real_idx[i] for i, _ in key)
        window = window_key(vip, real_idx)
        if e is not None and e.key == key and e.idx == idx and e.window == window:
            e.spec = vip
            return e.values
        ring = self._ring(vip.id, key)
        values = maglev.ring_to_values(ring, dict(zip(ring.endpoints, idx, strict=True)))
        if window is not None:
            values = with_second_hops(values, self.previous(window[0]), window[1])
        self._entries[vip.id] = _RingEntry(vip, key, idx, values, window)
        return values

    def previous(self, members: tuple[tuple[str, int], ...]) -> maglev.Ring:
        """The ring these members build (a window's previous ring), kept while in use."""
        ring = self._previous.get(members)
        if ring is None:
            if len(self._previous) >= _FINGERPRINTS_KEPT:
                self._previous.clear()
            ring = self._previous[members] = self._build(members)
        return ring

    def moved(self, old: VipSpec, new: VipSpec, real_idx: Mapping[str, int]) -> float:
        """Fraction of ring slots that name another backend once `old` becomes `new`."""
        return self.preview(old, new, real_idx)[0]

    def preview(self, old: VipSpec, new: VipSpec, real_idx: Mapping[str, int]
                ) -> tuple[float, int]:
        """`moved`, and the slots that would carry a second hop (their previous backend, if
        `new` has second chance on and keeps that backend) once `old` becomes `new`."""
        before = real_indices(self.values(old, real_idx))
        key = self.key(new)
        ring = self._ring(new.id, key)
        self._pending[new.id] = (key, ring)
        index_of: dict[str, int] = {}
        for i in ring.endpoints:
            index_of[i] = real_idx.get(i, _PROVISIONAL + len(index_of))
        after = maglev.ring_to_values(ring, index_of)
        # Indices are one-to-one with identities, so differing values = moved slots.
        moved = len(maglev.changed_slots(before, after)) / self.ring_size
        hops = 0
        if new.second_chance_on and new.second_chance_window_s > 0:
            keep = [real_idx[b.identity] for b in new.backends
                    if b.in_reals and b.identity in real_idx]
            b = np.frombuffer(before, np.uint32)
            a = np.frombuffer(after, np.uint32)
            hops = int(np.count_nonzero((b != a) & (a != 0) & np.isin(b, keep)))
        return moved, hops

    def fingerprint(self, vip: VipSpec) -> str:
        """Ring.fingerprint of the VIP's ring: by backend identity, so it does not depend on
        the indices a host assigned (cached by the ring-relevant backends)."""
        # _ring_key, not key(): readers run beside the writer and must not touch _keys.
        key = _ring_key(vip)
        fp = self._fingerprints.get(key)
        if fp is None:
            fp = self._build(key).fingerprint()
            if len(self._fingerprints) >= _FINGERPRINTS_KEPT:
                self._fingerprints.clear()
            self._fingerprints[key] = fp
        return fp

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the rings of VIPs not in `keep`, and every leftover built ahead."""
        keep = set(keep)
        for vid in [v for v in self._entries if v not in keep]:
            del self._entries[vid]
        self._pending.clear()
        self._keys.clear()


@dataclass
class MapImage:
    """What the maps hold (or should hold), as plain Python values."""

    vip_map: dict[VipMapKey, tuple[int, int]] = field(default_factory=dict)
    vip_addrs: dict[AddrKey, int] = field(default_factory=dict)
    reals: dict[int, RealVal] = field(default_factory=dict)
    #: Ring values per VIP number (only the rings of interest are present).
    rings: dict[int, array[int]] = field(default_factory=dict)
    #: The VIP address filter: (armed, bits set); None when not computed or not read. Not
    #: part of equality: the incremental image does not keep it (diff_images compares it).
    vip_filter: tuple[bool, frozenset[int]] | None = field(default=None, compare=False)
    #: Source ranges (src_v4 / src_v6) -> SRC_ALLOW / SRC_DENY.
    src_ranges: dict[SrcKey, int] = field(default_factory=dict)


def desired_image(
    vips: Iterable[VipSpec],
    vip_nums: Mapping[str, int],
    real_idx: Mapping[str, int],
    rings: RingCache,
) -> MapImage:
    """Every map entry the desired state implies."""
    img = MapImage()
    for vip in vips:
        num = vip_nums[vip.id]
        img.vip_map[vip_map_key(vip)] = (num, vip.flags)
        akey = (family_of(vip.address), addr16(vip.address))
        img.vip_addrs[akey] = img.vip_addrs.get(akey, 0) + 1
        img.rings[num] = rings.values(vip, real_idx)
        img.src_ranges.update(src_ranges_of(vip, num))
        for b in vip.backends:
            if b.in_reals:
                flags = REAL_F_V6 if b.address.version == 6 else 0
                img.reals[real_idx[b.identity]] = (addr16(b.address), flags)
    img.vip_filter = (True, frozenset(vip_filter_bit(*k) for k in img.vip_addrs))
    return img


@dataclass
class Touched:
    """Keys of each map a change may have altered (None: every key)."""

    vip_map: set[VipMapKey] = field(default_factory=set)
    vip_addrs: set[AddrKey] = field(default_factory=set)
    reals: set[int] = field(default_factory=set)
    rings: set[int] = field(default_factory=set)
    #: (VIP number, backend index) pairs that left a VIP's set while the VIP kept its number.
    left_pairs: set[tuple[int, int]] = field(default_factory=set)
    src_ranges: set[SrcKey] = field(default_factory=set)


@dataclass
class _Share:
    """What one VIP puts into the desired image."""

    spec: VipSpec
    num: int
    key: VipMapKey
    akey: AddrKey
    reals: dict[int, RealVal]
    src: dict[SrcKey, int] = field(default_factory=dict)


class DesiredImage:
    """The desired image kept up to date VIP by VIP, so a change costs what it touches.

    `sync` compares the stored VIP objects by identity (the store replaces a VIP's object
    when it changes) and redoes only the VIPs that changed; `desired_image` recomputes
    everything and is what `verify` trusts.
    """

    def __init__(self, rings: RingCache) -> None:
        self.rings = rings
        self.image = MapImage()
        self._shares: dict[str, _Share] = {}
        self._real_refs: dict[int, int] = {}

    def sync(
        self,
        vips: Mapping[str, VipSpec],
        vip_nums: Mapping[str, int],
        real_idx: Mapping[str, int],
    ) -> Touched:
        """Bring the image to these VIPs; returns the keys that may have changed."""
        touched = Touched()
        for vid in [v for v in self._shares if v not in vips]:
            self._remove(vid, touched)
        changed = []
        replaced: list[_Share] = []
        for vid, spec in vips.items():
            share = self._shares.get(vid)
            if share is not None and share.spec is spec and share.num == vip_nums[vid]:
                continue
            if share is not None:
                self._remove(vid, touched)
                replaced.append(share)
            changed.append((spec, vip_nums[vid]))
        # Adds after every removal: a VIP number may pass from one VIP to another.
        for spec, num in changed:
            self._add(spec, num, real_idx, touched)
        for old in replaced:
            new = self._shares[old.spec.id]
            if new.num == old.num:
                touched.left_pairs.update((old.num, i) for i in old.reals if i not in new.reals)
        # The filter follows the addresses, as desired_image makes it (one bit per address).
        img = self.image
        img.vip_filter = (True, frozenset(vip_filter_bit(*k) for k in img.vip_addrs))
        return touched

    def pairs(self) -> set[tuple[int, int]]:
        """Every (VIP number, backend index) the desired state lets a slot name."""
        return {(s.num, i) for s in self._shares.values() for i in s.reals}

    def _add(self, spec: VipSpec, num: int, real_idx: Mapping[str, int], t: Touched) -> None:
        img = self.image
        key = vip_map_key(spec)
        akey = (key[0], key[1])
        reals: dict[int, RealVal] = {}
        for b in spec.backends:
            if b.in_reals:
                flags = REAL_F_V6 if b.address.version == 6 else 0
                reals[real_idx[b.identity]] = (addr16(b.address), flags)
        src = src_ranges_of(spec, num)
        self._shares[spec.id] = _Share(spec, num, key, akey, reals, src)
        img.src_ranges.update(src)
        t.src_ranges.update(src)
        img.vip_map[key] = (num, spec.flags)
        img.vip_addrs[akey] = img.vip_addrs.get(akey, 0) + 1
        img.rings[num] = self.rings.values(spec, real_idx)
        for idx, val in reals.items():
            self._real_refs[idx] = self._real_refs.get(idx, 0) + 1
            img.reals[idx] = val
        t.vip_map.add(key)
        t.vip_addrs.add(akey)
        t.rings.add(num)
        t.reals.update(reals)

    def _remove(self, vid: str, t: Touched) -> None:
        img = self.image
        share = self._shares.pop(vid)
        for skey in share.src:
            img.src_ranges.pop(skey, None)
        t.src_ranges.update(share.src)
        del img.vip_map[share.key]
        n = img.vip_addrs[share.akey] - 1
        if n:
            img.vip_addrs[share.akey] = n
        else:
            del img.vip_addrs[share.akey]
        del img.rings[share.num]
        for idx in share.reals:
            r = self._real_refs[idx] - 1
            if r:
                self._real_refs[idx] = r
            else:
                del self._real_refs[idx]
                del img.reals[idx]
        t.vip_map.add(share.key)
        t.vip_addrs.add(share.akey)
        t.rings.add(share.num)
        t.reals.update(share.reals)


def plan_change(
    current: Mapping[str, VipSpec],
    target: Sequence[VipSpec],
    generation: int,
    rings: RingCache,
    real_idx: Mapping[str, int],
) -> Plan:
    """What replacing `current` by `target` adds, removes and changes (pure).

    `real_idx` holds the backend indices of `current`.
    """
    target_ids = {v.id for v in target}
    added = [v.id for v in target if v.id not in current]
    removed = [vid for vid in current if vid not in target_ids]
    changed: list[VipPlan] = []
    for new in target:
        old = current.get(new.id)
        if old is None or old == new:
            continue
        old_b = {b.identity: b for b in old.backends}
        new_b = {b.identity: b for b in new.backends}
        moved, hops = 0.0, 0
        if rings.key(old) != rings.key(new):
            moved, hops = rings.preview(old, new, real_idx)
        changed.append(
            VipPlan(
                vip_id=new.id,
                flags_changed=old.flags != new.flags,
                ranges_changed=(old.allow, old.deny) != (new.allow, new.deny),
                added_backends=[a for a in new_b if a not in old_b],
                removed_backends=[a for a in old_b if a not in new_b],
                changed_backends=[
                    BackendChange(address=a, before=old_b[a], after=b)
                    for a, b in new_b.items()
                    if a in old_b and old_b[a] != b
                ],
                moved_fraction=moved,
                second_hop_slots=hops,
            )
        )
    return Plan(
        from_generation=generation, added_vips=added, removed_vips=removed, changed_vips=changed
    )


def _meta_text(v: tuple[int, int] | None) -> str | None:
    return None if v is None else f"vip_num={v[0]} flags={v[1]:#x}"


def _real_text(v: RealVal | None) -> str | None:
    if v is None:
        return None
    family = FAMILY_V6 if v[1] & REAL_F_V6 else FAMILY_V4
    return f"{_addr_text(family, v[0])} flags={v[1]:#x}"


def diff_images(want: MapImage, have: MapImage, names: Mapping[int, str]) -> list[Drift]:
    """Differences between two images; `names` gives the VIP id of each ring number."""
    drifts: list[Drift] = []
    for key in sorted(want.vip_map.keys() | have.vip_map.keys()):
        w, h = want.vip_map.get(key), have.vip_map.get(key)
        if w != h:
            drifts.append(Drift(map="vip_map", key=key_text(key), expected=_meta_text(w),
                                actual=_meta_text(h)))
    for akey in sorted(want.vip_addrs.keys() | have.vip_addrs.keys()):
        wc, hc = want.vip_addrs.get(akey), have.vip_addrs.get(akey)
        if wc != hc:
            drifts.append(Drift(
                map="vip_addrs", key=_addr_text(*akey),
                expected=None if wc is None else f"{wc} VIPs",
                actual=None if hc is None else f"{hc} VIPs",
            ))
    if want.vip_filter is not None and have.vip_filter is not None:
        (w_on, w_bits), (h_on, h_bits) = want.vip_filter, have.vip_filter
        if (w_on, w_bits) != (h_on, h_bits):
            missing, extra = len(w_bits - h_bits), len(h_bits - w_bits)
            drifts.append(Drift(
                map="vip_filter", key="0",
                expected=f"armed, {len(w_bits)} address bits",
                actual=f"{'armed' if h_on else 'not armed'}, {len(h_bits)} address bits"
                       f" ({missing} missing: their VIPs' packets go to the stack;"
                       f" {extra} extra)",
            ))
    for skey in sorted(want.src_ranges.keys() | have.src_ranges.keys()):
        ws, hs = want.src_ranges.get(skey), have.src_ranges.get(skey)
        if ws != hs:
            drifts.append(Drift(map="src_ranges", key=_src_text(skey, names),
                                expected=_verdict_text(ws), actual=_verdict_text(hs)))
    for idx in sorted(want.reals.keys() | have.reals.keys()):
        wr, hr = want.reals.get(idx), have.reals.get(idx)
        if wr != hr:
            drifts.append(Drift(map="reals", key=str(idx), expected=_real_text(wr),
                                actual=_real_text(hr)))
    for num in sorted(want.rings):
        wv, hv = want.rings[num], have.rings.get(num)
        if hv is None:
            continue
        changed = maglev.changed_slots(hv, wv)
        if changed:
            first = changed[0]
            drifts.append(Drift(
                map="ch_rings", key=names.get(num, f"vip_num {num}"),
                expected=f"{len(wv)} slots as Maglev builds them",
                actual=f"{len(changed)} slots differ (slot {first}: backend index "
                       f"{hv[first]}, expected {wv[first]})",
            ))
    return drifts


@dataclass
class ApplyResult:
    """What one reconciliation wrote."""

    ring_slots: int = 0
    entries: int = 0
    #: Connection-table slots freed (of numbers and indices freed, or found stale).
    purged: int = 0


class _Writer:
    """One apply's map writes, step by step in the order the data plane needs.

    `have` is updated after every write, so a failure leaves it describing the maps; every
    write is a crash point ("reconcile-write"), every purge one more ("before-purge").
    """

    def __init__(
        self,
        io: MapIO,
        have: MapImage,
        want: MapImage,
        touched: Touched | None,
        ring_of: Callable[[MapImage, int], array[int]],
    ) -> None:
        self.io, self.have, self.want, self._ring_of = io, have, want, ring_of
        self.res = ApplyResult()
        # VIP numbers and backend indices whose slots go, once nothing writes such slots.
        self.gone_nums: set[int] = set()
        self.gone_idx: set[int] = set()
        self.gone_pairs: set[tuple[int, int]] = set(touched.left_pairs) if touched else set()
        # VIP numbers whose ranges or range flags changed: stamped in src_changed once all is
        # written. A full write (a start, or after a failed one) stamps every VIP with
        # ranges: a change a crash cut short may have left entries that trust an old verdict.
        self.src_nums: set[int] = set() if touched else {
            num for num, flags in want.vip_map.values() if flags & F_SRC_RANGES}
        if touched is None:
            self.vip_keys = list(want.vip_map.keys() | have.vip_map.keys())
            self.addr_keys = list(want.vip_addrs.keys() | have.vip_addrs.keys())
            self.real_keys = sorted(want.reals.keys() | have.reals.keys())
            self.ring_nums = sorted(want.rings.keys() | have.rings.keys())
            self.src_keys = list(want.src_ranges.keys() | have.src_ranges.keys())
        else:
            self.vip_keys = list(touched.vip_map)
            self.addr_keys = list(touched.vip_addrs)
            self.real_keys = sorted(touched.reals)
            self.ring_nums = sorted(touched.rings)
            self.src_keys = list(touched.src_ranges)

    def _step(self) -> None:
        self.res.entries += 1
        crash_point("reconcile-write")

    def purge(self) -> None:
        """Free the conn_table slots of the numbers and indices given up so far."""
        if self.gone_nums or self.gone_idx:
            crash_point("before-purge")
            self.res.purged += self.io.purge_conns(self.gone_nums, self.gone_idx)
            self.gone_nums.clear()
            self.gone_idx.clear()

    def purge_pairs(self) -> None:
        """Free the slots of backends that left a VIP's set (its ring no longer names them;
        their index may live on for other VIPs)."""
        pairs = {(n, i) for n, i in self.gone_pairs if n not in self.gone_nums}
        if pairs:
            crash_point("before-purge")
            self.res.purged += self.io.purge_conn_pairs(pairs)
        self.gone_pairs.clear()

    def retire_reused_numbers(self) -> None:
        """A VIP number handed to another VIP in this change (only when the table is full):
        the old VIP stops using it before its ring is rewritten."""
        want, have = self.want, self.have
        owner = {want.vip_map[k][0]: k for k in self.vip_keys if k in want.vip_map}
        for key in self.vip_keys:
            h = have.vip_map.get(key)
            if h is not None and h[0] in owner and owner[h[0]] != key:
                self.io.del_vip(key)
                del have.vip_map[key]
                self.gone_nums.add(h[0])
                self._step()

    def empty_reused_backends(self) -> None:
        """An index that passes to another backend (reused within one change, only when
        max_reals is full; or found so at a start) is emptied first: until the rings are
        rewritten, their slots still naming the old backend drop (STAT_NO_BACKEND) rather
        than reach the new one, and no new conn_table slot names the index."""
        for idx in self.real_keys:
            val, prev = self.want.reals.get(idx), self.have.reals.get(idx)
            if val is not None and prev is not None and prev != val:
                self.io.set_real(idx, None)
                del self.have.reals[idx]
                self.gone_idx.add(idx)
                self._step()

    def program_backends(self, new_idx: set[int]) -> None:
        """Backends first: every index a ring is about to name is programmed."""
        fresh = [i for i in self.real_keys if i in new_idx and i in self.want.reals]
        if fresh:
            self.io.reset_counters((), fresh)
        for idx in self.real_keys:
            val = self.want.reals.get(idx)
            if val is not None and self.have.reals.get(idx) != val:
                self.io.set_real(idx, val)
                self.have.reals[idx] = val
                self._step()

    def write_rings(self) -> None:
        """Ring slots, only those that change."""
        for num in self.ring_nums:
            values = self.want.rings.get(num)
            if values is None:
                continue
            old = self._ring_of(self.have, num)
            if old is values:
                continue
            changed = maglev.changed_slots(old, values)
            if changed:
                self.io.write_ring(num, changed, values)
                self.res.ring_slots += len(changed)
                self._step()
            self.have.rings[num] = values

    def add_addresses(self) -> None:
        """Addresses gaining a VIP (and their filter bit), before the VIP entries."""
        for akey in self.addr_keys:
            n = self.want.vip_addrs.get(akey, 0)
            if self.have.vip_addrs.get(akey, 0) < n:
                self.io.set_vip_addr(akey, n)
                self.have.vip_addrs[akey] = n
                self._step()

    def add_src_ranges(self) -> None:
        """Source ranges new or changed, before the VIP entries whose flags turn them on."""
        for skey in self.src_keys:
            v = self.want.src_ranges.get(skey)
            if v is not None and self.have.src_ranges.get(skey) != v:
                self.io.set_src_range(skey, v)
                self.have.src_ranges[skey] = v
                self.src_nums.add(skey[1])
                self._step()

    def remove_src_ranges(self) -> None:
        """Source ranges no longer wanted, once no VIP entry's flags need them."""
        for skey in self.src_keys:
            if skey not in self.want.src_ranges and skey in self.have.src_ranges:
                self.io.del_src_range(skey)
                del self.have.src_ranges[skey]
                self.src_nums.add(skey[1])
                self._step()

    def stamp_src_changes(self) -> None:
        """Last: entries of VIPs whose ranges changed check their source again (srcrange.h).
        After every trie and flag write, so no packet checked against the old ranges can
        leave a stamp later than this one."""
        if self.src_nums:
            self.io.mark_src_changed(sorted(self.src_nums))
            self.src_nums.clear()

    def write_vips(self, new_nums: set[int]) -> None:
        """The VIP entries, new or with new flags: the last write that makes a VIP live."""
        fresh = [num for num in new_nums if num in self.want.rings]
        if fresh:
            self.io.reset_counters(fresh, ())
        for key in self.vip_keys:
            meta = self.want.vip_map.get(key)
            h = self.have.vip_map.get(key)
            if meta is not None and h != meta:
                self.io.set_vip(key, *meta)
                self.have.vip_map[key] = meta
                if meta[1] & F_SRC_RANGES:
                    self.src_nums.add(meta[0])
                if h is not None and h[0] != meta[0]:
                    self.gone_nums.add(h[0])  # the VIP was deleted and created again
                self._step()

    def delete_vips(self) -> None:
        """VIP entries no longer wanted: the first write that takes a VIP down."""
        for key in self.vip_keys:
            if key not in self.want.vip_map and key in self.have.vip_map:
                self.io.del_vip(key)
                self.gone_nums.add(self.have.vip_map.pop(key)[0])
                self._step()

    def shrink_addresses(self) -> None:
        """Addresses that carry fewer VIPs, or none."""
        for akey in self.addr_keys:
            w = self.want.vip_addrs.get(akey, 0)
            n = self.have.vip_addrs.get(akey, 0)
            if w == 0 and akey in self.have.vip_addrs:
                self.io.del_vip_addr(akey)
                del self.have.vip_addrs[akey]
                self._step()
            elif w != n:
                self.io.set_vip_addr(akey, w)
                self.have.vip_addrs[akey] = w
                self._step()

    def clear_rings(self) -> None:
        """The rings of deleted VIPs, zeroed."""
        for num in self.ring_nums:
            if num in self.want.rings or num not in self.have.rings:
                continue
            old = self.have.rings.pop(num)
            zeros = array("I", bytes(4 * len(old)))
            changed = maglev.changed_slots(old, zeros)
            if changed:
                self.io.write_ring(num, changed, zeros)
                self.res.ring_slots += len(changed)
                self._step()

    def free_backends(self, real_idx: Mapping[str, int]) -> None:
        """Backends no ring names any more. A disabled backend keeps its index (and its
        slots, which now miss); a removed one, or a stray entry, leaves it free."""
        for idx in self.real_keys:
            if idx not in self.want.reals and idx in self.have.reals:
                self.io.set_real(idx, None)
                if real_idx.get(_real_identity(self.have.reals.pop(idx))) != idx:
                    self.gone_idx.add(idx)
                self._step()


class Reconciler:
    """Brings the maps to the desired image, in data-plane-safe order."""

    def __init__(self, balancer: Balancer, seed: int = maglev.DEFAULT_SEED) -> None:
        self.io = MapIO(balancer)
        self.rings = RingCache(balancer.config.ring_size, seed)
        self.desired = DesiredImage(self.rings)
        #: What the maps hold, as far as this process wrote them (None: read them back).
        self._known: MapImage | None = None
        #: The addresses the VIP filter was last armed with (None: write it on next apply).
        self._filter_addrs: frozenset[AddrKey] | None = None

    def invalidate(self) -> None:
        """Forget what the maps hold; the next apply reads them back first."""
        self._known = None
        self._filter_addrs = None

    def close(self) -> None:
        """Release what this process mapped (the maps keep their content)."""
        self.io.close()

    def reset(self) -> None:
        """Forget everything: the next apply rebuilds the image and reads the maps back."""
        self._known = None
        self._filter_addrs = None
        self.desired = DesiredImage(self.rings)

    def read(self, want: MapImage) -> MapImage:
        """What the maps hold now: every entry, and the rings `want` has or stale VIPs use."""
        io = self.io
        have = MapImage(io.read_vip_map(), io.read_vip_addrs(), io.read_reals())
        have.vip_filter = io.read_vip_filter()
        have.src_ranges = io.read_src_ranges()
        nums = set(want.rings) | {num for num, _ in have.vip_map.values()}
        for num in sorted(nums):
            if 0 <= num < self.io.b.config.max_vips:
                have.rings[num] = io.read_ring(num)
        return have

    def full_image(
        self, vips: Iterable[VipSpec], vip_nums: Mapping[str, int], real_idx: Mapping[str, int]
    ) -> MapImage:
        """The image of a desired state, recomputed from scratch (rings from the cache)."""
        return desired_image(vips, vip_nums, real_idx, self.rings)

    def apply(
        self,
        vips: Mapping[str, VipSpec],
        vip_nums: Mapping[str, int],
        real_idx: Mapping[str, int],
        *,
        new_vip_nums: Iterable[int] = (),
        new_real_idx: Iterable[int] = (),
    ) -> ApplyResult:
        """Write what differs between the maps and this state; KernelError on failure.

        When the maps are known (every earlier write went through), only the keys of the
        VIPs that changed are compared; otherwise the maps are read back and compared whole,
        and the connection-table slots naming a VIP number or backend the maps do not hold
        are freed first (left by a purge that a crash or a failed write cut short).
        """
        touched: Touched | None = self.desired.sync(vips, vip_nums, real_idx)
        want = self.desired.image
        have = self._known
        read_back = have is None
        if have is None:
            have = self.read(want)
            touched = None
        self._known = None  # until every write went through
        try:
            purged = 0
            if read_back:
                # A process that died between a vip_map write and its generation bump left
                # the data plane's cached VIP lookups trusted: they go first.
                self.io.reset_vip_cache()
                # Before any write: a number or an index about to be programmed for a new
                # owner must not find slots of its old one.
                purged = self.io.purge_stale_conns(
                    {num for num, _ in have.vip_map.values()}, have.reals
                )
            res = self._write(have, want, touched, set(new_vip_nums), set(new_real_idx),
                              real_idx)  # fmt: skip
            if read_back:
                # Once the rings are written: no VIP keeps slots naming a backend it no longer
                # has (another VIP keeping the index), left by a change a crash cut short.
                purged += self.io.purge_conn_pairs(self.desired.pairs(), outside=True)
            res.purged += purged
            addrs = frozenset(want.vip_addrs)
            if addrs != self._filter_addrs:
                # After the deletes: stale bits only cost a vip_map lookup, missing ones
                # would pass a VIP's packets to the stack.
                self.io.write_vip_filter(addrs)
                self._filter_addrs = addrs
        except KernelError:
            raise
        except Exception as e:  # BCC raises bare Exception / KeyError for failed syscalls
            raise KernelError(f"writing the maps failed: {e}") from e
        self._known = have  # now equal to `want`
        return res

    def _ring_of(self, have: MapImage, num: int) -> array[int]:
        ring = have.rings.get(num)
        if ring is None:
            ring = have.rings[num] = self.io.read_ring(num)
        return ring

    def _write(
        self,
        have: MapImage,
        want: MapImage,
        touched: Touched | None,
        new_nums: set[int],
        new_idx: set[int],
        real_idx: Mapping[str, int],
    ) -> ApplyResult:
        w = _Writer(self.io, have, want, touched, self._ring_of)
        try:
            # Creation order: nothing the data plane can reach names what is not there yet.
            w.retire_reused_numbers()
            w.empty_reused_backends()
            w.purge()  # slots of what was handed over go before the new owners are written
            w.program_backends(new_idx)
            w.write_rings()
            w.add_addresses()
            w.add_src_ranges()
            w.write_vips(new_nums)
            # Deletion in reverse, then the conn_table slots naming what was freed.
            w.delete_vips()
            w.remove_src_ranges()
            w.shrink_addresses()
            w.clear_rings()
            w.free_backends(real_idx)
            w.purge()
            w.purge_pairs()
        except BaseException:
            # The ranges written before the failure are live: their VIPs' flows check again
            # now, not at the retry (which stamps every VIP with ranges).
            with contextlib.suppress(Exception):
                w.stamp_src_changes()
            raise
        w.stamp_src_changes()
        return w.res
