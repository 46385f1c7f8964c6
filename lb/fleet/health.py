"""Backend health the fleet agrees on, so every host builds the same rings.

Each host probes its VIPs' backends (lb/health/manager.py) and publishes its opinion under
`<prefix>health/<host>`: one key, attached to a lease of `lease_ttl_s` that the host keeps
alive, so the opinion of a host that stops or loses etcd expires with its lease. Every host
watches `<prefix>health/` and takes, for each VIP and backend, the agreed view:

    down  iff  more than half of the live hosts that probe it see it down

(a tie is up). The agreed "down since" is the earliest of those hosts' times, so the safety
floor (`max_down_fraction`, lb/health/policy.py) picks the same backends to hold on every
host. One host whose probes fail for a backend that the others reach does not move that
backend out of its own ring: every ring stays identical. Slow start is not applied to an
agreed view (its weights follow each host's clock and would differ between hosts).

While this host cannot reach etcd for longer than a lease, the others' opinions may be gone
without it seeing: it falls back to its own probes until etcd answers again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from lb.config import EtcdConfig
from lb.errors import XlbError
from lb.fleet.etcd import Change, Etcd, LeasedKey

log = logging.getLogger(__name__)

#: One host's opinion: VIP id -> backend -> down since (wall-clock seconds), None when up.
Opinion = dict[str, dict[str, float | None]]


class FleetHealth:
    """Publishes this host's probe results and computes the fleet's agreed view."""

    def __init__(self, etcd: Etcd, cfg: EtcdConfig) -> None:
        self.etcd = etcd
        self.me = cfg.host_name
        self.ttl = cfg.lease_ttl_s
        self.root = (cfg.prefix + "health/").encode()
        self._lock = threading.Lock()
        self._views: dict[str, Opinion] = {}  # host -> its published opinion
        self._mine: Opinion = {}
        self._revision = 0
        self._last_ok = time.monotonic()  # the watch or the publisher last heard from etcd
        self._listeners: list[Callable[[], None]] = []
        self._key = LeasedKey(etcd, self.root + self.me.encode(), self.ttl, "xlb-fleet-health")
        self._key.set(b"{}")

    # -- the agreed view --------------------------------------------------------------

    def hosts(self) -> list[str]:
        """Hosts whose opinion is live (their lease holds), sorted."""
        with self._lock:
            return sorted(self._views)

    def agreed(self, vip_id: str, backend: str, local: float | None) -> float | None:
        """Agreed "down since" of a VIP's backend (None: up); `local` is this host's own."""
        with self._lock:
            if self._cut_off():
                return local
            seen = [v[vip_id][backend] for v in self._views.values()
                    if backend in v.get(vip_id, {})]
        if not seen:
            return local  # no host published an opinion yet (e.g. just configured)
        down = [s for s in seen if s is not None]
        if 2 * len(down) > len(seen):
            return min(down)
        return None

    def opinions(self) -> dict[str, Opinion]:
        """Every live host's published opinion (for fleet status)."""
        with self._lock:
            return {h: {v: dict(b) for v, b in o.items()} for h, o in self._views.items()}

    def _cut_off(self) -> bool:
        last = max(self._last_ok, self._key.last_ok or 0.0)
        return time.monotonic() - last > self.ttl

    # -- publishing -------------------------------------------------------------------

    def publish(self, opinion: Opinion) -> None:
        """This host's opinion from now on (sent by the publisher thread; never blocks)."""
        with self._lock:
            self._mine = opinion
        self._key.set(json.dumps(opinion, sort_keys=True).encode())

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from another thread) whenever the agreed view may have changed."""
        self._listeners.append(listener)

    def start(self) -> None:
        """Read the published opinions, watch them, and start publishing this host's."""
        try:
            self._read_all()
        except XlbError as e:
            log.warning("fleet health: %s (own probes only until etcd answers)", e.detail)
        self.etcd.follow(self.root, lambda: self._revision, self._changed, self._compacted)
        self._key.start()

    def _read_all(self) -> int:
        rev, kvs = self.etcd.get_prefix(self.root)
        views = {}
        for kv in kvs:
            host = kv.key[len(self.root):].decode()
            views[host] = _parse(kv.value)
        with self._lock:
            self._views = views
            self._revision = rev
            self._last_ok = time.monotonic()
        self._notify()
        return rev

    def _compacted(self, _revision: int) -> int:
        return self._read_all()

    def _changed(self, changes: list[Change]) -> None:
        with self._lock:
            for c in changes:
                host = c.key[len(self.root):].decode()
                if c.value is None:
                    self._views.pop(host, None)
                else:
                    self._views[host] = _parse(c.value)
                self._revision = max(self._revision, c.revision)
            self._last_ok = time.monotonic()
        self._notify()

    def _notify(self) -> None:
        for f in self._listeners:
            try:
                f()
            except Exception as e:  # a listener must not stop the watch
                log.error("fleet health listener failed: %r", e)

    def close(self) -> None:
        """Stop publishing (the key is deleted, or expires with its lease)."""
        self._key.close()


def _parse(value: bytes) -> Opinion:
    try:
        raw = json.loads(value)
        return {str(v): {str(b): (None if s is None else float(s)) for b, s in bs.items()}
                for v, bs in raw.items()}
    except (ValueError, AttributeError, TypeError):
        return {}
