"""The balancer's maps read and written from Python: plain-tuple map I/O and batched lookups.

`MapIO` is the reconciler's view of the maps (lb.control.reconcile): keys and values as plain
tuples (`VipMapKey`, `AddrKey`, `RealVal`), ring slices through the batched bpf(2) commands
(one call per ring instead of 65,537), the VIP filter, and the mapped connection table.
`array_lookup` / `array_items` are the one batched-lookup loop over array maps (rings, reals);
`Pinned` reads maps pinned by a running daemon with raw bpf(2), for tools that must not need a
compiler (the doctor).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lb.dataplane import bpf, cstructs, protect
from lb.dataplane.conntab import ConnTable
from lb.dataplane.flowhash import vip_filter_bit
from lb.dataplane.keys import IPAddress, family_of, mac_text, raw_addr, set_addr, set_raw_addr
from lb.errors import KernelError

if TYPE_CHECKING:
    from lb.dataplane.loader import Balancer

#: vip_map key as Python sees it: (family, 16 address bytes, port in host order, IP proto).
VipMapKey = tuple[int, bytes, int, int]
#: vip_addrs key: (family, 16 address bytes).
AddrKey = tuple[int, bytes]
#: reals value: (16 address bytes, REAL_F_* flags).
RealVal = tuple[bytes, int]

#: Entries fetched per BPF_MAP_LOOKUP_BATCH call when scanning a whole map.
BATCH = 4096


def array_lookup(fd: int, keys: int, values: int, key_size: int, value_size: int, count: int,
                 *, first: int = 0) -> int:
    """Read `count` entries of an array map from index `first` into the buffers at `keys`
    and `values` with BPF_MAP_LOOKUP_BATCH; returns how many were read (fewer only at the
    end of the map). OSError with the errno when the kernel refuses (EINVAL: no batch ops)."""
    done = 0
    prev = ctypes.c_uint32()
    nxt = ctypes.c_uint32()
    while done < count:
        attr = bpf.BatchAttr()
        if first + done > 0:
            # An array's batch token is the last index read; the next one follows it.
            prev.value = first + done - 1
            attr.in_batch = ctypes.addressof(prev)
        attr.out_batch = ctypes.addressof(nxt)
        attr.keys = keys + key_size * done
        attr.values = values + value_size * done
        attr.count = count - done
        attr.map_fd = fd
        err = bpf.bpf_errno(bpf.BPF_MAP_LOOKUP_BATCH, attr)
        if err not in (0, errno.ENOENT):
            raise OSError(err, os.strerror(err))
        done += attr.count
        if err == errno.ENOENT or attr.count == 0:
            break
    return done


def array_items(table: Any, chunk: int = BATCH) -> Iterator[tuple[int, Any]]:
    """(index, value) of every entry of a BCC array table, `chunk` entries per bpf(2) call."""
    keys = (table.Key * chunk)()
    values = (table.Leaf * chunk)()
    size_k, size_v = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
    start = 0
    while True:
        try:
            n = array_lookup(int(table.map_fd), ctypes.addressof(keys), ctypes.addressof(values),
                             size_k, size_v, chunk, first=start)
        except OSError as e:
            raise bpf.error("BPF_MAP_LOOKUP_BATCH failed", e.errno or 0, hints=False) from e
        for i in range(n):
            yield int(keys[i]), values[i]
        if n < chunk:
            return
        start += n


class MapIO:
    """Reads and writes the balancer's maps as the reconciler sees them (plain tuples)."""

    def __init__(self, balancer: Balancer) -> None:
        self.b = balancer
        self.ring_size = balancer.config.ring_size
        self.batched = bpf.supported()
        self._conns: ConnTable | None = None

    @property
    def _ring_fd(self) -> int:
        # Never cached: a program upgrade (Balancer.take_over) swaps the fds underneath.
        return int(self.b.ch_rings.map_fd)

    # -- batched u32 array access --

    def _ring_lookup(self, start: int, count: int) -> array[int]:
        out = array("I", bytes(4 * count))
        keys = array("I", bytes(4 * count))
        done = array_lookup(self._ring_fd, keys.buffer_info()[0], out.buffer_info()[0], 4, 4,
                            count, first=start)
        if done < count:
            raise KernelError(f"ch_rings: read {done} of {count} slots from {start}")
        return out

    def _ring_update(self, keys: array[int], values: array[int]) -> None:
        done = 0
        n = len(keys)
        kaddr, vaddr = keys.buffer_info()[0], values.buffer_info()[0]
        while done < n:
            attr = bpf.BatchAttr()
            attr.keys = kaddr + 4 * done
            attr.values = vaddr + 4 * done
            attr.count = n - done
            attr.map_fd = self._ring_fd
            err = bpf.bpf_errno(bpf.BPF_MAP_UPDATE_BATCH, attr)
            done += attr.count
            if err:
                raise OSError(err, os.strerror(err))

    def read_ring(self, vip_num: int) -> array[int]:
        """One VIP's ring values."""
        start = vip_num * self.ring_size
        if self.batched:
            try:
                return self._ring_lookup(start, self.ring_size)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise KernelError(f"ch_rings: batched read failed: {e}") from e
                self.batched = False
        t = self.b.ch_rings
        return array("I", (t[t.Key(start + k)].value for k in range(self.ring_size)))

    def write_ring(self, vip_num: int, slots: Sequence[int], values: array[int]) -> None:
        """Write `values[slot]` to each listed slot of one VIP's ring."""
        if not slots:
            return
        base = vip_num * self.ring_size
        if self.batched:
            keys = array("I", [base + s for s in slots])
            vals = array("I", [values[s] for s in slots])
            try:
                self._ring_update(keys, vals)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise KernelError(f"ch_rings: batched write failed: {e}") from e
                self.batched = False
        t = self.b.ch_rings
        for s in slots:
            t[t.Key(base + s)] = t.Leaf(values[s])

    # -- small maps through BCC --

    def read_vip_map(self) -> dict[VipMapKey, tuple[int, int]]:
        """Every vip_map entry."""
        out: dict[VipMapKey, tuple[int, int]] = {}
        for k, v in self.b.vip_map.items():
            out[(int(k.family), raw_addr(k.addr), socket.ntohs(k.port), int(k.proto))] = (
                int(v.vip_num), int(v.flags))
        return out

    def read_vip_addrs(self) -> dict[AddrKey, int]:
        """Every vip_addrs entry."""
        out: dict[AddrKey, int] = {}
        for k, v in self.b.vip_addrs.items():
            out[(int(k.family), raw_addr(k.addr))] = int(v.value)
        return out

    def read_reals(self) -> dict[int, RealVal]:
        """Every non-empty reals slot."""
        out: dict[int, RealVal] = {}
        zero = bytes(16)
        for k, v in self.b.reals.items():
            raw = raw_addr(v.addr)
            if raw != zero or v.flags:
                out[int(k.value)] = (raw, int(v.flags))
        return out

    def _vip_key(self, key: VipMapKey) -> Any:
        t = self.b.vip_map
        k = t.Key()
        set_raw_addr(k.addr, key[1])
        k.port = socket.htons(key[2])
        k.proto = key[3]
        k.family = key[0]
        return k

    def _addr_key(self, key: AddrKey) -> Any:
        k = self.b.vip_addrs.Key()
        set_raw_addr(k.addr, key[1])
        k.family = key[0]
        return k

    def set_vip(self, key: VipMapKey, vip_num: int, flags: int) -> None:
        """Create or change a vip_map entry."""
        t = self.b.vip_map
        leaf = t.Leaf()
        leaf.vip_num = vip_num
        leaf.flags = flags
        t[self._vip_key(key)] = leaf
        self._bump_vip_gen()

    def del_vip(self, key: VipMapKey) -> None:
        """Delete a vip_map entry (absent is fine)."""
        with contextlib.suppress(KeyError):
            del self.b.vip_map[self._vip_key(key)]
        self._bump_vip_gen()

    def _bump_vip_gen(self) -> None:
        # After the write: each CPU's cached VIP lookup (vip_cache) holds the generation it
        # read before its lookup, so from here on no packet uses what vip_map held before.
        t = self.b.vip_gen
        k = t.Key(0)
        t[k] = t.Leaf(int(t[k].value) + 1)

    def reset_vip_cache(self) -> None:
        """Move vip_map's generation on, so no CPU trusts what it cached before: at a start,
        when an earlier process may have died between a vip_map write and its bump.

        The entries are emptied only while vip_gen is 0 (a new map), when no program reads
        or writes them: a write from here while a packet reads its CPU's entry could tear
        it, and an entry of an older generation is never trusted anyway."""
        t = self.b.vip_gen
        if int(t[t.Key(0)].value) == 0:
            self.b.vip_cache.clearitem(self.b.vip_cache.Key(0))
        self._bump_vip_gen()

    def set_vip_addr(self, key: AddrKey, count: int) -> None:
        """Set how many VIPs sit on an address, and let the address through the filter.

        vip_addrs is written before vip_map (create order), so the address's filter bit is
        set before any VIP on it can match. Bits are only added here; `write_vip_filter`
        clears the ones no address needs any more.
        """
        t = self.b.vip_addrs
        t[self._addr_key(key)] = t.Leaf(count)
        f = self.b.vip_filter
        leaf = f[f.Key(0)]
        bit = vip_filter_bit(*key)
        word = leaf.bits[bit >> 6] | (1 << (bit & 63))
        if word != leaf.bits[bit >> 6]:
            leaf.bits[bit >> 6] = word
            f[f.Key(0)] = leaf

    def write_vip_filter(self, addrs: Iterable[AddrKey]) -> None:
        """Program the VIP address filter with exactly these addresses' bits, and arm it.

        Until it is armed (`ready`, e.g. a new map, or a data plane upgraded from a build
        without it) the program looks every packet up in vip_map.
        """
        f = self.b.vip_filter
        leaf = f.Leaf()
        for key in addrs:
            bit = vip_filter_bit(*key)
            leaf.bits[bit >> 6] |= 1 << (bit & 63)
        leaf.ready = 1
        f[f.Key(0)] = leaf

    def read_vip_filter(self) -> tuple[bool, frozenset[int]]:
        """The VIP address filter as the program sees it: (armed?, the bits set)."""
        f = self.b.vip_filter
        leaf = f[f.Key(0)]
        bits = set()
        for w, word in enumerate(leaf.bits):
            word = int(word)
            while word:
                low = word & -word
                bits.add(w * 64 + low.bit_length() - 1)
                word ^= low
        return bool(leaf.ready), frozenset(bits)

    def del_vip_addr(self, key: AddrKey) -> None:
        """Forget an address that carries no VIP any more (absent is fine)."""
        with contextlib.suppress(KeyError):
            del self.b.vip_addrs[self._addr_key(key)]

    def set_real(self, idx: int, val: RealVal | None) -> None:
        """Program one backend slot; None empties it."""
        t = self.b.reals
        leaf = t.Leaf()
        if val is not None:
            set_raw_addr(leaf.addr, val[0])
            leaf.flags = val[1]
        t[t.Key(idx)] = leaf

    def set_src_range(self, key: protect.SrcKey, verdict: int) -> None:
        """Create or change one source range of a VIP (src_v4 / src_v6)."""
        protect.set_src_range(self.b, key, verdict)

    def del_src_range(self, key: protect.SrcKey) -> None:
        """Delete one source range (absent is fine)."""
        protect.del_src_range(self.b, key)

    def mark_src_changed(self, vip_nums: list[int]) -> None:
        """These VIPs' ranges changed: their established flows check their source again."""
        protect.mark_src_changed(self.b, vip_nums)

    def read_src_ranges(self) -> dict[protect.SrcKey, int]:
        """Every source range of every VIP."""
        return protect.read_src_ranges(self.b)

    # -- the connection table (mapped into this process) --

    def conn_table(self) -> ConnTable:
        """The connection table, mapped once (again when an upgrade brought another map)."""
        self._conns = ConnTable.current(self.b, self._conns, close_old=True)
        return self._conns

    def purge_conns(self, vip_nums: Iterable[int], real_idx: Iterable[int]) -> int:
        """Free the conn_table slots naming any of these VIP numbers or backend indices (and
        their pair counters)."""
        nums, idx = set(vip_nums), set(real_idx)
        self.drop_pairs(nums, idx)
        return self.conn_table().purge_any(vip_nums=nums, real_idx=idx)

    def drop_pairs(self, vip_nums: Iterable[int], real_idx: Iterable[int]) -> None:
        """Free the pair_cache slots and delete the pair_stats entries of these VIP numbers
        or backend indices: freed, or handed out afresh, their pairs start from zero."""
        nums, idx = set(vip_nums), set(real_idx)
        if not nums and not idx:
            return
        cache = self.b.maps["pair_cache"]
        for i, cpus in array_items(cache):  # values live in a reused buffer: used at once
            freed = [c.key.real_idx and (c.key.vip_num in nums or c.key.real_idx in idx)
                     for c in cpus]
            if any(freed):
                # Whole per-CPU value written back: another CPU's copy of this slot may hold
                # another pair, whose increments between this read and write are lost (a
                # collision on a pair being freed: rare, and a few packets at most).
                for c, gone in zip(cpus, freed, strict=True):
                    if gone:
                        ctypes.memset(ctypes.addressof(c), 0, ctypes.sizeof(c))
                cache[cache.Key(i)] = cpus
        t = self.b.maps["pair_stats"]
        for k in list(t.keys()):
            if int(k.vip_num) in nums or int(k.real_idx) in idx:
                with contextlib.suppress(KeyError):  # gone meanwhile
                    del t[k]

    def purge_conn_pairs(self, pairs: Iterable[tuple[int, int]], *, outside: bool = False) -> int:
        """Free the conn_table slots naming one of these (VIP number, backend index) pairs
        (`outside`: naming a pair not listed)."""
        return self.conn_table().purge_pairs(pairs, outside=outside)

    def purge_stale_conns(self, vip_nums: Iterable[int], real_idx: Iterable[int]) -> int:
        """Free the conn_table slots naming a VIP number or backend index not listed."""
        return self.conn_table().purge_unless(vip_nums=vip_nums, real_idx=real_idx)

    def close(self) -> None:
        """Unmap the connection table (the maps keep their content)."""
        if self._conns is not None:
            self._conns.close()
            self._conns = None

    def reset_counters(self, vip_nums: Iterable[int], real_idx: Iterable[int]) -> None:
        """Zero the per-CPU counters of freshly allocated indices."""
        vip_nums, real_idx = list(vip_nums), list(real_idx)
        self.drop_pairs(vip_nums, real_idx)
        protect.reset_src_denied(self.b, vip_nums)
        for name, keys in (("vip_stats", vip_nums), ("real_stats", real_idx)):
            t = self.b.maps[name]
            for i in keys:
                t[t.Key(i)] = t.Leaf()


# -- pinned maps, read with raw bpf(2): no compiler, no daemon ---------------------------------

_PERCPU_MAP_TYPES = {5, 6, 10}  # percpu hash, percpu array, LRU percpu hash


def possible_cpus() -> int:
    """CPUs the kernel sizes per-CPU map values for (/sys/devices/system/cpu/possible)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


@contextlib.contextmanager
def _pinned(path: Path) -> Iterator[tuple[int, bpf.MapInfo]]:
    fd = bpf.obj_get(path)
    try:
        yield fd, bpf.map_info(fd)
    finally:
        os.close(fd)


def _lookup(fd: int, key: bytes, size: int) -> bytes | None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(size)
    attr = bpf.ElemAttr(map_fd=fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf))
    if bpf.bpf_errno(bpf.BPF_MAP_LOOKUP_ELEM, attr):
        return None
    return vbuf.raw


def pinned_counters(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """A pinned (per-CPU) array of u64 counters, summed over CPUs, by slot name."""
    out: dict[str, int] = {}
    with _pinned(path) as (fd, info):
        percpu = info.type in _PERCPU_MAP_TYPES
        stride = (info.value_size + 7) // 8 * 8
        ncpu = possible_cpus() if percpu else 1
        for i, name in enumerate(names[: info.max_entries]):
            raw = _lookup(fd, i.to_bytes(4, "little"), stride * ncpu)
            if raw is not None:
                out[name] = sum(
                    int.from_bytes(raw[c * stride : c * stride + 8], "little") for c in range(ncpu)
                )
    return out


def gateway_mac_of(raw: bytes) -> str:
    """The gateway MAC in a raw lb_cfg value (struct lb_cfg.gw_mac of xdp/common/structs.h)."""
    cfg = cstructs.struct("common/structs.h", "lb_cfg")
    if len(raw) < ctypes.sizeof(cfg):
        raise KernelError(f"lb_cfg value of {len(raw)} bytes, struct lb_cfg is"
                          f" {ctypes.sizeof(cfg)}")
    return mac_text(raw[cstructs.field_slice(cfg, "gw_mac")])


def decap_addr_key(addr: IPAddress) -> bytes:
    """The decap_addrs key of an address (struct decap_addr of xdp/decap/decap.h)."""
    key = cstructs.struct("decap/decap.h", "decap_addr")()
    set_addr(key.addr, addr)
    key.family = family_of(addr)
    return bytes(key)


def pinned_gateway_mac(path: Path) -> str | None:
    """The gateway MAC a pinned lb_cfg holds (None while lb_cfg[0] was never read back)."""
    with _pinned(path) as (fd, info):
        raw = _lookup(fd, (0).to_bytes(4, "little"), info.value_size)
    return None if raw is None else gateway_mac_of(raw)


def pinned_decap_has(path: Path, addr: IPAddress) -> bool:
    """Whether a pinned decap_addrs map holds an address."""
    raw = decap_addr_key(addr)
    with _pinned(path) as (fd, info):
        if info.key_size != len(raw):
            raise KernelError(f"{path}: key size {info.key_size}, struct decap_addr is {len(raw)}")
        return _lookup(fd, raw, info.value_size) is not None
