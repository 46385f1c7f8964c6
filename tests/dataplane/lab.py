"""Seeding and reading the balancer's maps for one packet test, and undoing it afterwards.

The compiled program and its maps are shared by every test of the process, so `Lab` records
what it writes and `reset()` puts it back to empty: VIPs, VIP addresses, backends, the ring
slots of the VIPs it filled, the connection table, lb_cfg and every counter. The connection
table is read and written through lb.dataplane.conntab (docs/conn-table.md), as the control
plane does.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lb.config import ProtectConfig, RuntimeConfig
from lb.consts import GLOB_STATS, REAL_F_V6
from lb.dataplane.conntab import ConnEntry, ConnTable
from lb.dataplane.flowhash import (
    Flow5,
    Flows,
    addr_words,
    conn_index,
    conn_index_many,
    hash_flow,
    pair_slot,
)
from lb.dataplane.keys import PROTO_NUMBERS, set_addr
from lb.dataplane.loader import write_runtime_config
from lb.dataplane.protect import clear_guard_config
from lb.dataplane.testrun import RunResult, TestRunner
from tests.dataplane import packets as P

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Source ports of the flows set_mates() draws from, for each of SET_MATE_CLIENTS clients.
SET_MATE_PORTS = range(1024, 65536)
SET_MATE_CLIENTS = 4


@dataclass(frozen=True)
class Flow:
    """A client->VIP 5-tuple, as the connection table keys it."""

    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    proto: str = "tcp"

    def five(self) -> Flow5:
        """The flow as lb.dataplane.flowhash and lb.dataplane.conntab take it."""
        return Flow5(self.src, self.dst, self.sport, self.dport, PROTO_NUMBERS[self.proto])

    def hash(self, src_only: bool = False) -> int:
        """The data plane's flow hash of this flow (the ring's)."""
        return hash_flow(self.five(), src_only=src_only)


@functools.cache
def set_mates(flow: Flow, sets: int, n: int, proto: str | None = None) -> tuple[Flow, ...]:
    """`n` other flows in `flow`'s connection-table set: to the same VIP address and port,
    from `flow.src` and the next few addresses, every source port, of `proto` (default the
    flow's), in a fixed order."""
    proto = proto or flow.proto
    want = conn_index(flow.five(), sets)
    clients = [flow.src + k for k in range(SET_MATE_CLIENTS)]
    ports = np.tile(np.asarray(SET_MATE_PORTS, np.uint16), len(clients))
    count = len(ports)
    cands = Flows(
        flow.src.version,
        np.repeat(np.array([addr_words(c) for c in clients], np.uint32), len(SET_MATE_PORTS),
                  axis=0),
        np.tile(np.array(addr_words(flow.dst), np.uint32), (count, 1)),
        ports,
        np.full(count, flow.dport, np.uint16),
        np.full(count, PROTO_NUMBERS[proto], np.uint8),
    )
    out = []
    for i in np.flatnonzero(conn_index_many(cands, sets) == want):
        mate = Flow(clients[i // len(SET_MATE_PORTS)], flow.dst, int(ports[i]), flow.dport, proto)
        if mate != flow:
            out.append(mate)
        if len(out) == n:
            return tuple(out)
    raise LookupError(f"fewer than {n} flows share the set of {flow}")


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
        # No guard and no reply limits unless a test asks (tests/dataplane/test_protect.py).
        "protect": ProtectConfig(syn_guard="off", echo_rate=0, too_big_rate=0),
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
        self._vip_nums: dict[tuple[IPAddress, int, str], int] = {}
        self.conns = ConnTable(balancer)

    # --- seeding -----------------------------------------------------------------------------

    def config(self, *, lb_mac: str | None = None, **changes: Any) -> None:
        """Write lb_cfg: the defaults with `changes` (and the interface MAC `lb_mac`)."""
        write_runtime_config(self.b, default_runtime(**changes), lb_mac=lb_mac)

    def vip(self, addr: IPAddress, port: int, proto: str = "tcp", *, num: int = 0,
            flags: int = 0) -> None:
        """Add a VIP (and count it on its address in vip_addrs)."""
        meta = self.b.vip_map.Leaf()
        meta.vip_num = num
        meta.flags = flags
        key = self.b.vip_key(addr, port, proto)
        self.b.vip_map[key] = meta
        self._vip_keys.append(key)
        self._vip_nums[(addr, port, proto)] = num
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

    def conn(self, flow: Flow, real_idx: int, age_s: float = 0.0, *, vip_num: int | None = None,
             closing: bool = False) -> None:
        """Put a flow in the connection table, last seen `age_s` seconds ago, as the control
        plane does (lb.dataplane.conntab); the VIP number defaults to the seeded VIP the flow
        goes to."""
        if vip_num is None:
            vip_num = self._vip_nums.get((flow.dst, flow.dport, flow.proto),
                                         self._vip_nums.get((flow.dst, 0, flow.proto), 0))
        self.conns.insert(flow.five(), real_idx, vip_num, udp=flow.proto == "udp",
                          closing=closing, age_s=age_s)

    def delete_conn(self, flow: Flow) -> bool:
        """Remove a flow from the connection table; whether it was there."""
        return self.conns.delete(flow.five())

    def set_of(self, flow: Flow) -> int:
        """The flow's set in the connection table."""
        return conn_index(flow.five(), self.conns.sets)

    def set_mates(self, flow: Flow, n: int, proto: str | None = None) -> tuple[Flow, ...]:
        """`n` other flows that share `flow`'s set (see set_mates())."""
        return set_mates(flow, self.conns.sets, n, proto)

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

    def pair_counters(self, num: int, idx: int) -> tuple[int, int, int] | None:
        """(packets, bytes, new_conns) VIP `num` sent to backend `idx`, its pair_cache slot's
        and pair_stats entry's summed (None: neither has it)."""
        slot = pair_slot(num, idx, self.b.config.pair_slots_log2)
        per_cpu = [c for c in self.b.pair_cache[self.b.pair_cache.Key(slot)]
                   if (c.key.vip_num, c.key.real_idx) == (num, idx)]
        t = self.b.pair_stats
        key = t.Key(num, idx)
        if key in t:
            per_cpu += list(t[key])
        if not per_cpu:
            return None
        return (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu),
                sum(c.new_conns for c in per_cpu))

    def real_counters(self, idx: int) -> tuple[int, int]:
        """(packets, bytes) sent to backend `idx`, summed over CPUs."""
        per_cpu = self.b.real_stats[self.b.real_stats.Key(idx)]
        return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)

    def lookup_conn(self, flow: Flow) -> ConnEntry | None:
        """A flow's connection-table entry, or None."""
        return self.conns.lookup(flow.five())

    def conn_count(self) -> int:
        """Entries in the connection table."""
        return self.conns.count()

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
        self.conns.clear()
        # Disarmed: this lab seeds VIPs without the control plane, which arms the filter.
        self.b.vip_filter[self.b.vip_filter.Key(0)] = self.b.vip_filter.Leaf()
        self.b.lb_cfg[self.b.lb_cfg.Key(0)] = self.b.lb_cfg.Leaf()
        self.b.src_v4.clear()
        self.b.src_v6.clear()
        clear_guard_config(self.b)
        # vip_cache emptied, and vip_gen at 0 (nothing cached): this lab writes vip_map
        # directly, without the control plane's generation bumps.
        for name in ("glob_stats", "vip_stats", "real_stats", "src_denied", "src_changed",
                     "pair_cache", "vip_cache", "vip_gen"):
            table = self.b.maps[name]
            for i in range(len(table)):
                table.clearitem(table.Key(i))
        self.b.pair_stats.clear()
        self._vip_keys.clear()
        self._addr_keys.clear()
        self._reals.clear()
        self._rings.clear()
        self._vip_nums.clear()

    def close(self) -> None:
        """Unmap the connection table (the maps stay as they are)."""
        self.conns.close()
