"""Durable desired state: SQLite in WAL mode, one transaction per change or batch of changes.

The store is the authority. It keeps the VIPs (as JSON, in creation order), the generation,
and the index allocations the maps use: each VIP's number (its ring and counters) and each
backend's index into `reals`. Allocations live in the same transaction as the change that
needs them, so a restart finds the same indices and a crash can never leave a VIP stored
without its number.

`synchronous=FULL` makes COMMIT return only once the WAL is on disk: a change is durable
before it is acknowledged. The store also keeps an in-memory copy, so reads never touch the
disk.

Group commit: `stage` applies a change to the in-memory copy as the next generation (with
an undo log, so nothing is copied whole), and `write` stores every change staged since the
last write in one transaction, one fsync. Each staged change gets the indices it would have
got alone, and one that fails (LimitReached) is undone alone. If the transaction fails, the
in-memory copy goes back to the last write. `commit` is one change staged and written. The
control plane stages under its lock and acknowledges nothing before `write` returned.

Freed indices go to the back of a free list and are handed out oldest-freed first, and only
after every never-used index: a connection-table entry that still names a freed backend
index keeps missing (the data plane treats an empty `reals` slot as a miss) for as long as
possible instead of landing on whichever backend got the index next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lb.control.model import Limits, VipSpec
from lb.errors import KernelError, LimitReached

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "xlb-state.sqlite3"

IndexKind = Literal["vip", "real"]
_META_KEYS = ("schema", "generation", "clock", "next_vip", "next_real")

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


#: The store holds every VIP and backend: readable by its owner only, like the token.
STORE_MODE = 0o600


def _private(path: Path) -> None:
    # Created 0600 before SQLite opens it (SQLite would use the umask, 0644 by default), and
    # an older store made world-readable is closed off.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, STORE_MODE)
    try:
        os.fchmod(fd, STORE_MODE)
    finally:
        os.close(fd)


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (BEGIN IMMEDIATE ... COMMIT); rolled back on any exception, a
    KeyboardInterrupt included, which goes on up."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class StoreError(KernelError):
    """The state store cannot be opened, read or written."""

    kind = "store"


@dataclass
class Delta:
    """The rows one batch changes: what SQLite (or etcd) must be told."""

    gone: list[str] = dataclasses.field(default_factory=list)  # VIP rows deleted first
    moved: list[str] = dataclasses.field(default_factory=list)  # backend rows deleted first
    #: (id, seq, number, spec, created) of each VIP row written.
    vip_rows: list[tuple[str, int, int, VipSpec, bool]] = dataclasses.field(default_factory=list)
    added: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # backend rows
    free_rows: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    taken: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # free rows gone
    meta: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclass
class Image:
    """The whole state as rows: VIPs (id, seq, number, spec JSON), backends, free list, meta."""

    vips: list[tuple[str, int, int, str]]
    backends: dict[str, int]
    free: list[tuple[str, int, int]]
    meta: dict[str, int]


@dataclass(frozen=True)
class StoreStatus:
    """What a store is, and whether a write can be made now (if not, why)."""

    kind: str  # "sqlite" or "etcd"
    describe: str  # "etcd at 127.0.0.1:2379 (prefix /xlb/)", or the SQLite file
    writable: bool
    reason: str | None
    #: The shared store's revision this host has applied (None for SQLite).
    revision: int | None


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
            what, field = "VIP numbers (max_vips)", None
            if self.kind == "real":
                what, field = "backend slots (max_reals - 1)", "backends"
            raise LimitReached(
                f"{field + ': ' if field else ''}no free {what}: all "
                f"{self.limit - self.first} are in use",
                field=field,
            )
        idx = min(self.free, key=self.free.__getitem__)
        del self.free[idx]
        return idx


_MISSING: Any = object()  # "no entry" in the undo log


@dataclass(frozen=True)
class _Mark:
    """Where a batch stood before one of its changes (what undoing back to it restores)."""

    undo: int  # length of the undo log
    order: list[str] | None  # VIP ids in order, when the change deletes one
    generation: int
    clock: int
    next_unused: tuple[int, int]  # of the VIP and the real allocators


class _Batch:
    """Changes staged in the store's in-memory copy since the last write, and their undo."""

    def __init__(self, store: Store) -> None:
        self.generation = store._generation
        self.clock = store._clock
        self._alloc = (store._vip_alloc, store._real_alloc)
        #: (dict, key, value before) for every entry set or removed, oldest first.
        self.undo: list[tuple[dict[Any, Any], Any, Any]] = []
        #: VIPs given a number in this batch -> their seq (creation order).
        self.created: dict[str, int] = {}
        self.begun = self.mark(None)

    def mark(self, order: list[str] | None) -> _Mark:
        """The batch as it stands; `order`: the VIP order, if the next change deletes one."""
        m = _Mark(len(self.undo), order, self.generation, self.clock,
                  (self._alloc[0].next_unused, self._alloc[1].next_unused))
        if order is not None and self.begun.order is None:
            # Before the batch's first VIP deletion: the order abort() restores.
            self.begun = dataclasses.replace(self.begun, order=order)
        return m

    def set(self, d: dict[Any, Any], key: Any, value: Any) -> None:
        """d[key] = value, undoably."""
        self.undo.append((d, key, d.get(key, _MISSING)))
        d[key] = value

    def pop(self, d: dict[Any, Any], key: Any) -> Any:
        """d.pop(key), undoably."""
        old = d.pop(key)
        self.undo.append((d, key, old))
        return old


class Store:
    """The SQLite state store of one state directory."""

    def __init__(self, state_dir: Path, limits: Limits) -> None:
        self.path = Path(state_dir) / DB_NAME
        self.limits = limits
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            _private(self.path)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            for suffix in ("-wal", "-shm"):  # SQLite gives them the database's mode
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    side.chmod(STORE_MODE)
        except OSError as e:
            raise StoreError(f"cannot open the state store {self.path}: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the state store {self.path}: {e}") from e
        self._vips: dict[str, VipSpec] = {}
        self._vip_nums: dict[str, int] = {}
        self._real_idx: dict[str, int] = {}
        self._refs: dict[str, int] = {}  # backend address -> number of VIPs listing it
        self._seq: dict[str, int] = {}  # VIP id -> creation order (its row's seq)
        #: Meta rows a subclass keeps besides the allocation state (the etcd store's revision).
        self.extra_meta: dict[str, int] = {}
        self._generation = 0
        self._clock = 0
        self._batch: _Batch | None = None
        #: What loading this store changed to drop IPv6 zone ids (empty: nothing).
        self.zone_fixes: list[str] = []
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
            rows = db.execute("SELECT id, vip_num, spec, seq FROM vips ORDER BY seq").fetchall()
            backends = db.execute("SELECT address, idx FROM backends").fetchall()
            if any("%" in r[2] for r in rows) or any("%" in r[0] for r in backends):
                self._drop_zone_ids(rows, backends)
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                rows = db.execute("SELECT id, vip_num, spec, seq FROM vips ORDER BY seq").fetchall()
                backends = db.execute("SELECT address, idx FROM backends").fetchall()
                self._generation = int(meta.get("generation", 0))
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
        self.extra_meta = {k: int(v) for k, v in meta.items() if k not in _META_KEYS}
        for vid, num, spec, seq in rows:
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
            self._seq[vid] = int(seq)
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

    def _drop_zone_ids(self, rows: list[Any], backends: list[Any]) -> None:
        """Rewrite a store made before zone ids were refused (issue 14, items 16-17).

        The data plane never saw a zone id (it keys by the address alone), so an address with
        one is the same address without it: a VIP or backend whose only difference from
        another is its zone id is dropped (the one without a zone id stays, with its number
        and index), and every other address loses its zone id. One transaction; each change
        is logged and kept in `self.zone_fixes`.
        """
        fixes: list[str] = []
        ids: set[str] = set()
        kept: list[tuple[str, int, str]] = []  # (id, vip_num, spec JSON)
        freed: list[tuple[str, int]] = []
        # VIPs without a zone id first, so they keep their ids against a zone-id twin.
        order = sorted(rows, key=lambda r: "%" in r[2])
        for vid, num, spec, *_ in order:  # rows may carry `seq` (lb/fleet ordering)
            d = json.loads(spec)
            if "%" not in spec:
                ids.add(vid)
                kept.append((vid, int(num), spec))
                continue
            d["address"] = str(d["address"]).partition("%")[0]
            seen: set[str] = set()
            new_backends = []
            for b in d.get("backends", []):
                addr = str(b["address"]).partition("%")[0]
                if addr in seen:
                    fixes.append(f"VIP {vid}: dropped backend {b['address']} (twin of {addr})")
                    continue
                if addr != b["address"]:
                    fixes.append(f"VIP {vid}: backend {b['address']} is now {addr}")
                seen.add(addr)
                new_backends.append({**b, "address": addr})
            d["backends"] = new_backends
            vip = VipSpec.model_validate(d)
            if vip.id in ids:
                fixes.append(f"dropped VIP {vid} (twin of {vip.id}, which stays)")
                freed.append(("vip", int(num)))
                continue
            if vip.id != vid:
                fixes.append(f"VIP {vid} is now {vip.id}")
            ids.add(vip.id)
            kept.append((vip.id, int(num), vip.model_dump_json()))
        used = {b.identity for _, _, spec in kept
                for b in VipSpec.model_validate_json(spec).backends}
        new_idx: dict[str, int] = {}
        # Addresses without a zone id first: they keep their index against a zone-id twin.
        for addr, idx in sorted(backends, key=lambda r: "%" in r[0]):
            plain = str(addr).partition("%")[0]
            if plain in new_idx or plain not in used:
                fixes.append(f"freed backend index {idx} of {addr}")
                freed.append(("real", int(idx)))
                continue
            new_idx[plain] = int(idx)
        db = self._db
        seqs = dict(db.execute("SELECT id, seq FROM vips").fetchall())
        clock = int(dict(db.execute("SELECT key, value FROM meta").fetchall()).get("clock", 0))
        with immediate(db):
            by_num = {int(r[1]): r[0] for r in rows}
            db.execute("DELETE FROM vips")
            db.executemany(
                "INSERT INTO vips (id, seq, vip_num, spec) VALUES (?, ?, ?, ?)",
                [(vid, seqs[by_num[num]], num, spec) for vid, num, spec in kept],
            )
            db.execute("DELETE FROM backends")
            db.executemany("INSERT INTO backends (address, idx) VALUES (?, ?)",
                           list(new_idx.items()))
            db.executemany(
                "INSERT OR REPLACE INTO free_indices (kind, idx, freed_at) VALUES (?, ?, ?)",
                [(kind, idx, clock) for kind, idx in freed],
            )
            gen = int(dict(db.execute("SELECT key, value FROM meta").fetchall())
                      .get("generation", 0))
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', ?)",
                       (gen + 1,))
        for f in fixes:
            log.warning("%s: IPv6 zone ids are refused now: %s", self.path, f)
        self.zone_fixes = fixes

    # -- write ------------------------------------------------------------------------

    @property
    def staged_generation(self) -> int:
        """Generation of the in-memory state: `generation` plus the changes staged since."""
        return self._batch.generation if self._batch is not None else self._generation

    def commit(self, upserts: Iterable[VipSpec] = (), deletes: Iterable[str] = ()) -> Committed:
        """Store one change (VIPs created/replaced, VIPs deleted) in one transaction.

        Returns once the change is on disk; on failure the in-memory copy is as before.
        """
        try:
            done = self.stage(upserts, deletes)
        except BaseException:
            self.abort()
            raise
        self.write()
        return done

    def stage(self, upserts: Iterable[VipSpec] = (), deletes: Iterable[str] = ()) -> Committed:
        """Apply one change to the in-memory copy as the next generation; nothing on disk yet.

        The first change staged after a `write` (or `abort`) begins a batch; `write` stores
        the whole batch in one transaction. A change that fails (LimitReached: no index
        left) is undone alone: the batch stays as the changes before it left it.
        """
        if self._batch is None:
            self._batch = _Batch(self)
        b = self._batch
        upserts = list(upserts)
        deletes = list(deletes)
        mark = b.mark(list(self._vips) if deletes else None)
        try:
            return self._stage(b, upserts, deletes)
        except BaseException:
            self._undo(b, mark)
            raise

    def _stage(self, b: _Batch, upserts: list[VipSpec], deletes: list[str]) -> Committed:
        # The same steps, in the same order, as storing the change alone: each change of a
        # batch gets the indices it would have got on its own.
        vips, vip_nums, real_idx, refs = self._vips, self._vip_nums, self._real_idx, self._refs
        b.clock += 1
        clock = b.clock
        new_nums: set[int] = set()
        new_idx: set[int] = set()
        freed_nums: list[int] = []
        freed_idx: list[int] = []
        dropped: list[str] = []  # addresses whose last reference went in this change

        def unref(v: VipSpec) -> None:
            for be in v.backends:
                n = refs[be.identity] - 1
                b.set(refs, be.identity, n)
                if not n:
                    dropped.append(be.identity)

        # Free first, allocate after: a full table can then swap one VIP for another in
        # one change (the reconciler orders the writes for a reused index).
        for vid in deletes:
            old = b.pop(vips, vid)
            unref(old)
            freed_nums.append(b.pop(vip_nums, vid))
        for v in upserts:
            old_v = vips.get(v.id)
            if old_v is not None:
                unref(old_v)
            b.set(vips, v.id, v)
            for be in v.backends:
                b.set(refs, be.identity, refs.get(be.identity, 0) + 1)
        for addr in dropped:
            if refs.get(addr) == 0:
                b.pop(refs, addr)
                freed_idx.append(b.pop(real_idx, addr))
        for num in freed_nums:
            b.set(self._vip_alloc.free, num, clock)
        for idx in freed_idx:
            b.set(self._real_alloc.free, idx, clock)
        for i, v in enumerate(upserts):
            if v.id not in vip_nums:
                num = self._take(b, self._vip_alloc)
                b.set(vip_nums, v.id, num)
                new_nums.add(num)
                # New VIPs sort after every stored one (clock only grows).
                b.set(b.created, v.id, (clock << 20) + i)
            for be in v.backends:
                if be.identity not in real_idx:
                    idx = self._take(b, self._real_alloc)
                    b.set(real_idx, be.identity, idx)
                    new_idx.add(idx)
        b.generation += 1
        return Committed(b.generation, frozenset(new_nums), frozenset(new_idx))

    def _take(self, b: _Batch, alloc: _Allocator) -> int:
        # _Allocator.take, with the free-list removal undoable.
        if alloc.next_unused < alloc.limit:
            return alloc.take()
        if not alloc.free:
            alloc.take()  # raises LimitReached
        idx = min(alloc.free, key=alloc.free.__getitem__)
        b.pop(alloc.free, idx)
        return idx

    def write(self) -> None:
        """Store every staged change in one transaction; returns once it is on disk.

        On failure the in-memory copy goes back to the last write and StoreError is raised.
        """
        b = self._batch
        if b is None:
            return
        if b.generation == self._generation:  # every staged change was undone
            self._batch = None
            return
        try:
            self._transaction(b)
        except BaseException as e:
            self.abort()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot store the change in {self.path}: {e}") from e
            raise
        self._clock, self._generation = b.clock, b.generation
        self._batch = None

    def abort(self) -> None:
        """Undo every change staged since the last write."""
        if self._batch is not None:
            self._undo(self._batch, self._batch.begun)
            self._batch = None

    def _undo(self, b: _Batch, mark: _Mark) -> None:
        undo = b.undo
        while len(undo) > mark.undo:
            d, key, old = undo.pop()
            if old is _MISSING:
                del d[key]
            else:
                d[key] = old
        if mark.order is not None:  # a deleted VIP came back: at its place, not at the end
            vips = dict(self._vips)
            self._vips.clear()
            self._vips.update((vid, vips.pop(vid)) for vid in mark.order if vid in vips)
            self._vips.update(vips)
        b.generation, b.clock = mark.generation, mark.clock
        self._vip_alloc.next_unused, self._real_alloc.next_unused = mark.next_unused

    def delta(self) -> Delta:
        """The rows the staged batch changes (what `write` stores), computed from its undo log."""
        b = self._batch
        assert b is not None
        # The rows every key the batch touched should have now (first undo entry = before).
        before: dict[int, dict[Any, Any]] = {}
        for d, key, old in b.undo:
            before.setdefault(id(d), {}).setdefault(key, old)
        vips_before = before.get(id(self._vips), {})
        idx_before = before.get(id(self._real_idx), {})
        out = Delta()
        for kind, alloc in (("vip", self._vip_alloc), ("real", self._real_alloc)):
            for idx in before.get(id(alloc.free), {}):
                if idx in alloc.free:
                    out.free_rows.append((kind, idx, alloc.free[idx]))
                else:
                    out.taken.append((kind, idx))
        # Deleted (or deleted and created again) VIPs and dropped addresses go first:
        # their numbers and indices may be handed to others in the same batch.
        out.gone = [vid for vid, old in vips_before.items()
                  if old is not _MISSING and (vid in b.created or vid not in self._vips)]
        out.moved = [a for a, old in idx_before.items()
                   if old is not _MISSING and self._real_idx.get(a) != old]
        for vid in vips_before:
            v = self._vips.get(vid)
            if v is None:
                continue
            if vid in b.created:
                out.vip_rows.append((vid, b.created[vid], self._vip_nums[vid], v, True))
            elif v is not vips_before[vid]:
                out.vip_rows.append((vid, self._seq[vid], self._vip_nums[vid], v, False))
        out.added = [(a, i) for a, old in idx_before.items()
                   if (i := self._real_idx.get(a)) is not None and i != old]
        out.meta = {
            "schema": SCHEMA_VERSION,
            "generation": b.generation,
            "clock": b.clock,
            "next_vip": self._vip_alloc.next_unused,
            "next_real": self._real_alloc.next_unused,
        }
        return out

    def _transaction(self, b: _Batch) -> None:
        d = self.delta()
        db = self._db
        with immediate(db):
            if d.gone:
                db.executemany("DELETE FROM vips WHERE id = ?", [(v,) for v in d.gone])
            if d.moved:
                db.executemany("DELETE FROM backends WHERE address = ?",
                               [(a,) for a in d.moved])
            for vid, seq, num, v, created in d.vip_rows:
                if created:
                    db.execute(
                        "INSERT INTO vips (id, seq, vip_num, spec) VALUES (?, ?, ?, ?)",
                        (vid, seq, num, v.model_dump_json()),
                    )
                else:
                    db.execute("UPDATE vips SET spec = ? WHERE id = ?",
                               (v.model_dump_json(), vid))
            if d.added:
                db.executemany("INSERT INTO backends (address, idx) VALUES (?, ?)", d.added)
            if d.free_rows:
                db.executemany(
                    "INSERT OR REPLACE INTO free_indices (kind, idx, freed_at) VALUES (?, ?, ?)",
                    d.free_rows,
                )
            if d.taken:
                db.executemany("DELETE FROM free_indices WHERE kind = ? AND idx = ?", d.taken)
            db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [*d.meta.items(), *self.extra_meta.items()],
            )
            crash_point("store-before-commit")
        for vid in d.gone:
            self._seq.pop(vid, None)
        for vid, seq, _num, _v, created in d.vip_rows:
            if created:
                self._seq[vid] = seq

    def image(self) -> Image:
        """The whole stored state as rows (what `replace` takes)."""
        return Image(
            vips=[(vid, self._seq[vid], self._vip_nums[vid], v.model_dump_json())
                  for vid, v in self._vips.items()],
            backends=dict(self._real_idx),
            free=[(kind, idx, t) for kind, alloc in (("vip", self._vip_alloc),
                                                     ("real", self._real_alloc))
                  for idx, t in alloc.free.items()],
            meta={"schema": SCHEMA_VERSION, "generation": self._generation,
                  "clock": self._clock, "next_vip": self._vip_alloc.next_unused,
                  "next_real": self._real_alloc.next_unused},
        )

    def replace(self, image: Image) -> None:
        """Make `image` the stored state (one transaction), then reload the in-memory copy.

        For a store that follows another (lb/fleet/state.py): the state comes whole, with
        its indices, so every host holds the same numbers and rings.
        """
        assert self._batch is None, "replace() with a batch staged"
        db = self._db
        try:
            with immediate(db):
                db.execute("DELETE FROM vips")
                db.execute("DELETE FROM backends")
                db.execute("DELETE FROM free_indices")
                db.execute("DELETE FROM meta")
                db.executemany("INSERT INTO vips (id, seq, vip_num, spec) VALUES (?, ?, ?, ?)",
                               image.vips)
                db.executemany("INSERT INTO backends (address, idx) VALUES (?, ?)",
                               list(image.backends.items()))
                db.executemany(
                    "INSERT INTO free_indices (kind, idx, freed_at) VALUES (?, ?, ?)", image.free
                )
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                               [*image.meta.items(), *self.extra_meta.items()])
        except sqlite3.Error as e:
            raise StoreError(f"cannot store the fleet's state in {self.path}: {e}") from e
        old = self._vips
        self._vips, self._vip_nums, self._real_idx, self._refs, self._seq = {}, {}, {}, {}, {}
        self._load()
        # Keep the spec objects that did not change: the reconciler skips those by identity.
        for vid, v in list(self._vips.items()):
            o = old.get(vid)
            if o is not None and o == v:
                self._vips[vid] = o

    def set_extra_meta(self, **values: int) -> None:
        """Store meta rows of a subclass now (outside a change)."""
        self.extra_meta.update(values)
        try:
            self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 list(values.items()))
        except sqlite3.Error as e:
            raise StoreError(f"cannot write to the state store {self.path}: {e}") from e

    # -- following another store (SQLite follows nothing) -----------------------------

    def follow(self, apply: Callable[[Callable[[], None]], None]) -> None:
        """Start applying changes made elsewhere through `apply` (SQLite: none are)."""

    def catch_up(self) -> None:
        """Bring the in-memory copy to the latest shared state (SQLite: it is the latest)."""

    def stale(self) -> bool:
        """True when another store moved past this copy (SQLite: never)."""
        return False

    def lost_race(self, tries: int) -> None:
        """After a write lost to another store's `tries` times in a row (SQLite: never)."""

    def writes_done(self) -> None:
        """A write group ended (SQLite: nothing to give back)."""

    def status(self) -> StoreStatus:
        """What the store is and whether it can take writes."""
        return StoreStatus(kind="sqlite", describe=str(self.path), writable=True,
                           reason=None, revision=None)

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        try:
            self._db.close()
        except sqlite3.Error as e:  # pragma: no cover - close rarely fails
            raise StoreError(f"cannot close the state store {self.path}: {e}") from e


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
