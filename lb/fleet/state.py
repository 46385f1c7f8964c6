"""The fleet's desired state in etcd: every LB host validates, writes and follows one state.

`EtcdStore` is the SQLite store (lb/control/store.py) with etcd in front of it:

- a write group is validated against the state this host has applied (etcd revision R),
  then written to etcd in one transaction that compares the guard key (`meta`, changed by
  every write) with R: if another host wrote first, nothing is written and the control
  plane takes that change (`catch_up`) and validates the group again. A change is
  acknowledged only once etcd committed it, then it goes to the local SQLite copy;
- the whole state is shared, allocations included (VIP numbers, backend indices, the free
  list), so every host writes the same values into the same map slots;
- a watch of the prefix brings every other host's change to the local copy and the maps,
  one etcd transaction at a time; a lost connection resumes from the last revision seen, a
  compacted one reads everything again;
- the local SQLite copy (with the revision it holds) lets a host restart and forward with
  the last state while etcd is unreachable. Writes then fail with a 503 problem naming the
  store (`EtcdUnavailable`); reads go on.

Keys under `<prefix>state/`: `meta` (generation, clock, next unused numbers: JSON),
`vips/<id>` (seq, number, spec), `backends/<address>` (index), `free/<kind>/<index>`
(when it was freed). The generation in `meta` is the ETag every host agrees on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lb.config import EtcdConfig
from lb.control.model import Limits, VipSpec
from lb.control.shared import StaleState
from lb.control.store import (
    SCHEMA_VERSION,
    Delta,
    Image,
    Store,
    StoreError,
    StoreStatus,
    immediate,
)
from lb.errors import XlbError
from lb.fleet.etcd import Change, Etcd, EtcdUnavailable, Op

log = logging.getLogger(__name__)

#: Meta row of the local copy: the etcd revision its content is from.
REVISION_META = "etcd_revision"


class EtcdStore(Store):
    """The fleet's shared state in etcd, with this host's SQLite copy under it."""

    def __init__(self, state_dir: Path, limits: Limits, cfg: EtcdConfig,
                 client: Etcd | None = None) -> None:
        super().__init__(state_dir, limits)
        self.cfg = cfg
        self.etcd = client or Etcd(cfg)
        self._own_client = client is None
        self.root = (cfg.prefix + "state/").encode()
        self.guard = self.root + b"meta"
        #: Held (under a lease) by a host that lost too many races in a row: while it exists
        #: only its holder writes (outside `root`: it is not state, and no host applies it).
        self.turn_key = (cfg.prefix + "turn").encode()
        self._token = f"{socket.gethostname()}/{os.getpid()}/{os.urandom(4).hex()}".encode()
        self._turn_lease: int | None = None
        #: Write turns this host took (4 lost races in a row each): fleet status shows it as
        #: write_turns, a sign of write contention between hosts.
        self.turns_taken = 0
        #: The state as etcd holds it at `revision` (key -> value), for applying watch events.
        self._mirror: dict[bytes, bytes] = {}
        self._mirror_ok = False  # the mirror holds a full read (else: rebuilt on first need)
        self.revision = self.extra_meta.get(REVISION_META, 0)  # applied etcd revision
        self.guard_revision = self.extra_meta.get("etcd_guard", 0)
        #: Counters for fleet status and tests.
        self.full_reads = 0
        self.applied_changes = 0
        self.whole_applies = 0  # watched changes that had to be stored whole (see _take_changes)
        self.latest_seen = self.revision  # highest revision the watch delivered
        #: The revision the maps were last brought to (after another host's change).
        self.maps_revision = self.revision
        self.applied = threading.Condition()
        self._apply: Callable[[Callable[[], None]], None] | None = None
        self._inbox: queue.Queue[list[Change] | None] = queue.Queue()
        self._applier: threading.Thread | None = None
        self._closed = False
        try:
            self._read_all()
        except EtcdUnavailable as e:
            log.warning("starting with the local copy (revision %d, generation %d): %s",
                        self.revision, self.generation, e.detail)

    # -- reading etcd -----------------------------------------------------------------

    def _read_all(self) -> int:
        """Read the whole state from etcd and make it the local one; returns the revision."""
        rev, kvs = self.etcd.get_prefix(self.root)
        self.full_reads += 1
        mirror = {kv.key: kv.value for kv in kvs}
        guard_rev = next((kv.mod_revision for kv in kvs if kv.key == self.guard), 0)
        if self.guard not in mirror:
            if self.generation > 0 and not kvs:
                # A fleet's first start on etcd: this host's state seeds it (once: the
                # transaction wants the guard absent).
                self._seed()
                return self.revision
            mirror = {}
        self._mirror, self._mirror_ok = mirror, True
        self._install(rev, guard_rev)
        return rev

    def _seed(self) -> None:
        ops = self._image_ops(self.image())
        new = self.etcd.commit(self.guard, 0, ops)
        if new is None:
            self._read_all()  # another host seeded first
            return
        log.info("seeded %s with the local state (generation %d)", self.etcd.describe(),
                 self.generation)
        self._mirror = {o.key: o.value for o in ops if o.value is not None}
        self._mirror_ok = True
        self.revision = self.guard_revision = new
        self.set_extra_meta(**{REVISION_META: new, "etcd_guard": new})

    def _install(self, rev: int, guard_rev: int) -> None:
        """Make the mirror the stored state (SQLite and memory), at etcd revision `rev`."""
        image = self._image_of(self._mirror)
        self.extra_meta[REVISION_META] = rev
        self.extra_meta["etcd_guard"] = guard_rev
        self.revision, self.guard_revision = rev, guard_rev
        self.latest_seen = max(self.latest_seen, rev)
        if image.meta.get("generation") == self.generation and self._same(image):
            self.set_extra_meta(**{REVISION_META: rev, "etcd_guard": guard_rev})
            return
        self.replace(image)

    def _same(self, image: Image) -> bool:
        mine = self.image()
        return (sorted(mine.vips) == sorted(image.vips) and mine.backends == image.backends
                and sorted(mine.free) == sorted(image.free))

    def _image_of(self, mirror: dict[bytes, bytes]) -> Image:
        root = self.root
        vips: list[tuple[str, int, int, str]] = []
        backends: dict[str, int] = {}
        free: list[tuple[str, int, int]] = []
        meta: dict[str, int] = {"schema": SCHEMA_VERSION, "generation": 0, "clock": 0,
                                "next_vip": 0, "next_real": 1}
        for key, value in mirror.items():
            name = key[len(root):].decode()
            kind, _, rest = name.partition("/")
            try:
                if kind == "meta":
                    meta.update({k: int(v) for k, v in json.loads(value).items()})
                elif kind == "vips":
                    row = json.loads(value)
                    vips.append((rest, int(row["seq"]), int(row["num"]), str(row["spec"])))
                elif kind == "backends":
                    backends[rest] = int(value)
                elif kind == "free":
                    k, _, idx = rest.partition("/")
                    free.append((k, int(idx), int(value)))
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{self.etcd.describe()}: key {key!r} is unreadable: {e}") from e
        if meta["schema"] != SCHEMA_VERSION:
            raise StoreError(f"{self.etcd.describe()}: schema version {meta['schema']}, "
                             f"this build reads {SCHEMA_VERSION}")
        vips.sort(key=lambda r: r[1])
        return Image(vips, backends, free, meta)

    def _image_ops(self, image: Image) -> list[Op]:
        r = self.root
        ops = [Op(r + b"vips/" + vid.encode(),
                  json.dumps({"seq": seq, "num": num, "spec": spec}).encode())
               for vid, seq, num, spec in image.vips]
        ops += [Op(r + b"backends/" + a.encode(), str(i).encode())
                for a, i in image.backends.items()]
        ops += [Op(r + f"free/{k}/{i}".encode(), str(t).encode()) for k, i, t in image.free]
        ops.append(Op(self.guard, json.dumps(image.meta).encode()))
        return ops

    def _delta_ops(self, d: Delta) -> list[Op]:
        r = self.root
        ops: dict[bytes, bytes | None] = {}
        for vid in d.gone:
            ops[r + b"vips/" + vid.encode()] = None
        for a in d.moved:
            ops[r + b"backends/" + a.encode()] = None
        for vid, seq, num, v, _created in d.vip_rows:
            ops[r + b"vips/" + vid.encode()] = json.dumps(
                {"seq": seq, "num": num, "spec": v.model_dump_json()}).encode()
        for a, i in d.added:
            ops[r + b"backends/" + a.encode()] = str(i).encode()
        for k, i in d.taken:
            ops[r + f"free/{k}/{i}".encode()] = None
        for k, i, t in d.free_rows:
            ops[r + f"free/{k}/{i}".encode()] = str(t).encode()
        ops[self.guard] = json.dumps(d.meta).encode()
        # etcd refuses a transaction that names a key twice: one op per key, the last wins.
        return [Op(k, v) for k, v in ops.items()]

    # -- writing ----------------------------------------------------------------------

    def write(self) -> None:
        """Commit the staged batch to etcd (guarded by the applied revision), then locally.

        StaleState: another host wrote first (nothing written; the batch is undone).
        EtcdUnavailable: etcd did not answer (nothing acknowledged; the batch is undone).
        """
        b = self._batch
        if b is None:
            return
        if b.generation == self._generation:
            self._batch = None
            return
        try:
            ops = self._delta_ops(self.delta())
            new = self.etcd.commit(self.guard, self.guard_revision, ops, self.turn_key,
                                   self._token if self._turn_lease is not None else None)
        except EtcdUnavailable as e:
            self.abort()
            # A timeout is not a refusal: the request may still commit (docs/fleet-state.md).
            raise EtcdUnavailable(f"{e.detail}; the change is not acknowledged (if a member "
                                  "received it before going silent it may still commit: read "
                                  "the state before retrying)") from e
        except BaseException:
            self.abort()
            raise
        if new is None:
            self.abort()
            raise StaleState(f"{self.etcd.describe()} moved past revision {self.revision}")
        # Committed in etcd: from here the change is acknowledged, whatever the local copy.
        for o in ops:
            if o.value is None:
                self._mirror.pop(o.key, None)
            else:
                self._mirror[o.key] = o.value
        self.revision = self.guard_revision = new
        self.latest_seen = max(self.latest_seen, new)
        with self.applied:  # this host's maps get it before the change is acknowledged
            self.maps_revision = new
            self.applied.notify_all()
        self.extra_meta[REVISION_META] = new
        self.extra_meta["etcd_guard"] = new
        try:
            super().write()
        except StoreError as e:
            # The local copy lags; the next start (or catch-up) reads it from etcd again.
            log.error("change committed to etcd (revision %d) but not to the local copy: %s",
                      new, e.detail)
            self._mirror_ok = False

    # -- following --------------------------------------------------------------------

    def follow(self, apply: Callable[[Callable[[], None]], None]) -> None:
        """Watch the prefix; each change is applied through `apply` in the applier thread."""
        self._apply = apply
        self._applier = threading.Thread(target=self._apply_loop, name="xlb-etcd-apply",
                                         daemon=True)
        self._applier.start()
        self.etcd.follow(self.root, lambda: self.latest_seen, self._inbox.put,
                         self._on_compacted)

    def _on_compacted(self, compacted: int) -> int:
        # In a worker thread: read everything under the control plane's lock.
        assert self._apply is not None
        out: list[int] = []

        def update() -> None:
            out.append(self._read_all())

        self._apply(update)
        with self.applied:  # the maps carry it now, as after a watched change
            self.maps_revision = self.revision
            self.applied.notify_all()
        return out[0] if out else self.revision

    def _apply_loop(self) -> None:
        while True:
            changes = self._inbox.get()
            if changes is None:
                return
            # Take what queued meanwhile too: one apply for a burst of changes.
            while True:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._closed = True
                    break
                changes.extend(more)
            self.latest_seen = max(self.latest_seen, changes[-1].revision)
            assert self._apply is not None
            try:
                self._apply(lambda c=changes: self._take_changes(c))  # type: ignore[misc]
            except XlbError as e:
                log.error("applying etcd changes failed: %s", e.detail)
            except Exception as e:
                log.exception("applying etcd changes failed: %r", e)
            with self.applied:
                self.maps_revision = self.revision
                self.applied.notify_all()
            if self._closed:
                return

    def _take_changes(self, changes: list[Change]) -> None:
        """Apply watched changes newer than the applied revision (the control plane's lock)."""
        if self._closed:
            return
        new = [c for c in changes if c.revision > self.revision]
        if not new:
            return
        if not self._mirror_ok:
            self._read_all()
            return
        guard_rev = self.guard_revision
        changed: dict[bytes, bytes | None] = {}
        for c in new:
            if c.value is None:
                self._mirror.pop(c.key, None)
            else:
                self._mirror[c.key] = c.value
            changed[c.key] = c.value
            if c.key == self.guard:
                guard_rev = c.revision
        self.applied_changes += 1
        rev = new[-1].revision
        try:
            self._apply_delta(changed, rev, guard_rev)
        except (StoreError, ValueError, KeyError, TypeError) as e:
            # Whatever went wrong, the mirror is right: store it whole.
            log.warning("applying revision %d as a delta failed (%s): storing it whole", rev, e)
            self.whole_applies += 1
            self._install(rev, guard_rev)

    def _apply_delta(self, changed: dict[bytes, bytes | None], rev: int,
                     guard_rev: int) -> None:
        """Store only the rows these keys changed (SQLite and memory): O(change), not O(state)."""
        root = self.root
        vip_puts: list[tuple[str, int, int, VipSpec, str]] = []
        vip_dels: list[str] = []
        be_puts: list[tuple[str, int]] = []
        be_dels: list[str] = []
        free_puts: list[tuple[str, int, int]] = []
        free_dels: list[tuple[str, int]] = []
        meta: dict[str, int] | None = None
        for key, value in changed.items():
            kind, _, rest = key[len(root):].decode().partition("/")
            if kind == "meta":
                if value is None:
                    raise ValueError("the guard key was deleted")
                meta = {k: int(v) for k, v in json.loads(value).items()}
            elif kind == "vips":
                if value is None:
                    vip_dels.append(rest)
                else:
                    row = json.loads(value)
                    vip_puts.append((rest, int(row["seq"]), int(row["num"]),
                                     VipSpec.model_validate_json(row["spec"]), str(row["spec"])))
            elif kind == "backends":
                if value is None:
                    be_dels.append(rest)
                else:
                    be_puts.append((rest, int(value)))
            elif kind == "free":
                k, _, idx = rest.partition("/")
                if value is None:
                    free_dels.append((k, int(idx)))
                else:
                    free_puts.append((k, int(idx), int(value)))
        if meta is None or meta.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError("a change without its meta row")
        self.extra_meta[REVISION_META] = rev
        self.extra_meta["etcd_guard"] = guard_rev
        db = self._db
        try:
            with immediate(db):
                # Deletions first: their numbers and indices may be reused in the same change.
                db.executemany("DELETE FROM vips WHERE id = ?",
                               [(v,) for v in vip_dels] + [(v[0],) for v in vip_puts
                                                          if v[0] not in self._vips])
                db.executemany("DELETE FROM backends WHERE address = ?",
                               [(a,) for a in be_dels] + [(a,) for a, _ in be_puts])
                db.executemany("DELETE FROM free_indices WHERE kind = ? AND idx = ?", free_dels)
                for vid, seq, num, _spec, text in vip_puts:
                    db.execute("INSERT OR REPLACE INTO vips (id, seq, vip_num, spec) "
                               "VALUES (?, ?, ?, ?)", (vid, seq, num, text))
                db.executemany("INSERT INTO backends (address, idx) VALUES (?, ?)", be_puts)
                db.executemany("INSERT OR REPLACE INTO free_indices (kind, idx, freed_at) "
                               "VALUES (?, ?, ?)", free_puts)
                db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                               [*meta.items(), *self.extra_meta.items()])
        except sqlite3.Error as e:
            raise StoreError(f"cannot store revision {rev} in {self.path}: {e}") from e
        self._take_rows(vip_puts, vip_dels, be_puts, be_dels, free_puts, free_dels, meta)
        self.revision, self.guard_revision = rev, guard_rev
        self.latest_seen = max(self.latest_seen, rev)

    def _take_rows(self, vip_puts: list[tuple[str, int, int, VipSpec, str]],
                   vip_dels: list[str], be_puts: list[tuple[str, int]], be_dels: list[str],
                   free_puts: list[tuple[str, int, int]], free_dels: list[tuple[str, int]],
                   meta: dict[str, int]) -> None:
        # The in-memory copy, as _load would build it from the rows just stored.
        refs = self._refs

        def ref(v: VipSpec, by: int) -> None:
            for b in v.backends:
                n = refs.get(b.identity, 0) + by
                if n:
                    refs[b.identity] = n
                else:
                    refs.pop(b.identity, None)

        for vid in vip_dels:
            old = self._vips.pop(vid, None)
            if old is not None:
                ref(old, -1)
            self._vip_nums.pop(vid, None)
            self._seq.pop(vid, None)
        reorder = False
        last = max(self._seq.values(), default=-1)
        for vid, seq, num, spec, _text in vip_puts:
            old = self._vips.get(vid)
            if old is not None:
                ref(old, -1)
            elif seq < last:
                reorder = True  # created before a VIP this host has: keep creation order
            self._vips[vid] = spec
            ref(spec, +1)
            self._vip_nums[vid] = num
            self._seq[vid] = seq
            last = max(last, seq)
        if reorder:
            order = sorted(self._vips, key=self._seq.__getitem__)
            vips = self._vips.copy()
            self._vips.clear()
            self._vips.update((v, vips[v]) for v in order)
        for a in be_dels:
            self._real_idx.pop(a, None)
        for a, i in be_puts:
            self._real_idx[a] = i
        allocs = {"vip": self._vip_alloc, "real": self._real_alloc}
        for k, i in free_dels:
            allocs[k].free.pop(i, None)
        for k, i, t in free_puts:
            allocs[k].free[i] = t
        self._generation = meta["generation"]
        self._clock = meta["clock"]
        self._vip_alloc.next_unused = meta["next_vip"]
        self._real_alloc.next_unused = meta["next_real"]

    def wait_applied(self, revision: int, timeout: float) -> bool:
        """Wait until the maps carry `revision` (or a later one); False on timeout."""
        with self.applied:
            return self.applied.wait_for(lambda: self.maps_revision >= revision, timeout)

    def catch_up(self) -> None:
        """Read the latest state from etcd (after a write lost the race); the lock is held."""
        self._read_all()

    #: Races lost in a row before a host takes the turn. A loser must read the state again
    #: while the winners, who hold it, write again at once: under steady writes from other
    #: hosts, one host could otherwise lose every race (the 20-writer load test did, in CI).
    TURN_AFTER = 4
    #: The turn's lease (s): a host that dies holding the turn holds the others up this long.
    TURN_TTL = 3

    def lost_race(self, tries: int) -> None:
        """A write lost `tries` races in a row: wait out another host's turn; take one after
        TURN_AFTER. Called under the control plane's lock: no host change applies meanwhile."""
        if self._turn_lease is not None:
            if self.etcd.get(self.turn_key) == self._token and self.etcd.refresh(
                    self._turn_lease):
                return  # still ours: the race was lost to a write sent before we took it
            self._turn_lease = None  # expired meanwhile (a long stall): ask again below
        deadline = time.monotonic() + self.TURN_TTL + 1
        while True:
            holder = self.etcd.get(self.turn_key)
            if holder is None or time.monotonic() > deadline:
                break  # past the deadline its lease has run out: the compare tells
            time.sleep(0.005)
        if tries < self.TURN_AFTER:
            return
        lease = self.etcd.grant(self.TURN_TTL)
        if self.etcd.claim(self.turn_key, self._token, lease):
            self._turn_lease = lease
            self.turns_taken += 1
            log.debug("took the write turn after %d lost races", tries)
        else:
            self._drop_lease(lease)  # another host took it first: wait for it next time

    def writes_done(self) -> None:
        """The write group ended (committed or not): give the turn back if this host has it."""
        if self._turn_lease is not None:
            lease, self._turn_lease = self._turn_lease, None
            self._drop_lease(lease)

    def _drop_lease(self, lease: int) -> None:
        try:
            self.etcd.revoke(lease)
        except EtcdUnavailable as e:
            log.info("the write turn's lease ends by itself in %d s: %s", self.TURN_TTL, e.detail)

    def stale(self) -> bool:
        """True when etcd's guard key moved past the revision applied here."""
        try:
            return self.etcd.mod_revision(self.guard) != self.guard_revision
        except EtcdUnavailable:
            return False

    def status(self) -> StoreStatus:
        """etcd, whether the last call reached it, and the applied revision."""
        e = self.etcd
        reason = None if e.reachable else f"{e.describe()} is unreachable: {e.last_error}"
        return StoreStatus(kind="etcd", describe=e.describe(), writable=e.reachable,
                           reason=reason, revision=self.revision)

    def close(self) -> None:
        """Stop following, close etcd (if ours) and the local copy."""
        self._closed = True
        self._inbox.put(None)
        if self._own_client:
            self.etcd.close()
        if self._applier is not None:
            # It may wait for the control plane's lock, which our caller holds: it sees
            # _closed once it gets the lock, and applies nothing.
            self._applier.join(1)
        super().close()


def etcd_store(state_dir: Path, cfg: EtcdConfig) -> Callable[[Limits], EtcdStore]:
    """A store factory for ControlPlane(store=...)."""
    return lambda limits: EtcdStore(state_dir, limits, cfg)
