"""Durable desired state: SQLite in WAL mode, one transaction per change.

The store is the authority. It keeps the VIPs (as JSON, in creation order), the generation,
and the index allocations the maps use: each VIP's number (its ring and counters) and each
backend's index into `reals`. Allocations live in the same transaction as the change that
needs them, so a restart finds the same indices and a crash can never leave a VIP stored
without its number.

`synchronous=FULL` makes COMMIT return only once the WAL is on disk: a change is durable
before it is acknowledged. The store also keeps an in-memory copy, updated only after a
COMMIT succeeded, so reads never touch the disk.

Freed indices go to the back of a free list and are handed out oldest-freed first, and only
after every never-used index: a connection-table entry that still names a freed backend
index keeps missing (the data plane treats an empty `reals` slot as a miss) for as long as
possible instead of landing on whichever backend got the index next.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lb.errors import KernelError, LimitReached
from lb.model import Limits, VipSpec

SCHEMA_VERSION = 1
DB_NAME = "xlb-state.sqlite3"

IndexKind = Literal["vip", "real"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vips (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    vip_num INTEGER NOT NULL UNIQUE,
    spec TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS backends (
    address TEXT PRIMARY KEY,
    idx INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS free_indices (
    kind TEXT NOT NULL,
    idx INTEGER NOT NULL,
    freed_at INTEGER NOT NULL,
    PRIMARY KEY (kind, idx)
);
"""


class StoreError(KernelError):
    """The state store cannot be opened, read or written."""

    kind = "store"


@dataclass(frozen=True)
class Committed:
    """Outcome of one stored change."""

    generation: int
    #: Indices allocated by this change (their counters should start from zero).
    new_vip_nums: frozenset[int]
    new_real_idx: frozenset[int]


class _Allocator:
    """Never-used indices first, then the oldest freed one."""

    def __init__(self, kind: IndexKind, first: int, limit: int) -> None:
        self.kind = kind
        self.first = first
        self.limit = limit  # one past the highest usable index
        self.next_unused = first
        self.free: dict[int, int] = {}  # idx -> freed_at

    def take(self) -> int:
        if self.next_unused < self.limit:
            idx = self.next_unused
            self.next_unused += 1
            return idx
        if not self.free:
            what = "VIP numbers (max_vips)"
            if self.kind == "real":
                what = "backend slots (max_reals - 1)"
            raise LimitReached(f"no free {what}: all {self.limit - self.first} are in use")
        idx = min(self.free, key=self.free.__getitem__)
        del self.free[idx]
        return idx


class Store:
    """The SQLite state store of one state directory."""

    def __init__(self, state_dir: Path, limits: Limits) -> None:
        self.path = Path(state_dir) / DB_NAME
        self.limits = limits
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the state store {self.path}: {e}") from e
        self._vips: dict[str, VipSpec] = {}
        self._vip_nums: dict[str, int] = {}
        self._real_idx: dict[str, int] = {}
        self._refs: dict[str, int] = {}  # backend address -> number of VIPs listing it
        self._generation = 0
        self._clock = 0
        self._load()

    # -- reads (in memory) ------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Generation of the last committed change."""
        return self._generation

    @property
    def vips(self) -> Mapping[str, VipSpec]:
        """Stored VIPs by id, in creation order (do not mutate)."""
        return self._vips

    @property
    def vip_nums(self) -> Mapping[str, int]:
        """VIP id -> VIP number (do not mutate)."""
        return self._vip_nums

    @property
    def real_idx(self) -> Mapping[str, int]:
        """Backend address -> index into reals (do not mutate)."""
        return self._real_idx

    # -- load -------------------------------------------------------------------------

    def _load(self) -> None:
        db = self._db
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            version = meta.get("schema", SCHEMA_VERSION)
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version}, this build reads {SCHEMA_VERSION}"
                )
            self._generation = int(meta.get("generation", 0))
            self._clock = int(meta.get("clock", 0))
            rows = db.execute("SELECT id, vip_num, spec FROM vips ORDER BY seq").fetchall()
            backends = db.execute("SELECT address, idx FROM backends").fetchall()
            free = db.execute("SELECT kind, idx, freed_at FROM free_indices").fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the state store {self.path}: {e}") from e
        self._vip_alloc = _Allocator("vip", 0, self.limits.max_vips)
        self._real_alloc = _Allocator("real", 1, self.limits.max_backends + 1)
        self._vip_alloc.next_unused = int(meta.get("next_vip", 0))
        self._real_alloc.next_unused = int(meta.get("next_real", 1))
        for kind, idx, freed_at in free:
            alloc = self._vip_alloc if kind == "vip" else self._real_alloc
            alloc.free[int(idx)] = int(freed_at)
        for vid, num, spec in rows:
            try:
                vip = VipSpec.model_validate_json(spec)
            except ValueError as e:
                raise StoreError(f"{self.path}: stored VIP {vid} is unreadable: {e}") from e
            if num >= self.limits.max_vips:
                raise LimitReached(
                    f"stored VIP {vid} has number {num}, but the data plane is built with "
                    f"max_vips={self.limits.max_vips}: raise max_vips",
                    field="max_vips",
                )
            self._vips[vid] = vip
            self._vip_nums[vid] = int(num)
            for b in vip.backends:
                self._refs[b.identity] = self._refs.get(b.identity, 0) + 1
        for addr, idx in backends:
            if idx > self.limits.max_backends:
                raise LimitReached(
                    f"stored backend {addr} has index {idx}, but the data plane is built "
                    f"with max_reals={self.limits.max_backends + 1}: raise max_reals",
                    field="max_reals",
                )
            self._real_idx[addr] = int(idx)
        # Shrinking the configuration leaves free-list entries past the new limits.
        for alloc in (self._vip_alloc, self._real_alloc):
            alloc.free = {i: t for i, t in alloc.free.items() if i < alloc.limit}
            alloc.next_unused = min(alloc.next_unused, alloc.limit)

    # -- write ------------------------------------------------------------------------

    def commit(self, upserts: Iterable[VipSpec] = (), deletes: Iterable[str] = ()) -> Committed:
        """Store one change (VIPs created/replaced, VIPs deleted) in one transaction.

        Returns once the change is on disk. The in-memory copy changes only on success.
        """
        upserts = list(upserts)
        deletes = list(deletes)
        vips = dict(self._vips)
        vip_nums = dict(self._vip_nums)
        real_idx = dict(self._real_idx)
        refs = dict(self._refs)
        vip_alloc = _copy_alloc(self._vip_alloc)
        real_alloc = _copy_alloc(self._real_alloc)
        clock = self._clock + 1
        new_nums: set[int] = set()
        new_idx: set[int] = set()
        freed_nums: list[int] = []
        freed_idx: list[int] = []

        dropped: list[str] = []  # addresses whose last reference went in this change

        def unref(v: VipSpec) -> None:
            for b in v.backends:
                refs[b.identity] -= 1
                if not refs[b.identity]:
                    dropped.append(b.identity)

        # Free first, allocate after: a full table can then swap one VIP for another in
        # one change (the reconciler orders the writes for a reused index).
        for vid in deletes:
            old = vips.pop(vid)
            unref(old)
            freed_nums.append(vip_nums.pop(vid))
        for v in upserts:
            old_v = vips.get(v.id)
            if old_v is not None:
                unref(old_v)
            vips[v.id] = v
            for b in v.backends:
                refs[b.identity] = refs.get(b.identity, 0) + 1
        for addr in dropped:
            if refs.get(addr) == 0:
                del refs[addr]
                freed_idx.append(real_idx.pop(addr))
        for num in freed_nums:
            vip_alloc.free[num] = clock
        for idx in freed_idx:
            real_alloc.free[idx] = clock
        for v in upserts:
            if v.id not in vip_nums:
                vip_nums[v.id] = num = vip_alloc.take()
                new_nums.add(num)
            for b in v.backends:
                if b.identity not in real_idx:
                    real_idx[b.identity] = idx = real_alloc.take()
                    new_idx.add(idx)
        generation = self._generation + 1

        # New VIPs sort after every stored one (clock only grows); replaced ones keep theirs.
        seq = {v.id: (clock << 20) + i for i, v in enumerate(upserts)}
        try:
            self._transaction(
                upserts, deletes, vip_nums, seq, real_idx, new_idx, freed_idx,
                new_nums, freed_nums, vip_alloc, real_alloc, clock, generation,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot store the change in {self.path}: {e}") from e
        self._vips, self._vip_nums, self._real_idx, self._refs = vips, vip_nums, real_idx, refs
        self._vip_alloc, self._real_alloc = vip_alloc, real_alloc
        self._clock, self._generation = clock, generation
        return Committed(generation, frozenset(new_nums), frozenset(new_idx))

    def _transaction(
        self,
        upserts: list[VipSpec],
        deletes: list[str],
        vip_nums: dict[str, int],
        seq: dict[str, int],
        real_idx: dict[str, int],
        new_idx: set[int],
        freed_idx: list[int],
        new_nums: set[int],
        freed_nums: list[int],
        vip_alloc: _Allocator,
        real_alloc: _Allocator,
        clock: int,
        generation: int,
    ) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for vid in deletes:
                db.execute("DELETE FROM vips WHERE id = ?", (vid,))
            for v in upserts:
                db.execute(
                    "INSERT INTO vips (id, seq, vip_num, spec) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET spec = excluded.spec",
                    (v.id, seq[v.id], vip_nums[v.id], v.model_dump_json()),
                )
            if freed_idx:
                db.executemany(
                    "DELETE FROM backends WHERE idx = ?", [(i,) for i in freed_idx]
                )
            if new_idx:
                by_idx = {i: a for a, i in real_idx.items() if i in new_idx}
                db.executemany(
                    "INSERT INTO backends (address, idx) VALUES (?, ?)",
                    [(a, i) for i, a in sorted(by_idx.items())],
                )
            free_rows = [("vip", n, clock) for n in freed_nums]
            free_rows += [("real", i, clock) for i in freed_idx]
            if free_rows:
                db.executemany(
                    "INSERT OR REPLACE INTO free_indices (kind, idx, freed_at) VALUES (?, ?, ?)",
                    free_rows,
                )
            taken = [("vip", n) for n in new_nums] + [("real", i) for i in new_idx]
            if taken:
                db.executemany("DELETE FROM free_indices WHERE kind = ? AND idx = ?", taken)
            db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [
                    ("schema", SCHEMA_VERSION),
                    ("generation", generation),
                    ("clock", clock),
                    ("next_vip", vip_alloc.next_unused),
                    ("next_real", real_alloc.next_unused),
                ],
            )
            crash_point("store-before-commit")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        try:
            self._db.close()
        except sqlite3.Error as e:  # pragma: no cover - close rarely fails
            raise StoreError(f"cannot close the state store {self.path}: {e}") from e


def _copy_alloc(a: _Allocator) -> _Allocator:
    c = _Allocator(a.kind, a.first, a.limit)
    c.next_unused = a.next_unused
    c.free = dict(a.free)
    return c


#: Test hook: XLB_CRASH_AT=<point>[:<n>] makes the process SIGKILL itself the n-th time
#: (default: first) it passes that point, so durability tests can kill at an exact instant.
CRASH_ENV = "XLB_CRASH_AT"
_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process when XLB_CRASH_AT names this point (tests only)."""
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    point, _, nth = want.partition(":")
    if point != name:
        return
    _crash_hits[name] = hit = _crash_hits.get(name, 0) + 1
    if hit == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
