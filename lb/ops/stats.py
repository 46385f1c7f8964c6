"""Counters read from the balancer's maps: per VIP, per backend, global, and their rates.

`vip_stats`, `real_stats` and `glob_stats` are per-CPU arrays: BCC hands back one value per
possible CPU, summed here (and kept per CPU on request). VIPs are found by reading `vip_map`
(key -> vip_num) and backends by reading `reals` (index -> address), so the figures are what
the data plane itself uses, never a copy of the control plane's bookkeeping.

`RateSampler` keeps a small ring of totals taken every few seconds; a rate is the change
between the newest sample and the oldest one inside the window.

Connection-table usage is counted over the table mapped into this process (lb.dataplane.conntab,
numpy over the mapping, no syscall). It is a snapshot, not an atomic count: slots the data plane
writes during the scan may be missed or counted once more, so callers report it as an
estimate.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lb.consts import FAMILY_V4, FAMILY_V6, GLOB_STATS, REAL_F_V6, REAL_NONE
from lb.control.model import vip_id
from lb.dataplane import protect
from lb.dataplane.conntab import ConnTable
from lb.dataplane.keys import get_addr, proto_name, raw_addr
from lb.dataplane.loader import Balancer
from lb.dataplane.mapio import array_items

PerCpu = tuple[int, ...]


@dataclass(frozen=True)
class Snapshot:
    """Every counter at one moment, per CPU."""

    time: float
    glob: dict[str, PerCpu]
    vips: dict[str, dict[str, PerCpu]]
    reals: dict[str, dict[str, PerCpu]]
    #: VIP id -> backend address -> counters of that pair (pair_stats).
    pairs: dict[str, dict[str, dict[str, PerCpu]]] = field(default_factory=dict)

    def totals(self) -> dict[str, int]:
        """Flat totals keyed `glob/NAME`, `vip/ID/field`, `real/ADDR/field`,
        `pair/ID/ADDR/field` (for rates)."""
        out = {f"glob/{k}": sum(v) for k, v in self.glob.items()}
        for vid, counters in self.vips.items():
            out.update({f"vip/{vid}/{k}": sum(v) for k, v in counters.items()})
        for addr, counters in self.reals.items():
            out.update({f"real/{addr}/{k}": sum(v) for k, v in counters.items()})
        for vid, by_addr in self.pairs.items():
            for addr, counters in by_addr.items():
                out.update({f"pair/{vid}/{addr}/{k}": sum(v) for k, v in counters.items()})
        return out


class StatsReader:
    """Reads the counters of one loaded balancer."""

    def __init__(self, balancer: Balancer, *, conn_count_ttl: float = 0.0) -> None:
        self._b = balancer
        self._conn_ttl = conn_count_ttl
        self._conn_cache: tuple[float, tuple[int, int]] | None = None
        self._conn_lock = threading.Lock()
        self._conn_table: ConnTable | None = None
        self._map_lock = threading.Lock()

    def glob(self) -> dict[str, PerCpu]:
        """Global counters by their C name (lb.consts.GLOB_STATS), per CPU."""
        table = self._b.glob_stats
        out: dict[str, PerCpu] = {}
        for i, name in enumerate(GLOB_STATS):
            out[name] = tuple(int(v) for v in table.getvalue(table.Key(i)))
        return out

    def vip_numbers(self) -> dict[str, int]:
        """VIP id -> vip_num, as `vip_map` holds them."""
        out: dict[str, int] = {}
        for k, v in self._b.vip_map.items():
            addr = get_addr(k.addr, k.family)
            port = socket.ntohs(int(k.port))
            out[vip_id(proto_name(int(k.proto)), addr, port)] = int(v.vip_num)
        return out

    def real_indices(self) -> dict[str, int]:
        """Backend address -> index in `reals` (index 0 is never used)."""
        table = self._b.reals
        out: dict[str, int] = {}
        for idx, leaf in array_items(table):
            if idx == REAL_NONE:
                continue
            if not any(raw_addr(leaf.addr)):
                continue
            fam = FAMILY_V6 if int(leaf.flags) & REAL_F_V6 else FAMILY_V4
            out[str(get_addr(leaf.addr, fam))] = idx
        return out

    def vip(self, vip_num: int) -> dict[str, PerCpu]:
        """One VIP's counters (struct vip_stats: packets, bytes, new_conns; and src_denied,
        the packets its source ranges dropped), per CPU."""
        table = self._b.vip_stats
        cpus = table.getvalue(table.Key(vip_num))
        out = {f: tuple(int(getattr(c, f)) for c in cpus) for f in _fields(table)}
        denied = self._b.maps.get("src_denied")
        if denied is not None:
            out["src_denied"] = tuple(int(v) for v in denied.getvalue(denied.Key(vip_num)))
        return out

    def balancer_maps(self) -> frozenset[str]:
        """Names of the maps of the balancer read."""
        return frozenset(self._b.maps)

    def guard(self) -> dict[str, Any]:
        """The SYN-flood guard now: mode, flood (any CPU in flood mode), flood_cpus,
        syn_per_window (lb.dataplane.protect.guard_status)."""
        return protect.guard_status(self._b)

    def real(self, index: int) -> dict[str, PerCpu]:
        """One backend's counters (struct real_stats: packets, bytes, ...), per CPU."""
        table = self._b.real_stats
        cpus = table.getvalue(table.Key(index))
        return {f: tuple(int(getattr(c, f)) for c in cpus) for f in _fields(table)}

    def pairs(
        self, vip_ids: dict[int, str], addrs: dict[int, str]
    ) -> dict[str, dict[str, dict[str, PerCpu]]]:
        """Counters per (VIP, backend) from pair_stats, for the VIP numbers and backend
        indices given (others are entries of freed ones not purged yet)."""
        table = self._b.pair_stats
        fields = _fields(table)
        sums: dict[tuple[int, int], dict[str, list[int]]] = {}

        def add(key: tuple[int, int], cpu: int, ncpu: int, counters: Any) -> None:
            row = sums.setdefault(key, {f: [0] * ncpu for f in fields})
            for f in fields:
                row[f][cpu] += int(getattr(counters, f))

        # A pair counts in its pair_cache slot on the CPUs where it holds that slot and in
        # pair_stats on the others (xdp/balancer/maps.h): its counters are the sum.
        for _, cpus in array_items(self._b.pair_cache):
            for cpu, c in enumerate(cpus):
                if c.key.real_idx:
                    add((int(c.key.vip_num), int(c.key.real_idx)), cpu, len(cpus), c)
        for k, cpus in table.items():
            for cpu, c in enumerate(cpus):
                add((int(k.vip_num), int(k.real_idx)), cpu, len(cpus), c)
        out: dict[str, dict[str, dict[str, PerCpu]]] = {}
        for (num, idx), row in sums.items():
            vid, addr = vip_ids.get(num), addrs.get(idx)
            if vid is None or addr is None:
                continue
            out.setdefault(vid, {})[addr] = {f: tuple(v) for f, v in row.items()}
        return out

    def snapshot(self, *, vips: Iterable[str] | None = None) -> Snapshot:
        """Every counter now (or only these VIP ids' and all backends')."""
        nums = self.vip_numbers()
        wanted = nums if vips is None else {v: nums[v] for v in vips if v in nums}
        indices = self.real_indices()
        return Snapshot(
            time=time.monotonic(),
            glob=self.glob(),
            vips={vid: self.vip(n) for vid, n in wanted.items()},
            reals={addr: self.real(i) for addr, i in indices.items()},
            pairs=self.pairs(
                {n: v for v, n in wanted.items()}, {i: a for a, i in indices.items()}
            ),
        )

    def conn_table_count(self) -> int:
        """Live flows in the connection table (ConnTable.count_live: expired entries and
        flows closed past the grace are reusable slots, not flows); a snapshot, reused for
        `conn_count_ttl` seconds."""
        return self._conn_counts()[0]

    def conn_table_used(self) -> int:
        """Slots holding an entry, live or reusable (the table's occupancy); same snapshot."""
        return self._conn_counts()[1]

    def _conn_counts(self) -> tuple[int, int]:
        with self._conn_lock:
            now = time.monotonic()
            if self._conn_cache is not None and now - self._conn_cache[0] < self._conn_ttl:
                return self._conn_cache[1]
            table = self.conn_table()
            counts = (table.count_live(), table.count())
            self._conn_cache = (now, counts)
            return counts

    def conn_table(self) -> ConnTable:
        """The connection table mapped into this process (mapped again after an upgrade
        brought another map)."""
        with self._map_lock:
            # The old mapping goes with its last user (never unmapped under a reader).
            self._conn_table = ConnTable.current(self._b, self._conn_table)
            return self._conn_table

    @property
    def conn_table_capacity(self) -> int:
        """Slots of the connection table (sets x ways: conn_table_size rounded up)."""
        return int(self._b.config.conn_capacity)


def _fields(table: Any) -> tuple[str, ...]:
    """Counter names of a per-CPU struct map, from the struct BCC built (xdp/common/structs.h)."""
    return tuple(name for name, *_ in table.sLeaf._fields_ if not name.startswith("pad"))


@dataclass
class RateSampler:
    """A ring of counter totals taken every `interval` seconds; rates over `window` seconds."""

    reader: StatsReader
    interval: float = 1.0
    window: float = 10.0
    _samples: deque[tuple[float, dict[str, int]]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self) -> Snapshot:
        """Read every counter now and keep the totals in the ring."""
        snap = self.reader.snapshot()
        self.record(snap)
        return snap

    def record(self, snap: Snapshot) -> None:
        """Keep a snapshot's totals, dropping samples older than the window."""
        with self._lock:
            self._samples.append((snap.time, snap.totals()))
            horizon = snap.time - self.window - self.interval
            while len(self._samples) > 2 and self._samples[0][0] < horizon:
                self._samples.popleft()

    def rates(self, now: Snapshot) -> tuple[dict[str, float], float]:
        """Per-second rates of `now`'s totals over the window.

        Each counter's rate runs from the oldest sample in the window that has it (a VIP or
        backend created meanwhile gets a rate over its own shorter span). Returns the rates
        (a counter without an earlier sample has none) and the longest span in seconds (0
        when there is no earlier sample yet).
        """
        with self._lock:
            samples = [
                (t, totals)
                for t, totals in self._samples
                if 0 < now.time - t <= self.window + self.interval / 2
            ]
        out: dict[str, float] = {}
        for k, v in now.totals().items():
            for t, totals in samples:  # oldest first
                old = totals.get(k)
                if old is not None:
                    if v >= old:
                        out[k] = (v - old) / (now.time - t)
                    break
        span = now.time - samples[0][0] if samples else 0.0
        return out, span
