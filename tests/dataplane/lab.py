"""Seeding and reading the balancer's maps for one packet test, and undoing it afterwards.

The compiled program and its maps are shared by every test of the process, so `Lab` records
what it writes and `reset()` puts it back to empty: VIPs, VIP addresses, backends, the ring
slots of the VIPs it filled, the connection table, lb_cfg and every counter.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lb.config import RuntimeConfig
from lb.consts import FAMILY_V4, FAMILY_V6, GLOB_STATS, REAL_F_V6
from lb.dataplane import set_addr, write_runtime_config
from lb.testrun import RunResult, TestRunner
from tests.dataplane import packets as P

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


@dataclass(frozen=True)
class Flow:
    """A client->VIP 5-tuple, as the connection table keys it."""

    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    proto: str = "tcp"

    def key(self, table: Any) -> Any:
        """The conn_table key of this flow."""
        k = table.Key()
        set_addr(k.src, self.src)
        set_addr(k.dst, self.dst)
        k.sport = socket.htons(self.sport)
        k.dport = socket.htons(self.dport)
        k.proto = PROTOS[self.proto]
        k.family = FAMILY_V4 if self.src.version == 4 else FAMILY_V6
        return k

    def hash(self, src_only: bool = False) -> int:
        """The data plane's flow hash of this flow."""
        return P.flow_hash(self.src, self.dst, self.sport, self.dport, PROTOS[self.proto],
                           src_only)


def default_runtime(**changes: Any) -> RuntimeConfig:
    """The lb_cfg every packet test starts from (fields overridable)."""
    base: dict[str, Any] = {
        "gateway_mac": P.GW_MAC,
        "gue_port": P.GUE_PORT,
        "src_v4": P.LB_SRC4,
        "src_v6": P.LB_SRC6,
        "rss_v4": P.RSS4,
        "rss_v6": P.RSS6,
        "max_frame": 1514,
        "udp_timeout_s": 30.0,
    }
    base.update(changes)
    return RuntimeConfig(**base)


class Lab:
    """One test's view of the shared balancer: seed, run, read counters, reset."""

    def __init__(self, balancer: Any) -> None:
        self.b = balancer
        self.ring_size: int = balancer.config.ring_size
        self.runner = TestRunner(balancer.prog_fd)
        self._vip_keys: list[Any] = []
        self._addr_keys: dict[bytes, Any] = {}
        self._reals: set[int] = set()
        self._rings: set[int] = set()

    # --- seeding -----------------------------------------------------------------------------

    def config(self, **changes: Any) -> None:
        """Write lb_cfg: the defaults with `changes`."""
        write_runtime_config(self.b, default_runtime(**changes))

    def vip(self, addr: IPAddress, port: int, proto: str = "tcp", *, num: int = 0,
            flags: int = 0) -> None:
        """Add a VIP (and count it on its address in vip_addrs)."""
        meta = self.b.vip_map.Leaf()
        meta.vip_num = num
        meta.flags = flags
        key = self.b.vip_key(addr, port, proto)
        self.b.vip_map[key] = meta
        self._vip_keys.append(key)
        akey = self.b.vip_addr_key(addr)
        raw = bytes(ctypes.string_at(ctypes.addressof(akey), ctypes.sizeof(akey)))
        count = self.b.vip_addrs.get(akey)
        self.b.vip_addrs[akey] = self.b.vip_addrs.Leaf((count.value if count else 0) + 1)
        self._addr_keys[raw] = akey

    def real(self, idx: int, addr: IPAddress) -> None:
        """Program backend slot `idx`."""
        leaf = self.b.reals.Leaf()
        set_addr(leaf.addr, addr)
        leaf.flags = REAL_F_V6 if addr.version == 6 else 0
        self.b.reals[self.b.reals.Key(idx)] = leaf
        self._reals.add(idx)

    def remove_real(self, idx: int) -> None:
        """Empty backend slot `idx`, as the control plane does when a backend is removed."""
        self.b.reals[self.b.reals.Key(idx)] = self.b.reals.Leaf()

    def ring(self, num: int, reals: int | Sequence[int]) -> None:
        """Fill VIP `num`'s ring: one backend everywhere, or slot s -> reals[s % len]."""
        pattern = [reals] if isinstance(reals, int) else list(reals)
        self._write_ring(num, [pattern[s % len(pattern)] for s in range(self.ring_size)])
        self._rings.add(num)

    def _write_ring(self, num: int, values: list[int]) -> None:
        n = len(values)
        keys = (self.b.ch_rings.Key * n)(*[num * self.ring_size + s for s in range(n)])
        vals = (self.b.ch_rings.Leaf * n)(*values)
        self.b.ch_rings.items_update_batch(keys, vals)

    def ring_pick(self, reals: Sequence[int], flow_hash: int) -> int:
        """The backend a ring filled by ring(num, reals) gives a flow hash."""
        return reals[(flow_hash % self.ring_size) % len(reals)]

    def conn(self, flow: Flow, real_idx: int, age_s: float = 0.0) -> None:
        """Put a flow in the connection table, last seen `age_s` seconds ago."""
        val = self.b.conn_table.Leaf()
        val.real_idx = real_idx
        val.atime = time.monotonic_ns() - int(age_s * 1e9)
        self.b.conn_table[flow.key(self.b.conn_table)] = val

    # --- running and reading -----------------------------------------------------------------

    def run(self, frame: bytes) -> RunResult:
        """Run the program once on `frame`."""
        return self.runner.run(frame)

    def counters(self) -> dict[str, int]:
        """Global counters summed over CPUs, by slot name."""
        t = self.b.glob_stats
        return {name: sum(t[t.Key(i)]) for i, name in enumerate(GLOB_STATS)}

    def vip_counters(self, num: int) -> tuple[int, int, int]:
        """(packets, bytes, new_conns) of VIP `num`, summed over CPUs."""
        per_cpu = self.b.vip_stats[self.b.vip_stats.Key(num)]
        return (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu),
                sum(c.new_conns for c in per_cpu))

    def real_counters(self, idx: int) -> tuple[int, int]:
        """(packets, bytes) sent to backend `idx`, summed over CPUs."""
        per_cpu = self.b.real_stats[self.b.real_stats.Key(idx)]
        return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)

    def lookup_conn(self, flow: Flow) -> tuple[int, int] | None:
        """(real_idx, atime) of a flow in the connection table, or None."""
        val = self.b.conn_table.get(flow.key(self.b.conn_table))
        return None if val is None else (int(val.real_idx), int(val.atime))

    def conn_count(self) -> int:
        """Entries in the connection table."""
        return len(list(self.b.conn_table.items()))

    # --- undo ----------------------------------------------------------------------------------

    def wipe(self) -> None:
        """Empty every map, whoever wrote it (other test modules share this balancer)."""
        self.b.vip_map.clear()
        self.b.vip_addrs.clear()
        cfg = self.b.config
        n_reals = cfg.max_reals
        self.b.reals.items_update_batch((self.b.reals.Key * n_reals)(*range(n_reals)),
                                        (self.b.reals.Leaf * n_reals)())
        for num in range(cfg.max_vips):
            self._rings.add(num)
        self.reset()

    def reset(self) -> None:
        """Remove everything this lab wrote and zero every counter."""
        for key in self._vip_keys:
            self.b.vip_map.pop(key, None)
        for key in self._addr_keys.values():
            self.b.vip_addrs.pop(key, None)
        for idx in self._reals:
            self.b.reals[self.b.reals.Key(idx)] = self.b.reals.Leaf()
        for num in self._rings:
            self._write_ring(num, [0] * self.ring_size)
        self.b.conn_table.clear()
        self.b.lb_cfg[self.b.lb_cfg.Key(0)] = self.b.lb_cfg.Leaf()
        for name in ("glob_stats", "vip_stats", "real_stats"):
            table = self.b.maps[name]
            for i in range(len(table)):
                table.clearitem(table.Key(i))
        self._vip_keys.clear()
        self._addr_keys.clear()
        self._reals.clear()
        self._rings.clear()
