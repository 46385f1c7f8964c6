"""The control plane facade: desired state in, durable store, maps brought to it.

Every write runs under one lock and follows the same write-ahead order: validate fully,
store durably (its own generation), apply to the maps, return. Writes that arrive together
are group-committed (see `_write`): each is validated against the state the ones before
it left and gets its own generation or its own error, then the whole group goes to disk in
one SQLite transaction (one fsync), is applied to the maps once, and only then is each
write answered. A write that is stored but cannot be applied is still acknowledged (the
state is durable): it is counted in `reconcile_errors` and retried by the next change,
`repair()` or the next start, which always brings the maps to the stored state.

Without a balancer (``ControlPlane(settings, None)``) the control plane keeps and stores the
desired state only: what the API tests and a dry run need.

The runtime configuration map `lb_cfg` is not written here (lb/settings.py owns it).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from pydantic import ValidationError

from lb.config import DataplaneConfig, RuntimeConfig
from lb.control import maglev
from lb.control.model import (
    BackendSpec,
    BackendUpdate,
    Drift,
    Limits,
    Plan,
    State,
    VipSpec,
    VipUpdate,
    canonical_address,
    check_src_total,
    invalid_from_validation,
    parse_vip_id,
    validate_backend,
    validate_state,
    validate_vip,
    vip_id,
    with_second_window,
)
from lb.control.reconcile import MapImage, Reconciler, RingCache, diff_images, plan_change
from lb.control.shared import StaleState, StateStore
from lb.control.store import Store, StoreStatus, crash_point
from lb.errors import (
    Conflict,
    InvalidInput,
    KernelError,
    NotApplied,
    NotFound,
    PreconditionFailed,
    XlbError,
)
from lb.timing import APPLY_BUCKETS, Histogram

if TYPE_CHECKING:
    from lb.dataplane.loader import Balancer

log = logging.getLogger(__name__)
#: Reads of the maps verify() makes without holding writes back before it holds them.
VERIFY_TRIES = 3
_M = TypeVar("_M", VipSpec, BackendSpec)
_R = TypeVar("_R")


class _Lock:
    """A re-entrant lock that tells whether the calling thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if not self._depth:
            self._owner = None
        self._lock.release()

    def held(self) -> bool:
        """True when the calling thread holds the lock."""
        return self._owner == threading.get_ident()


class _Write(Generic[_R]):
    """One write: its change, then, once its group is done, its result or its error."""

    def __init__(self, change: Callable[[], _R]) -> None:
        self.change = change
        self.ready = threading.Event()  # set when done, or when this write is to lead
        self.lead = False
        self.result: _R | None = None
        self.error: BaseException | None = None

    def outcome(self) -> _R:
        """The result, or raise the error."""
        if self.error is not None:
            raise self.error
        return cast(_R, self.result)


@dataclass(frozen=True)
class DriftReport:
    """One check of the maps against the desired state."""

    #: Unix time of the check.
    checked_at: float
    #: The stored generation it compared with.
    generation: int
    drifts: tuple[Drift, ...]
    #: True when the drifts were rewritten (the maps match since).
    repaired: bool

    @property
    def outstanding(self) -> tuple[Drift, ...]:
        """Drift found and not repaired."""
        return () if self.repaired else self.drifts


@dataclass
class _Group:
    """What the changes staged in one group need from the apply that follows."""

    upserted: dict[str, None] = field(default_factory=dict)  # VIP ids, in order
    new_vip_nums: frozenset[int] = frozenset()
    new_real_idx: frozenset[int] = frozenset()


def _own(spec: VipSpec) -> VipSpec:
    # Specs are frozen but their backend list is not: keep a list no caller holds.
    return spec.model_copy(update={"backends": list(spec.backends)})


class ControlSettings(Protocol):
    """What the control plane needs from lb.settings.Settings."""

    @property
    def state_dir(self) -> Path:
        """Directory holding the SQLite store."""
        ...


class ControlPlane:
    """Thread-safe facade over the desired state, its store and the maps."""

    def __init__(
        self,
        settings: ControlSettings,
        balancer: Balancer | None,
        *,
        config: DataplaneConfig | None = None,
        seed: int = maglev.DEFAULT_SEED,
        loopback_backends: bool = False,
        runtime: RuntimeConfig | None = None,
        overlay: Callable[[VipSpec], VipSpec] | None = None,
        store: Callable[[Limits], StateStore] | None = None,
    ) -> None:
        """`overlay` programs the first reconciliation already (see set_overlay): health
        restored from the last run keeps its backends out from the first map write on."""
        #: Held by a group's leader and by every read (see _write).
        self._lock = _Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Write[Any]] = []  # writes waiting for the next group
        self._leading = False  # a writer is leading a group (or about to)
        self._group: _Group | None = None  # the group being staged
        self._balancer = balancer
        if config is None:
            config = balancer.config if balancer is not None else DataplaneConfig()
        # loopback_backends: a one-host test bed of the health checker (see Limits).
        # runtime: the lb_cfg in force, so a VIP that needs the LB's own source is refused
        # while that source is unset (issue 14, item 7).
        self.limits = Limits.from_config(config)._replace(loopback_backends=loopback_backends)
        if runtime is not None:
            self.limits = self.limits._replace(
                lb_source_v4="" if runtime.src_v4.is_unspecified else str(runtime.src_v4),
                lb_source_v6="" if runtime.src_v6.is_unspecified else str(runtime.src_v6),
                max_frame=runtime.max_frame,
            )
        #: SQLite by default; `store` builds another (lb/fleet/state.py: the fleet's etcd).
        self._store: StateStore = (
            store(self.limits) if store is not None
            else Store(Path(settings.state_dir), self.limits)
        )
        self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xlb-store")
        #: Builds a group's rings alongside the leader (two VIPs changed or more).
        self._ring_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xlb-ring")
        self._reconciler = Reconciler(balancer, seed) if balancer is not None else None
        self._plan_rings = (
            self._reconciler.rings if self._reconciler else RingCache(config.ring_size, seed)
        )
        self._reconcile_errors = 0
        self._last_error: str | None = None
        #: The last verify (see "drift" below) and the running totals /metrics exports.
        self._drift_report: DriftReport | None = None
        self._applies = 0
        #: Each write group's time, validated to maps written, whole and by phase
        #: ("validate", "store", "maps": every map write, a group's or not), for /metrics.
        self.apply_seconds = Histogram(APPLY_BUCKETS)
        self.apply_phase_seconds = Histogram(APPLY_BUCKETS, ("phase",))
        self.drift_checks = 0
        self.drift_repairs = 0
        self.drift_repaired_entries = 0
        self._fingerprints: dict[str, tuple[object, str]] = {}
        #: Maps each stored VIP to the VIP the maps carry (health checks; see set_overlay).
        self._overlay: Callable[[VipSpec], VipSpec] | None = overlay
        #: Why the start could not bring the maps to the stored state (None: it could).
        self.start_error: str | None = None
        with self._lock:
            self._reconcile(starting=True)
            if self._last_error is not None:
                self.start_error = self._last_error
        self._store.follow(self.apply_remote)

    # -- properties -------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Generation of the stored state (bumped by every applied change)."""
        return self._store.generation

    @property
    def ring_build_seconds(self) -> Histogram:
        """The time of each Maglev ring built (for the maps or for a plan)."""
        return self._plan_rings.build_seconds

    @property
    def store_status(self) -> StoreStatus:
        """The store's kind, whether it takes writes now, and its applied revision."""
        return self._store.status()

    @property
    def reconcile_errors(self) -> int:
        """Number of times applying the stored state to the maps failed."""
        return self._reconcile_errors

    @property
    def last_reconcile_error(self) -> str | None:
        """Message of the last failed reconciliation (None once one succeeds)."""
        return self._last_error

    @property
    def in_sync(self) -> bool:
        """True when the last reconciliation succeeded (the maps match the stored state)."""
        return self._last_error is None

    # -- reads ------------------------------------------------------------------------

    def list_vips(self) -> list[VipSpec]:
        """Every VIP, in creation order."""
        with self._lock:
            return list(self._store.vips.values())

    def get_vip(self, vip_id: str) -> VipSpec:
        """One VIP by id; NotFound."""
        with self._lock:
            return self._vip(vip_id)

    def ring_fingerprint(self, vip_id: str) -> str:
        """Fingerprint of the ring the maps carry for this VIP (health overlay included)."""
        spec = self._vip(vip_id)
        overlay = self._overlay
        return self._plan_rings.fingerprint(overlay(spec) if overlay else spec)

    def list_backends(self, vip_id: str) -> list[BackendSpec]:
        """The backends of a VIP; NotFound."""
        return list(self.get_vip(vip_id).backends)

    def get_state(self) -> State:
        """The whole desired state with its generation."""
        with self._lock:
            return State(vips=list(self._store.vips.values()), generation=self.generation)

    def vip_number(self, vip_id: str) -> int:
        """The VIP's number in the data plane (ring and counter index); NotFound."""
        with self._lock:
            return self._store.vip_nums[self._vip(vip_id).id]

    def vip_names(self) -> dict[int, str]:
        """Every VIP's id by its number in the data plane (events name VIPs by number)."""
        with self._lock:
            return self._names()

    def backend_index(self, address: str) -> int:
        """A backend's index in `reals` (shared by every VIP listing it); NotFound."""
        key = canonical_address(address, field="address")
        with self._lock:
            try:
                return self._store.real_idx[key]
            except KeyError:
                raise NotFound(f"no VIP has backend {key}", field="address") from None

    # -- VIP writes -------------------------------------------------------------------

    def create_vip(self, spec: VipSpec) -> VipSpec:
        """Create a VIP with its backends; Conflict, LimitReached, InvalidInput."""
        spec = _own(spec)
        validate_vip(spec, self.limits)

        def change() -> VipSpec:
            if spec.id in self._store.vips:
                raise Conflict(f"VIP {spec.id} already exists", field="vip_id")
            if spec.allow or spec.deny:
                check_src_total([*self._store.vips.values(), spec], self.limits,
                                field="deny" if spec.deny else "allow")
            self._commit(upserts=[spec])
            return spec

        return self._write(change)

    def update_vip(self, vip_id: str, changes: VipUpdate) -> VipSpec:
        """Change a VIP's flags, encapsulation or outer source; NotFound, InvalidInput."""
        fields = {f: getattr(changes, f) for f in changes.model_fields_set}
        # null is the default, as for outer_source and health_check (JSON merge patch:
        # null removes the member).
        for f in ("hash_src_only", "lru_bypass", "encap", "second_chance_window_s"):
            if f in fields and fields[f] is None:
                fields[f] = VipSpec.model_fields[f].default
        for f in ("allow", "deny"):
            if f in fields and fields[f] is None:
                fields[f] = []

        def change() -> VipSpec:
            vip = self._vip(vip_id)
            new = self._copy(vip, fields)
            validate_vip(new, self.limits)
            if (new.allow, new.deny) != (vip.allow, vip.deny):
                others = [v for v in self._store.vips.values() if v.id != new.id]
                check_src_total([*others, new], self.limits,
                                field="deny" if "deny" in fields else "allow")
            if new == vip:
                return vip
            self._commit(upserts=[new])
            # As stored: the commit opens or closes the second-chance window.
            return self._vip(new.id)

        return self._write(change)

    def delete_vip(self, vip_id: str) -> None:
        """Delete a VIP; NotFound."""

        def change() -> None:
            self._commit(deletes=[self._vip(vip_id).id])

        self._write(change)

    # -- backend writes ---------------------------------------------------------------

    def add_backend(self, vip_id: str, spec: BackendSpec) -> BackendSpec:
        """Add a backend to a VIP; NotFound, Conflict, LimitReached, InvalidInput."""

        def change() -> BackendSpec:
            vip = self._vip(vip_id)
            if vip.backend(spec.identity) is not None:
                raise Conflict(f"VIP {vip.id} already has backend {spec.identity}",
                               field="address")
            validate_backend(vip, spec, "backend", self.limits)
            new = self._copy(vip, {"backends": [*vip.backends, spec]})
            validate_vip(new, self.limits)
            self._commit(upserts=[new])
            return spec

        return self._write(change)

    def update_backend(self, vip_id: str, address: str, changes: BackendUpdate) -> BackendSpec:
        """Change a backend's weight or state; NotFound, InvalidInput."""
        fields = {f: getattr(changes, f) for f in changes.model_fields_set}
        for f, v in fields.items():
            if v is None:
                raise InvalidInput(f"{f}: must not be null", field=f)

        def change() -> BackendSpec:
            vip = self._vip(vip_id)
            old = self._backend(vip, address)
            new_b = self._copy(old, fields)
            validate_backend(vip, new_b, "backend", self.limits)
            if new_b == old:
                return old
            backends = [new_b if b.identity == old.identity else b for b in vip.backends]
            new = self._copy(vip, {"backends": backends})
            validate_vip(new, self.limits)
            self._commit(upserts=[new])
            return new_b

        return self._write(change)

    def remove_backend(self, vip_id: str, address: str) -> None:
        """Remove a backend from a VIP; NotFound."""

        def change() -> None:
            vip = self._vip(vip_id)
            old = self._backend(vip, address)
            backends = [b for b in vip.backends if b.identity != old.identity]
            self._commit(upserts=[self._copy(vip, {"backends": backends})])

        self._write(change)

    def replace_backends(self, vip_id: str, backends: list[BackendSpec]) -> list[BackendSpec]:
        """Replace a VIP's whole backend list in one change; NotFound, InvalidInput."""
        backends = list(backends)

        def change() -> list[BackendSpec]:
            vip = self._vip(vip_id)
            new = self._copy(vip, {"backends": backends})
            validate_vip(new, self.limits)
            if new != vip:
                self._commit(upserts=[new])
            return list(new.backends)

        return self._write(change)

    # -- whole state ------------------------------------------------------------------

    def plan(self, state: State) -> Plan:
        """What apply_state(state) would change, without changing anything."""
        validate_state(state.vips, self.limits)
        with self._lock:
            return plan_change(
                self._store.vips, self._keep_windows(state.vips), self.generation,
                self._plan_rings, self._store.real_idx,
            )

    def _keep_windows(self, target: Sequence[VipSpec]) -> list[VipSpec]:
        """A declarative state carries no second-chance windows: a VIP whose ring stays the
        same keeps its open window (else putting back what GET returned would close it)."""
        current = self._store.vips
        out = []
        for v in target:
            old = current.get(v.id)
            if (v.second_window is None and old is not None and old.second_window is not None
                    and old.ring_members() == v.ring_members()):
                v = v.model_copy(update={"second_window": old.second_window})
            out.append(v)
        return out

    def apply_state(self, state: State, *, if_generation: int | None = None) -> Plan:
        """Make `state` the desired state in one change; PreconditionFailed, InvalidInput."""
        validate_state(state.vips, self.limits)

        def change() -> Plan:
            target = self._keep_windows(state.vips)
            store = self._store
            generation = store.staged_generation  # as left by the changes before this one
            if if_generation is not None and if_generation != generation:
                raise PreconditionFailed(
                    f"generation is {generation}, not {if_generation}",
                    field="if_generation",
                )
            plan = plan_change(
                store.vips, target, generation, self._plan_rings, store.real_idx
            )
            if plan.empty:
                return plan  # nothing stored, nothing bumped: to_generation stays None
            current = store.vips
            upserts = [_own(v) for v in target if current.get(v.id) != v]
            to = self._commit(upserts=upserts, deletes=plan.removed_vips)
            return plan.model_copy(update={"to_generation": to})

        return self._write(change)

    # -- second chance --------------------------------------------------------------

    def close_second_windows(self, now: float | None = None) -> list[str]:
        """Close the second-chance windows that ended (docs/second-chance.md): their VIPs
        are stored without one, so the rings lose the second hops. Returns their ids."""
        now = time.time() if now is None else now

        def change() -> list[str]:
            due = [v for v in self._store.vips.values()
                   if v.second_window is not None and not v.window_open(now)]
            if due:
                self._commit(upserts=[v.model_copy(update={"second_window": None})
                                      for v in due])
            return [v.id for v in due]

        with self._lock:
            if not any(v.second_window is not None and not v.window_open(now)
                       for v in self._store.vips.values()):
                return []
        return self._write(change)

    # -- a shared store's changes ---------------------------------------------------

    def apply_remote(self, update: Callable[[], None]) -> None:
        """Run `update` (the store taking another host's change) and bring the maps to it.

        Runs under the lock, between write groups: a group never sees half of it.
        """
        with self._lock:
            self._apply_remote(update)

    def _apply_remote(self, update: Callable[[], None]) -> None:
        store = self._store
        nums, idx = dict(store.vip_nums), dict(store.real_idx)
        update()
        # Numbers and indices that name something new: their counters start from zero.
        new_nums = frozenset(n for v, n in store.vip_nums.items() if nums.get(v) != n)
        new_idx = frozenset(i for a, i in store.real_idx.items() if idx.get(a) != i)
        self._reconcile(new_nums, new_idx)

    def fleet_view(self) -> tuple[int, bool, dict[str, str]]:
        """(generation, in_sync, ring_fingerprints()) read under one hold of the lock, so a
        host never publishes a generation with the rings of another."""
        with self._lock:
            return self.generation, self.in_sync, self.ring_fingerprints()

    def ring_fingerprints(self) -> dict[str, str]:
        """Each VIP's ring as the maps carry it (health applied), as a SHA-256 of its slots.

        Hosts whose fingerprints agree send every new flow of that VIP to the same backend.
        """
        with self._lock:
            real_idx = self._store.real_idx
            out: dict[str, str] = {}
            cache = self._fingerprints
            for vid, v in self._effective().items():
                values = self._plan_rings.values(v, real_idx)
                hit = cache.get(vid)
                if hit is None or hit[0] is not values:  # the same array while unchanged
                    hit = cache[vid] = (values, maglev.fingerprint(values))
                out[vid] = hit[1]
            for vid in [v for v in cache if v not in out]:
                del cache[vid]
            return out

    # -- drift ------------------------------------------------------------------------
    #
    # Writes are incremental (the reconciler remembers what it wrote), so an entry changed
    # behind the daemon's back (bpftool, a raw map write) stays wrong through later changes
    # until something reads the maps back: verify() does, and records what it found, which
    # /readyz and /metrics report; repair() rewrites it.

    def verify(self) -> list[Drift]:
        """Differences between the maps and the desired state (empty without a balancer);
        recorded as the last check (`drift_report`).

        The maps are read without holding writes back (reading every ring costs about
        40 ms per VIP): when a write reached the maps meanwhile, the read is done again,
        and after VERIFY_TRIES such reads, once more with writes held back.
        """
        if self._reconciler is None:
            return []
        for attempt in range(VERIFY_TRIES + 1):
            locked = attempt == VERIFY_TRIES or self._lock.held()
            with self._lock:
                want, names, applies = self._desired(), self._names(), self._applies
                if locked:
                    return self._compare(want, names)
            have = self._read(want)
            with self._lock:
                if self._applies == applies:
                    return self._compare(want, names, have)
        raise AssertionError("unreachable")  # the last attempt returns under the lock

    def _read(self, want: MapImage) -> MapImage:
        assert self._reconciler is not None
        try:
            return self._reconciler.read(want)
        except Exception as e:
            raise KernelError(f"reading the maps failed: {e}") from e

    def _compare(
        self, want: MapImage, names: Mapping[int, str], have: MapImage | None = None
    ) -> list[Drift]:
        drifts = diff_images(want, self._read(want) if have is None else have, names)
        self._record_check(drifts, repaired=False)
        return drifts

    def repair(self) -> list[Drift]:
        """Bring the maps to the desired state; returns the differences it fixed."""
        with self._lock:
            drifts = self.verify()
            if self._reconciler is not None:
                self._reconciler.invalidate()
                self._reconcile()
                if self._last_error is not None:
                    raise KernelError(f"repair failed: {self._last_error}")
                self.start_error = None
                self._record_check(drifts, repaired=True)
            return drifts

    def check_drift(self, *, repair: bool) -> DriftReport:
        """verify(), and with `repair` repair() when it found drift; the report recorded."""
        # Not under the lock: verify() reads the maps without holding writes back.
        if self.verify() and repair:
            self.repair()
        report = self._drift_report
        return report or DriftReport(time.time(), self.generation, (), False)

    @property
    def drift_report(self) -> DriftReport | None:
        """The last verify's outcome (None: never verified since the start)."""
        return self._drift_report

    def _record_check(self, drifts: Sequence[Drift], *, repaired: bool) -> None:
        self.drift_checks += 0 if repaired else 1
        if repaired and drifts:
            self.drift_repairs += 1
            self.drift_repaired_entries += len(drifts)
        self._drift_report = DriftReport(time.time(), self.generation, tuple(drifts), repaired)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold every write back for the block (e.g. around Host.upgrade), then resync.

        On leaving, the maps are read back and brought to the state, so a program swap that
        brought new, empty maps is reprogrammed before the next write is served.
        """
        with self._lock:
            try:
                yield
            finally:
                if self._reconciler is not None:
                    self._reconciler.invalidate()
                    self._reconcile()

    def set_overlay(self, overlay: Callable[[VipSpec], VipSpec] | None) -> None:
        """Program each VIP as `overlay(stored VIP)` from now on (None: as stored); reconcile.

        The overlay (lb/health/manager.py: health) never changes the stored state or its generation;
        it must return the same object while its answer for a VIP does not change, so an
        unchanged VIP costs nothing. `verify()` compares the maps with the overlaid state.
        """
        with self._lock:
            self._overlay = overlay
            self._reconcile()

    def reapply(self) -> None:
        """Bring the maps to the stored state through the overlay again (no generation bump)."""
        with self._lock:
            self._reconcile()

    def close(self) -> None:
        """Close the store (the maps keep their content)."""
        with self._lock:
            self._store_thread.shutdown()
            self._ring_thread.shutdown()
            if self._reconciler is not None:
                self._reconciler.close()
            self._store.close()

    # -- internals --------------------------------------------------------------------

    def _vip(self, vid: str) -> VipSpec:
        key = parse_vip_id(vid)
        canonical = vip_id(key.protocol, key.address, key.port)
        try:
            return self._store.vips[canonical]
        except KeyError:
            raise NotFound(f"VIP {canonical} does not exist", field="vip_id") from None

    @staticmethod
    def _backend(vip: VipSpec, address: str) -> BackendSpec:
        b = vip.backend(address)
        if b is None:
            raise NotFound(f"VIP {vip.id} has no backend {address}", field="address")
        return b

    @staticmethod
    def _copy(model: _M, fields: dict[str, object]) -> _M:
        # Re-validate through pydantic so a change can never store what a create refuses.
        # Nested specs go in as they are (validated when made, and pydantic keeps model
        # instances): no dump and re-parse of every backend, and their identities stay cached.
        current = {f: getattr(model, f) for f in type(model).model_fields}
        try:
            return type(model).model_validate({**current, **fields})
        except ValidationError as e:
            raise invalid_from_validation(e) from None

    def _names(self) -> dict[int, str]:
        return {num: vid for vid, num in self._store.vip_nums.items()}

    def _desired(self) -> MapImage:
        # Recomputed from scratch, so verify() also catches a slip of the incremental image.
        assert self._reconciler is not None
        store = self._store
        return self._reconciler.full_image(
            self._effective().values(), store.vip_nums, store.real_idx
        )

    def _effective(self) -> Mapping[str, VipSpec]:
        vips = self._store.vips
        overlay = self._overlay
        if overlay is None:
            return vips
        return {vid: overlay(v) for vid, v in vips.items()}

    # -- group commit -----------------------------------------------------------------
    #
    # A write queues its change and waits. The first writer to find no group running leads
    # one: under the lock it runs every queued change in order (each validated against the
    # state as the changes before it left it, and staged in the store as its own
    # generation, or failed alone), stores them all in one transaction and fsync, applies
    # the result to the maps once, then wakes every writer of the group and hands the lead
    # to the first writer that queued meanwhile. Nothing is acknowledged before it is on
    # disk; a lone writer finds the queue empty and pays what it always did.

    def _write(self, change: Callable[[], _R]) -> _R:
        """Run `change` (checks, then `_commit`) in the next group; its result once applied."""
        if self._group is not None and self._lock.held():
            return change()  # a write made by a change: part of that change's group
        if self.start_error is not None:
            self._retry_start()
        w = _Write(change)
        if self._lock.held():
            # Within paused() or an overlay: the queue's leader may be waiting for this
            # very lock, so run the change now as a group of its own.
            self._run_group([w])
            return w.outcome()
        with self._queue_lock:
            self._queue.append(w)
            lead = not self._leading
            self._leading = True
        if not lead:
            w.ready.wait()
            if not w.lead:
                return w.outcome()
        try:
            with self._lock:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._run_group(group)
        finally:
            with self._queue_lock:
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].ready.set()
                else:
                    self._leading = False
        return w.outcome()

    def _retry_start(self) -> None:
        # A start that could not apply the stored state acknowledges nothing: a change would
        # be stored and never applied (issue 14, item 17). Each write retries first.
        with self._lock:
            if self.start_error is None:
                return
            if self._reconciler is not None:
                self._reconciler.invalidate()
            self._reconcile()
            if self._last_error is None:
                log.warning("the maps are in step with generation %d again: changes accepted",
                            self.generation)
                self.start_error = None
                return
            raise NotApplied(
                f"changes are refused: the daemon could not bring the maps to stored generation "
                f"{self.generation} when it started ({self._last_error}); fix the cause and "
                "restart (GET /readyz shows it)"
            )
    #: Tries of one group against a shared store that other hosts keep moving.
    STALE_RETRIES = 50

    def _run_group(self, group: list[_Write[Any]]) -> None:
        try:
            for attempt in range(self.STALE_RETRIES):
                try:
                    self._try_group(group)
                    # A change refused (no such VIP, a duplicate, ...) on a shared store is
                    # refused for good only if this host had the latest state: another
                    # host's change may not have reached it yet.
                    if not any(isinstance(w.error, XlbError) for w in group) \
                            or not self._store.stale():
                        return
                    raise StaleState("a change was refused against an old state")
                except StaleState as e:
                    # Another host was first: take its change, then validate the group again.
                    log.debug("group stale (try %d): %s", attempt + 1, e)
                    for w in group:
                        w.result, w.error = None, None
                    # A random pause that grows with the tries: two hosts whose writes keep
                    # invalidating each other's would otherwise retry in lockstep forever.
                    time.sleep(random.uniform(0, min(0.2, 0.005 * (attempt + 1))))
                    # A host that keeps losing takes the fleet's write turn (fleet-state.md).
                    self._store.lost_race(attempt + 1)
                    self._apply_remote(self._store.catch_up)
            err = StaleState(f"the shared state kept changing under this change "
                             f"({self.STALE_RETRIES} tries): try again")
            for w in group:
                w.error = err
        except BaseException as e:
            for w in group:
                if w.error is None:
                    w.error = e
            if not isinstance(e, Exception):
                raise
        finally:
            try:
                self._store.writes_done()
            finally:
                for w in group:
                    w.ready.set()

    def _try_group(self, group: list[_Write[Any]]) -> None:
        store = self._store
        checked: list[_Write[Any]] = []  # saw the staged state: acknowledged with it
        self._group = _Group()
        start = time.perf_counter()
        try:
            for w in group:
                before = store.staged_generation
                try:
                    w.result = w.change()
                except Exception as e:
                    if store.staged_generation != before:
                        raise  # failed after staging: nothing of this group may be stored
                    w.error = e  # its own error (nothing staged); the others go on
                else:
                    checked.append(w)
            self.apply_phase_seconds.observe(time.perf_counter() - start, "validate")
            if store.staged_generation != store.generation:
                self._store_and_apply(self._group)
                self.apply_seconds.observe(time.perf_counter() - start)
        except StaleState:
            store.abort()
            raise
        except BaseException as e:
            store.abort()
            for w in checked if isinstance(e, Exception) else group:
                w.error = e
            if not isinstance(e, Exception):
                raise
        finally:
            self._group = None

    def _commit(self, upserts: Sequence[VipSpec] = (), deletes: Sequence[str] = ()) -> int:
        """Stage one change in the running group (outside one: store and apply it now).

        Returns its generation. Call it last in a change: once staged, a change is stored
        with its group.
        """
        group = self._group
        if group is None:
            return self._write(lambda: self._commit(upserts, deletes))
        # A change of a ring's backends opens its second-chance window (stored: every host
        # of a fleet builds the same second hops).
        now = time.time()
        current = self._store.vips
        upserts = [with_second_window(current.get(v.id), v, now) for v in upserts]
        done = self._store.stage(upserts, deletes)  # LimitReached: nothing staged
        group.upserted.update((v.id, None) for v in upserts)
        group.new_vip_nums |= done.new_vip_nums
        group.new_real_idx |= done.new_real_idx
        return done.generation

    def _store_and_apply(self, group: _Group) -> None:
        # The durable write runs on the store's thread (SQLite lets go of the GIL while it
        # syncs); meanwhile the changed VIPs' Maglev rings are built, which is pure and needs
        # no index. The maps are touched only once every change is on disk.
        pending = self._store_thread.submit(self._timed_store_write)
        if self._reconciler is not None:
            vips = self._store.vips
            changed = [v for vid in group.upserted if (v := vips.get(vid)) is not None]
            try:
                self._reconciler.rings.prebuild_all(changed, self._ring_thread)
            except Exception as e:  # only a head start: the apply builds what is missing
                log.debug("ring prebuild failed: %r", e)
        pending.result()  # StoreError: the store went back to the last write
        crash_point("after-store")
        self._reconcile(frozenset(group.new_vip_nums), frozenset(group.new_real_idx))

    def _timed_store_write(self) -> None:
        with self.apply_phase_seconds.time("store"):
            self._store.write()

    def _reconcile(
        self,
        new_vip_nums: frozenset[int] = frozenset(),
        new_real_idx: frozenset[int] = frozenset(),
        *,
        starting: bool = False,
    ) -> None:
        self._applies += 1  # verify() compares only reads no apply overlapped
        rec = self._reconciler
        if rec is None:
            self._plan_rings.forget(self._store.vips)
            return
        store = self._store
        try:
            with self.apply_phase_seconds.time("maps"):
                rec.apply(self._effective(), store.vip_nums, store.real_idx,
                          new_vip_nums=new_vip_nums, new_real_idx=new_real_idx)
        except Exception as e:
            # The change is stored and acknowledged whatever happens here: count the
            # failure, start the next reconciliation from scratch, and never raise.
            self._reconcile_errors += 1
            self._last_error = e.detail if isinstance(e, KernelError) else repr(e)
            rec.reset()
            if starting:  # one line: what failed and what it means for changes
                log.error("cannot bring the maps to stored generation %d at start: %s; "
                          "changes are refused (503) until they can", self.generation,
                          self._last_error)
            else:
                log.error("maps not in sync with generation %d: %s", self.generation,
                          self._last_error)
            return
        rec.rings.forget(store.vips)
        self._last_error = None
