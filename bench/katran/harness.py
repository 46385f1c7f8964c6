"""Katran's XDP balancer beside xlb: build it from a checkout, load it, fill its maps the way
its user space (katran/lib/KatranLb.cpp) does, and hand out its program fd and counters.

    KATRAN_SRC=/path/to/katran python -m bench.bench_dataplane

No Katran code is in this repository: `bench/katran/build.sh` compiles the checkout named by
KATRAN_SRC (README.md beside this file names the commit measured and lists every adaptation).
The object is loaded with bpftool (`prog load ... pinmaps`), since BCC cannot load an ELF;
the maps are then written through bpf(2) (lb.dataplane.rawmap), as KatranLb would write them:

- `ctl_array[CTL_MAC_POS]`: the default router's MAC (KatranLb's `defaultMac`);
- `vip_map`: `vip_definition {addr, port (network order), proto}` -> `vip_meta {flags 0,
  vip_num}`;
- `reals`: `real_definition {addr, flags}` (F_IPV6 for an IPv6 real), index 0 unused as in
  KatranLb (its ring never names 0);
- `ch_rings[vip_num * RING_SIZE + i]`: the same Maglev rings xlb gets (lb.control.maglev);
- `lru_mapping[cpu]`: one LRU hash per forwarding CPU of `lru_size / cpus` entries
  (KatranLb::initLrus with every CPU a forwarding core, no NUMA flags), so no packet takes
  `fallback_cache` (its FALLBACK_LRU_CNTR is checked to stay 0).

Katran stops inserting into its LRU above MAX_CONN_RATE (125,000) new flows per second per
CPU ("flood" mode), which BPF_PROG_TEST_RUN's millions of SYNs per second always reach. The
harness resets that per-CPU rate counter (`stats[MAX_VIPS + NEW_CONN_RATE_CNTR]`) between
chunks of frames, outside the timed program, so every SYN inserts as xlb's do (`flood_guard`
= False, the default; True measures Katran as it would behave under the same SYN rate).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lb.dataplane.keys import IPAddress, addr16, mac_bytes
from lb.dataplane.rawmap import RawMap, open_pinned_fd
from lb.dataplane.testrun import TestRunner

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD_SCRIPT = HERE / "build.sh"
BUILD_DIR = ROOT / "build" / "katran"
# What a run without KATRAN_SRC prints (the "katran" column is then absent).
HOW_TO = ("no Katran column: set KATRAN_SRC to a checkout of facebookincubator/katran "
          "(bench/katran/README.md names the commit measured), e.g. "
          "KATRAN_SRC=/path/to/katran make bench")

# katran/lib/bpf/balancer_consts.h (the default build).
RING_SIZE = 65537
MAX_VIPS = 512
F_IPV6 = 1 << 0
CTL_MAC_POS = 0
LRU_CNTRS, LRU_MISS_CNTR, NEW_CONN_RATE_CNTR, FALLBACK_LRU_CNTR = 0, 1, 2, 3
# The rate counter is reset this often (frames): well under MAX_CONN_RATE.
FLOOD_CHUNK = 100_000
# katran/lib/bpf/balancer_structs.h: sizeof(struct flow_key), sizeof(struct real_pos_lru).
FLOW_KEY_SIZE, REAL_POS_LRU_SIZE = 40, 16
LRU_NAME = "katran_lru"


class VipDefinition(ctypes.Structure):
    """struct vip_definition."""

    _fields_ = [("addr", ctypes.c_uint8 * 16), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("_pad", ctypes.c_uint8)]


class VipMeta(ctypes.Structure):
    """struct vip_meta."""

    _fields_ = [("flags", ctypes.c_uint32), ("vip_num", ctypes.c_uint32)]


class RealDefinition(ctypes.Structure):
    """struct real_definition."""

    _fields_ = [("addr", ctypes.c_uint8 * 16), ("flags", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8 * 3)]


class LbStats(ctypes.Structure):
    """struct lb_stats (a per-CPU value)."""

    _fields_ = [("v1", ctypes.c_uint64), ("v2", ctypes.c_uint64)]


@dataclass(frozen=True)
class KatranVip:
    """A VIP as the harness programs it: address, TCP port, its ring of real indices."""

    vip_num: int
    addr: IPAddress
    port: int
    proto: int
    ring: Sequence[int]


def source() -> Path | None:
    """The checkout KATRAN_SRC names, or None (the column is then absent)."""
    value = os.environ.get("KATRAN_SRC")
    return Path(value).expanduser() if value else None


def build(src: Path) -> tuple[Path, str]:
    """Build (or reuse) build/katran/balancer.bpf.o from `src`; returns (object, commit)."""
    out = subprocess.run([str(BUILD_SCRIPT), str(src), str(BUILD_DIR)], check=True,
                         capture_output=True, text=True)
    obj = Path(out.stdout.strip().splitlines()[-1])
    commit = (BUILD_DIR / "commit").read_text().strip()
    return obj, commit


def _bpftool(*args: str) -> None:
    subprocess.run(["bpftool", *args], check=True, capture_output=True, text=True)


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


class Katran:
    """Katran's balancer loaded from `obj`, pinned under `pin_dir`, its maps filled."""

    def __init__(self, obj: Path, pin_dir: Path, *, gateway_mac: str,
                 reals: dict[int, IPAddress], vips: list[KatranVip], lru_size: int,
                 flood_guard: bool = False) -> None:
        self.pin_dir = pin_dir
        self.flood_guard = flood_guard
        self.cpus = os.cpu_count() or 1
        self._maps: dict[str, RawMap] = {}
        if pin_dir.exists():
            shutil.rmtree(pin_dir)
        pin_dir.mkdir(parents=True)
        try:
            _bpftool("prog", "load", str(obj), str(pin_dir / "prog"), "type", "xdp",
                     "pinmaps", str(pin_dir / "maps"))
            self.prog_fd = open_pinned_fd(pin_dir / "prog")
            self._fill(gateway_mac, reals, vips, lru_size)
        except BaseException:
            self.close()
            raise
        self.runner = TestRunner(self.prog_fd)

    def _map(self, name: str) -> RawMap:
        if name not in self._maps:
            self._maps[name] = RawMap.pinned(self.pin_dir / "maps" / name)
        return self._maps[name]

    def _fill(self, gateway_mac: str, reals: dict[int, IPAddress], vips: list[KatranVip],
              lru_size: int) -> None:
        self._map("ctl_array").update(_u32(CTL_MAC_POS), mac_bytes(gateway_mac).ljust(8, b"\0"))
        self.set_reals(reals)
        for v in vips:
            key = VipDefinition(port=int.from_bytes(v.port.to_bytes(2, "big"), "little"),
                                proto=v.proto)
            ctypes.memmove(key.addr, addr16(v.addr), 16)
            self._map("vip_map").update(bytes(key), bytes(VipMeta(flags=0, vip_num=v.vip_num)))
            self.set_ring(v.vip_num, v.ring)
        # KatranLb::initLrus: one LRU per forwarding core, LruSize / cores entries each.
        per_cpu = max(1, lru_size // self.cpus)
        for cpu in range(self.cpus):
            path = self.pin_dir / f"{LRU_NAME}{cpu}"
            _bpftool("map", "create", str(path), "type", "lru_hash", "key", str(FLOW_KEY_SIZE),
                     "value", str(REAL_POS_LRU_SIZE), "entries", str(per_cpu),
                     "name", f"{LRU_NAME}{cpu}")
            _bpftool("map", "update", "pinned", str(self.pin_dir / "maps" / "lru_mapping"),
                     "key", *[str(b) for b in cpu.to_bytes(4, "little")],
                     "value", "pinned", str(path))

    def set_reals(self, reals: dict[int, IPAddress]) -> None:
        """Write backends at their indices (KatranLb's reals map)."""
        for idx, addr in reals.items():
            rd = RealDefinition(flags=F_IPV6 if addr.version == 6 else 0)
            ctypes.memmove(rd.addr, addr16(addr), 16)
            self._map("reals").update(_u32(idx), bytes(rd))

    def set_ring(self, vip_num: int, ring: Sequence[int]) -> None:
        """Write a VIP's whole ring (real indices) into ch_rings."""
        n = len(ring)
        keys = (ctypes.c_uint32 * n)(*range(vip_num * RING_SIZE, vip_num * RING_SIZE + n))
        vals = (ctypes.c_uint32 * n)(*ring)
        self._map("ch_rings").update_batch(bytes(keys), bytes(vals), n)

    def lru_capacity(self, cpu: int) -> int:
        """Entries of the LRU of `cpu`."""
        with RawMap.pinned(self.pin_dir / f"{LRU_NAME}{cpu}") as m:
            return m.max_entries()

    def fill_lru(self, cpu: int, keys: bytes, real_idx: int) -> None:
        """Insert flows into the LRU of `cpu` from user space (a benchmark's prefill):
        `keys` is n packed `struct flow_key`s, every flow pointing at `real_idx`."""
        n = len(keys) // FLOW_KEY_SIZE
        if n == 0:
            return
        vals = (_u32(real_idx) + bytes(REAL_POS_LRU_SIZE - 4)) * n
        with RawMap.pinned(self.pin_dir / f"{LRU_NAME}{cpu}") as m:
            m.update_batch(keys, vals, n)

    def stat(self, index: int) -> tuple[int, int]:
        """`stats[MAX_VIPS + index]` (v1, v2), summed over CPUs."""
        raw = self._map("stats").lookup(_u32(MAX_VIPS + index),
                                        ctypes.sizeof(LbStats) * self.cpus)
        vals = (LbStats * self.cpus).from_buffer_copy(raw)
        return sum(v.v1 for v in vals), sum(v.v2 for v in vals)

    def counters(self) -> dict[str, int]:
        """The counters the benchmark checks: VIP packets, LRU misses (SYN, other), fallback."""
        total, _ = self.stat(LRU_CNTRS)
        syn, other = self.stat(LRU_MISS_CNTR)
        fallback, _ = self.stat(FALLBACK_LRU_CNTR)
        return {"vip_packets": total, "miss_syn": syn, "miss_other": other,
                "fallback_lru": fallback}

    def _reset_rate(self) -> None:
        self._map("stats").update(_u32(MAX_VIPS + NEW_CONN_RATE_CNTR),
                                  bytes(ctypes.sizeof(LbStats) * self.cpus))

    def time_frames(self, addresses: Sequence[int], size: int) -> tuple[int, Counter[int]]:
        """TestRunner.time_frames, with the flood guard's rate counter reset between chunks
        (untimed) unless `flood_guard`."""
        if self.flood_guard:
            return self.runner.time_frames(addresses, size)
        total = 0
        verdicts: Counter[int] = Counter()
        for i in range(0, len(addresses), FLOOD_CHUNK):
            self._reset_rate()
            t, v = self.runner.time_frames(addresses[i:i + FLOOD_CHUNK], size)
            total += t
            verdicts.update(v)
        return total, verdicts

    def close(self) -> None:
        """Close the fds and remove the pins (program and maps go with the last reference)."""
        for m in self._maps.values():
            with contextlib.suppress(OSError):
                m.close()
        self._maps.clear()
        if getattr(self, "prog_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self.prog_fd)
        shutil.rmtree(self.pin_dir, ignore_errors=True)
