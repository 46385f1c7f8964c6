"""The daemon's health checker: probes every VIP-backend pair and steers the rings.

`HealthManager.run()` is one asyncio task of the daemon. It reads the desired state every
`sync_interval` seconds and keeps one probe task per VIP-backend pair of every VIP that has
a `health_check` (backends that are not disabled). Each result goes through the pair's
`lb.health.policy.Target`; a status change wakes the applier, which calls `ControlPlane.reapply()`
in a worker thread. The control plane then asks `overlay()` for each VIP: the stored VIP
with the backends health takes out programmed as draining (out of the ring, tracked flows
go on) and slow-start weights, within the safety floor (`lb.health.policy.decide`).

Generation semantics: health never writes the store and never bumps the generation; the
desired state keeps saying "active", the API shows health next to it (`/v1/health`).

Restarts: the pairs that are down (or held down by flap damping) and each VIP's set of
backends taken out are written to `health.json` in the state directory (atomically, 0600)
before every ring change they cause. The next start reads it back: the control plane's first
reconciliation already programs those backends as draining (`restored_overlay`), and their
pairs start "down", so a backend that was out stays out until its probes bring it back
(`rise` good probes). Pairs the file does not name start "up", so a restart never takes a
healthy pool out.

Shutting down stops the probes but leaves the maps as they are.

Tunnel mode: the tc program that encapsulates probes is loaded on first use, in a task of
its own so that the compile never holds up the sync of other pairs (or the replacement of a
VIP's old pairs). While it loads, tunnelled pairs are "pending": not probed, their health
unchanged. A failed load is retried with a growing delay (`TUNNEL_RETRY_MAX_S` at most);
until one succeeds the pairs cannot be probed and say why, and `snapshot()["tunnel"]` shows
the state, the error and the attempts (never a silent fall back to direct probes).

With a fleet `view` (lb/fleet/health.py), each pair's result is published to the fleet and
the overlay follows the view the hosts agree on instead of this host's own probes, so
every host's ring is the same; slow start is then not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from lb.control.model import VipSpec
from lb.health.policy import HealthCheck, Member, Target, VipDecision, decide
from lb.health.probe import ProbeResult, probe
from lb.timing import PROBE_BUCKETS, Histogram

if TYPE_CHECKING:
    from lb.control.facade import ControlPlane

log = logging.getLogger("xlb.health")

#: Recent transitions kept for the API.
EVENTS_KEPT = 200
#: The file in the state directory that carries health across restarts.
HEALTH_FILE = "health.json"
HEALTH_FILE_VERSION = 1
#: How a backend of a checked VIP meets traffic: in the ring; out of the ring with its
#: tracked flows going on (drained by the desired state, weight 0, or taken out by health).
RingRole = Literal["serving", "draining"]
#: Longest wait between two attempts to load the tunnel program (the first waits
#: `tunnel_retry_s`, each next one twice as long).
TUNNEL_RETRY_MAX_S = 60.0
#: What a tunnelled pair says while the tunnel program loads.
TUNNEL_LOADING = "tunnel mode: the tunnel program is loading; not probed yet"


class Tunnel(Protocol):
    """What the tunnelled mode needs: a socket mark that steers probes to one backend."""

    def mark(self, index: int, address: str, gue: bool) -> int:
        """The SO_MARK for probes to `address` (backend index `index`), programmed."""
        ...

    def release(self, mark: int) -> None:
        """Forget a mark no probe uses any more."""
        ...


class HealthView(Protocol):
    """Health the fleet agrees on (lb/fleet/health.py): publish our probes, read the view."""

    def publish(self, opinion: dict[str, dict[str, float | None]]) -> None:
        """This host's results: VIP id -> backend -> down since (wall clock), None = up."""
        ...

    def agreed(self, vip_id: str, backend: str, local: float | None) -> float | None:
        """The agreed "down since" of a backend (None: up)."""
        ...

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` from any thread when the agreed view may have changed."""
        ...


@dataclass
class _Pair:
    vip_id: str
    backend: str
    check: HealthCheck
    address: str
    port: int
    mark: int | None
    target: Target
    #: Why the pair cannot be probed (e.g. tunnel mode without a tunnel), or None.
    unusable: str | None = None
    #: Why the pair is not probed yet (its tunnel loads): no probe, no result, or None.
    pending: str | None = None
    task: asyncio.Task[None] | None = None
    ramp_seen: float | None = None
    #: In the ring by the desired state (active, weight > 0), as last synced.
    desired_in_ring: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.vip_id, self.backend)

    def same_setup(self, other: _Pair) -> bool:
        return (self.check, self.address, self.port, self.mark, self.unusable,
                self.pending) == (other.check, other.address, other.port, other.mark,
                                  other.unusable, other.pending)


@dataclass(frozen=True)
class Event:
    """One health transition, as the API lists it."""

    time: float
    vip_id: str
    backend: str | None
    kind: str
    detail: str


@dataclass
class _VipState:
    decision: VipDecision = field(default_factory=VipDecision)
    floor_events: Counter[str] = field(default_factory=Counter)
    effective: tuple[VipSpec, tuple[Any, ...], VipSpec] | None = None


@dataclass(frozen=True)
class SavedHealth:
    """What `health.json` carries: the pairs not up, and each VIP's backends taken out."""

    #: (VIP id, backend) -> {"status", "suppressed", "penalty"}.
    pairs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    out: dict[str, frozenset[str]] = field(default_factory=dict)


def load_health(path: Path) -> SavedHealth:
    """Read `health.json` (an absent or unreadable file: nothing saved, logged)."""
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != HEALTH_FILE_VERSION:
            raise ValueError(f"version {raw.get('version')!r}, not {HEALTH_FILE_VERSION}")
        pairs = {(str(p["vip_id"]), str(p["backend"])): {
            "status": "down" if p["status"] == "down" else "up",
            "suppressed": bool(p.get("suppressed", False)),
            "penalty": float(p.get("penalty", 0.0)),
        } for p in raw.get("pairs", [])}  # fmt: skip
        out = {str(v): frozenset(str(b) for b in bs) for v, bs in raw.get("out", {}).items()}
    except FileNotFoundError:
        return SavedHealth()
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("%s unreadable (%s): every backend starts up", path, e)
        return SavedHealth()
    return SavedHealth(pairs, out)


def save_health(path: Path, saved: SavedHealth) -> None:
    """Write `health.json` atomically (a temporary file fsynced, then renamed), mode 0600."""
    body = {
        "version": HEALTH_FILE_VERSION,
        "pairs": [{"vip_id": v, "backend": b, **rec}
                  for (v, b), rec in sorted(saved.pairs.items())],
        "out": {v: sorted(bs) for v, bs in sorted(saved.out.items()) if bs},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(body, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class _Restored:
    """The overlay of a start before the checker runs: the saved out sets, as draining."""

    def __init__(self, out: dict[str, frozenset[str]]) -> None:
        self._out = out
        self._cache: dict[str, tuple[VipSpec, VipSpec]] = {}

    def __call__(self, spec: VipSpec) -> VipSpec:
        out = self._out.get(spec.id)
        if spec.health_check is None or not out:
            return spec
        hit = self._cache.get(spec.id)
        if hit is not None and hit[0] is spec:
            return hit[1]
        backends = [b.model_copy(update={"state": "draining"})
                    if b.identity in out and b.state == "active" else b
                    for b in spec.backends]  # fmt: skip
        eff = spec.model_copy(update={"backends": backends})
        self._cache[spec.id] = (spec, eff)
        return eff


def restored_overlay(path: Path) -> Callable[[VipSpec], VipSpec] | None:
    """The overlay for the control plane's first reconciliation after a restart: the
    backends health had taken out stay out until the checker decides (None: none were)."""
    saved = load_health(path)
    return _Restored(saved.out) if any(saved.out.values()) else None


class HealthManager:
    """Probes VIP-backend pairs and applies their health to the rings as an overlay."""

    def __init__(
        self,
        control: ControlPlane,
        *,
        tunnel: Callable[[], Tunnel] | None = None,
        sync_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        state_file: Path | None = None,
        view: HealthView | None = None,
        tunnel_retry_s: float = 2.0,
    ) -> None:
        self.control = control
        #: Where health survives a restart (None: in memory only).
        self.state_file = state_file
        self._saved = load_health(state_file) if state_file is not None else SavedHealth()
        self._last_saved: SavedHealth | None = None
        self.view = view
        self._loop: asyncio.AbstractEventLoop | None = None
        if view is not None:
            view.on_change(self._view_changed)
        self._tunnel_source = tunnel
        self._tunnel: Tunnel | None = None
        self._tunnel_error: str | None = None
        self._tunnel_loader: asyncio.Task[None] | None = None
        #: Failed loads of the tunnel program since the last success, and when to retry.
        self._tunnel_attempts = 0
        self._tunnel_retry_at = 0.0
        self.tunnel_retry_s = tunnel_retry_s
        self.sync_interval = sync_interval
        self.clock = clock
        self._lock = threading.Lock()
        self._pairs: dict[tuple[str, str], _Pair] = {}
        self._vips: dict[str, _VipState] = {}
        self._wake: asyncio.Event | None = None
        self.events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        #: Transitions by kind ("down", "up", "floor_held", "all_down"), for /metrics.
        self.totals: Counter[str] = Counter()
        self.reapplies = 0
        self.started = False
        #: Round trip of each probe run, by check type and result ("ok", "failed"), /metrics.
        self.probe_seconds = Histogram(PROBE_BUCKETS, ("type", "result"))

    # -- the overlay (called by the control plane, under its lock, in any thread) ---------

    def overlay(self, spec: VipSpec) -> VipSpec:
        """The VIP as the maps should carry it, given its backends' health."""
        check = spec.health_check
        if check is None:
            return spec
        with self._lock:
            now = self.clock()
            members = []
            view = self.view
            for b in spec.backends:
                pair = self._pairs.get((spec.id, b.identity))
                t = pair.target if pair is not None else None
                if view is not None:
                    local = t.changed_at if t is not None and t.wants_out else None
                    members.append(Member(b.identity, b.weight, b.in_ring,
                                          view.agreed(spec.id, b.identity, local), None))
                    continue
                members.append(Member(
                    b.identity,
                    b.weight,
                    b.in_ring,
                    t.changed_at if t is not None and t.wants_out else None,
                    t.ramp(now) if t is not None else None,
                ))
            vs = self._vips.setdefault(spec.id, _VipState())
            d = decide(members, check.max_down_fraction, vs.decision)
            self._note_floor(spec.id, vs, d)
            vs.decision = d
            if not d.changes_ring:
                vs.effective = None
                return spec
            sig = (d.out, d.weights)
            if vs.effective is not None and vs.effective[0] is spec and vs.effective[1] == sig:
                return vs.effective[2]
            weights = dict(d.weights)
            backends = []
            for b in spec.backends:
                if b.identity in d.out:
                    b = b.model_copy(update={"state": "draining"})
                elif b.identity in weights:
                    b = b.model_copy(update={"weight": weights[b.identity]})
                backends.append(b)
            eff = spec.model_copy(update={"backends": backends})
            vs.effective = (spec, sig, eff)
            return eff

    def _note_floor(self, vip_id: str, vs: _VipState, d: VipDecision) -> None:
        before = vs.decision
        for who in sorted(d.held - before.held):
            self._event(vip_id, who, "floor_held",
                        "down, but kept in the ring: the safety floor allows no more out")
            vs.floor_events["floor_held"] += 1
        if d.all_down and not before.all_down:
            self._event(vip_id, None, "all_down",
                        "every backend fails its check: the last healthy set stays")
            vs.floor_events["all_down"] += 1
        elif before.all_down and not d.all_down:
            self._event(vip_id, None, "all_down_cleared", "a backend answers again")

    def _event(self, vip_id: str, backend: str | None, kind: str, detail: str) -> None:
        self.events.append(Event(time.time(), vip_id, backend, kind, detail))
        self.totals[kind] += 1
        level = logging.INFO if kind in ("up", "all_down_cleared") else logging.WARNING
        log.log(level, "health %s %s%s: %s", kind, vip_id,
                f" backend {backend}" if backend else "", detail)

    # -- reads for the API ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every checked VIP with its decision and its pairs' health (plain data)."""
        now = self.clock()
        with self._lock:
            vips: dict[str, Any] = {}
            for (vid, addr), p in sorted(self._pairs.items()):
                vs = self._vips.get(vid) or _VipState()
                v = vips.setdefault(vid, {
                    "vip_id": vid,
                    "check": p.check,
                    "all_down": vs.decision.all_down,
                    "out": sorted(vs.decision.out),
                    "held": sorted(vs.decision.held),
                    "floor_events": dict(vs.floor_events),
                    "backends": [],
                })
                t = p.target
                serving = p.desired_in_ring and addr not in vs.decision.out
                v["backends"].append({
                    "address": addr,
                    "status": t.status,
                    "in_ring": addr not in vs.decision.out,
                    "ring": "serving" if serving else "draining",
                    "held_by_floor": addr in vs.decision.held,
                    "suppressed": t.suppressed,
                    "penalty": round(t.penalty_now(now), 3),
                    "ramp": t.ramp(now),
                    "successes": t.successes,
                    "failures": t.failures,
                    "probes": t.probes,
                    "last_ok": t.last_ok,
                    "last_error": p.unusable or p.pending or t.last_error,
                    "last_probe_age_s": None if t.last_probe_at is None
                    else round(now - t.last_probe_at, 3),
                    "latency_s": None if t.last_latency_s is None
                    else round(t.last_latency_s, 6),
                    "since_s": round(now - t.changed_at, 3),
                    "transitions": {"up": t.transitions["up"], "down": t.transitions["down"]},
                    "probe_address": p.address,
                    "probe_port": p.port,
                    "mark": p.mark,
                })
            return {"vips": list(vips.values()), "events": list(self.events),
                    "totals": dict(self.totals), "tunnel": self._tunnel_status(now)}

    def _tunnel_status(self, now: float) -> dict[str, Any]:
        if self._tunnel is not None:
            state = "ready"
        elif self._tunnel_loader is not None and not self._tunnel_loader.done():
            state = "loading"
        elif self._tunnel_error is not None:
            state = "failed"
        elif self._tunnel_source is None:
            state = "unavailable"
        else:
            state = "unused"
        retry = None
        if state == "failed":
            retry = round(max(0.0, self._tunnel_retry_at - now), 3)
        return {"state": state, "error": self._tunnel_error,
                "failed_attempts": self._tunnel_attempts, "retry_in_s": retry}

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Probe until cancelled (the maps are left as they are on the way out)."""
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        # The saved health is in the pairs before the overlay first programs the rings.
        with contextlib.suppress(Exception):  # the loop below retries a bad read
            self._sync(*await asyncio.to_thread(self._read_state))
        await asyncio.to_thread(self.control.set_overlay, self.overlay)
        self.started = True
        applier = asyncio.create_task(self._applier(), name="xlb-health-apply")
        try:
            while True:
                try:
                    vips, indices = await asyncio.to_thread(self._read_state)
                    self._start_tunnel(vips)
                    self._sync(vips, indices)
                    self._tick()
                except Exception as e:  # the checker must outlive a bad read
                    log.warning("health sync failed: %r", e)
                await asyncio.sleep(self.sync_interval)
        finally:
            applier.cancel()
            tasks = [p.task for p in self._pairs.values() if p.task is not None]
            for t in tasks:
                t.cancel()
            for t in [applier, *tasks]:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if self._tunnel_loader is not None:
                # A compile in a worker thread cannot be cancelled: let it finish, so what
                # it attached is released by the daemon's exit stack, not left behind.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._tunnel_loader)

    async def _applier(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await asyncio.to_thread(self._apply)
                self.reapplies += 1
            except Exception as e:
                log.error("applying health to the maps failed: %r", e)

    def _apply(self) -> None:
        # Saved before the maps change: a crash in between restarts with the new health.
        self._save()
        self.control.reapply()
        # Without a data plane the control plane never asks for the overlay: decide here
        # too, so the API shows the same health either way (deciding twice is idempotent).
        for v in self.control.list_vips():
            self.overlay(v)

    def _current(self) -> SavedHealth:
        with self._lock:
            pairs = {k: {"status": p.target.status, "suppressed": p.target.suppressed,
                         "penalty": round(p.target.penalty_now(self.clock()), 3)}
                     for k, p in self._pairs.items()
                     if p.target.status == "down" or p.target.suppressed}  # fmt: skip
            out = {vid: vs.decision.out for vid, vs in self._vips.items() if vs.decision.out}
        return SavedHealth(pairs, out)

    def _save(self) -> None:
        if self.state_file is None:
            return
        now = self._current()
        # Rounded penalties change with time alone: only status and out sets force a write.
        key = SavedHealth({k: {**r, "penalty": 0} for k, r in now.pairs.items()}, now.out)
        if key == self._last_saved:
            return
        try:
            save_health(self.state_file, now)
        except OSError as e:
            log.error("saving health to %s failed: %s", self.state_file, e)
            return
        self._last_saved = key

    def _wake_applier(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _view_changed(self) -> None:
        # From the fleet view's thread: hand the wake-up to the event loop.
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    def opinion(self) -> dict[str, dict[str, float | None]]:
        """This host's own probe results as the fleet view publishes them."""
        now, wall = self.clock(), time.time()
        out: dict[str, dict[str, float | None]] = {}
        with self._lock:
            for (vid, addr), p in self._pairs.items():
                t = p.target
                out.setdefault(vid, {})[addr] = (
                    round(wall - (now - t.changed_at), 3) if t.wants_out else None)
        return out

    def _publish(self) -> None:
        if self.view is not None:
            self.view.publish(self.opinion())

    def _start_tunnel(self, vips: list[VipSpec]) -> None:
        # Loaded on first use (the tc program costs a BCC compile that most daemons never
        # need), in a task of its own: the sync goes on meanwhile. A failure is retried.
        if self._tunnel is not None or self._tunnel_source is None:
            return
        if self._tunnel_loader is not None and not self._tunnel_loader.done():
            return
        if not any(v.health_check and v.health_check.mode == "tunnel" for v in vips):
            return
        if self._tunnel_error is not None and self.clock() < self._tunnel_retry_at:
            return
        self._tunnel_loader = asyncio.create_task(asyncio.to_thread(self._load_tunnel),
                                                  name="xlb-health-tunnel")

    def _load_tunnel(self) -> None:
        assert self._tunnel_source is not None
        try:
            tunnel = self._tunnel_source()
        except Exception as e:
            self._tunnel_attempts += 1
            delay = min(TUNNEL_RETRY_MAX_S, self.tunnel_retry_s * 2 ** (self._tunnel_attempts - 1))
            self._tunnel_retry_at = self.clock() + delay
            self._tunnel_error = f"tunnel mode unavailable: {e}"
            log.error("%s (attempt %d; retried in %.0f s)", self._tunnel_error,
                      self._tunnel_attempts, delay)
            return
        if self._tunnel_error is not None:
            log.warning("tunnel mode available after %d failed attempts", self._tunnel_attempts)
        self._tunnel, self._tunnel_error, self._tunnel_attempts = tunnel, None, 0

    def _read_state(self) -> tuple[list[VipSpec], dict[str, int]]:
        # Runs in a worker thread: it takes the control plane's lock, which the event loop
        # should not wait for.
        vips = self.control.list_vips()
        tunnelled = [v for v in vips if v.health_check and v.health_check.mode == "tunnel"]
        indices: dict[str, int] = {}
        if tunnelled and self._tunnel is not None:
            for v in tunnelled:
                for b in v.backends:
                    with contextlib.suppress(Exception):
                        indices[b.identity] = self.control.backend_index(b.identity)
        return vips, indices

    def _plan(
        self, vip: VipSpec, check: HealthCheck, address: str, indices: dict[str, int]
    ) -> _Pair:
        port = check.port or vip.port
        if check.mode == "direct":
            return _Pair(vip.id, address, check, address, port, None, Target(check))
        tunnel = self._tunnel
        index = indices.get(address)
        if tunnel is None and self._tunnel_source is not None and self._tunnel_error is None:
            return _Pair(vip.id, address, check, str(vip.address), port, None, Target(check),
                         pending=TUNNEL_LOADING)
        if tunnel is None or index is None:
            why = self._tunnel_error or "tunnel mode unavailable: no interface to encapsulate on"
            return _Pair(vip.id, address, check, str(vip.address), port, None, Target(check),
                         unusable=why)
        mark = tunnel.mark(index, address, vip.encap == "gue")
        return _Pair(vip.id, address, check, str(vip.address), port, mark, Target(check))

    def _sync(self, vips: list[VipSpec], indices: dict[str, int]) -> None:
        want: dict[tuple[str, str], _Pair] = {}
        for v in vips:
            check = v.health_check
            if check is None:
                continue
            for b in v.backends:
                if b.state != "disabled":
                    pair = self._plan(v, check, b.identity, indices)
                    pair.desired_in_ring = b.in_ring
                    want[(v.id, b.identity)] = pair
        changed = False
        with self._lock:
            for key in [k for k in self._pairs if k not in want]:
                self._drop(self._pairs.pop(key))
                changed = True
            for key, new in want.items():
                old = self._pairs.get(key)
                if old is not None and old.same_setup(new):
                    old.desired_in_ring = new.desired_in_ring
                    continue
                if old is not None:
                    self._drop(old)
                new.target.changed_at = self.clock()
                self._restore(key, new)
                self._pairs[key] = new
                new.task = asyncio.create_task(self._probe_loop(new),
                                               name=f"xlb-health {key[0]} {key[1]}")
                changed = True
            live = {k[0] for k in self._pairs}
            for vid in [v for v in self._vips if v not in live]:
                del self._vips[vid]
            # What the last run saved applies to the first pairs of this run only.
            self._saved = SavedHealth()
        if changed:
            self._publish()
            self._wake_applier()

    def _restore(self, key: tuple[str, str], pair: _Pair) -> None:
        """Give a new pair the health the last run saved for it (none: it starts up)."""
        rec = self._saved.pairs.get(key)
        if rec is not None:
            t, now = pair.target, self.clock()
            t.status = rec["status"]
            t.suppressed = rec["suppressed"]
            t.penalty, t.penalty_at = rec["penalty"], now
            if t.status == "down":
                t.failures = pair.check.fall
                t.last_ok = False
                t.last_error = "down before the restart; waiting for probes"
        out = self._saved.out.get(key[0])
        if out:
            vs = self._vips.setdefault(key[0], _VipState())
            if not vs.decision.out:
                vs.decision = VipDecision(out=out)

    def _drop(self, pair: _Pair) -> None:
        if pair.task is not None:
            pair.task.cancel()
        if pair.mark is not None and self._tunnel is not None:
            still = any(p.mark == pair.mark for p in self._pairs.values() if p is not pair)
            if not still:
                with contextlib.suppress(Exception):
                    self._tunnel.release(pair.mark)

    def _tick(self) -> None:
        # Slow-start steps and damping release happen with time, not with a probe result.
        now = self.clock()
        wake = False
        with self._lock:
            for p in self._pairs.values():
                r = p.target.ramp(now)
                if r != p.ramp_seen:
                    p.ramp_seen = r
                    wake = True
        if wake:
            self._wake_applier()

    async def _probe_loop(self, pair: _Pair) -> None:
        check = pair.check
        # A random phase spreads the pairs' probes over the interval.
        await asyncio.sleep(random.uniform(0, check.interval_s * max(check.jitter, 0.05)))
        while True:
            start = self.clock()
            if pair.pending is not None:
                # Replaced by a pair with a mark once the tunnel is there: nothing to judge.
                await asyncio.sleep(check.interval_s)
                continue
            if pair.unusable is not None:
                result = ProbeResult(False, pair.unusable)
            else:
                result = await probe(check, pair.address, pair.port, mark=pair.mark)
                self.probe_seconds.observe(
                    result.latency_s, check.type, "ok" if result.ok else "failed"
                )
            self._record(pair, result)
            delay = check.interval_s * (1 + random.uniform(-check.jitter, check.jitter))
            await asyncio.sleep(max(0.0, start + delay - self.clock()))

    def _record(self, pair: _Pair, result: ProbeResult) -> None:
        with self._lock:
            if self._pairs.get(pair.key) is not pair:
                return  # replaced or removed meanwhile
            change = pair.target.record(
                result.ok, self.clock(), error=result.error, latency_s=result.latency_s
            )
            if change is None:
                return
            t = pair.target
            if change == "down":
                detail = f"{t.failures} failed probes in a row (last: {result.error})"
                if t.suppressed:
                    detail += f"; flapping (penalty {t.penalty:.2f}): held down until it decays"
            else:
                detail = f"{t.successes} good probes in a row"
                if t.up_since is not None:
                    detail += f"; weight ramps up over {pair.check.slow_start_s:g} s"
            self._event(pair.vip_id, pair.backend, change, detail)
        self._publish()
        self._wake_applier()
