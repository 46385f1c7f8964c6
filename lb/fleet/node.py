"""One LB host as a member of the fleet: the shared store, agreed health and fleet status.

`FleetNode` is what the daemon composes when `store = "etcd"`: one etcd client for all
three, the store factory for `ControlPlane(store=...)`, the health view for
`HealthManager(view=...)`, and this host's entry under `<prefix>hosts/<name>` (leased),
which `status()` reads back for every host to answer `GET /v1/fleet`.

A host's entry: its applied state revision and generation, whether its maps are in step,
and one fingerprint per VIP (SHA-256 of the ring slots the maps carry, health applied).
Hosts at the latest generation whose fingerprints for a VIP differ are named as divergent;
hosts behind are named as lagging, with their lag in generations and revisions.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lb.config import EtcdConfig
from lb.control.facade import ControlPlane
from lb.control.model import Limits
from lb.errors import XlbError
from lb.fleet.etcd import Etcd, LeasedKey
from lb.fleet.health import FleetHealth
from lb.fleet.state import EtcdStore

#: How often a host re-reads its own status to publish it when it changed.
STATUS_PERIOD_S = 0.1


class FleetNode:
    """This host's part in the fleet (one etcd client for store, health and status)."""

    def __init__(self, state_dir: Path, cfg: EtcdConfig, etcd: Etcd | None = None) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.etcd = etcd or Etcd(cfg)
        self.health = FleetHealth(self.etcd, cfg)
        self.store: EtcdStore | None = None
        self.control: ControlPlane | None = None
        self.hosts_root = (cfg.prefix + "hosts/").encode()
        self._key = LeasedKey(self.etcd, self.hosts_root + cfg.host_name.encode(),
                              cfg.lease_ttl_s, "xlb-fleet-status")
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        #: This host's BGP summary (lb.fleet.announce.Announcer.summary) when bgp.enabled.
        self.bgp: Callable[[], dict[str, Any] | None] = lambda: None

    def store_factory(self, limits: Limits) -> EtcdStore:
        """For ControlPlane(store=...): the etcd store on this node's client."""
        self.store = EtcdStore(self.state_dir, limits, self.cfg, self.etcd)
        return self.store

    def start(self, control: ControlPlane) -> None:
        """Start publishing health opinions and this host's status."""
        self.control = control
        self.health.start()
        self._key.set(json.dumps(self.own(), sort_keys=True).encode())
        self._key.start()
        self._thread = threading.Thread(target=self._publish_loop, name="xlb-fleet-node",
                                        daemon=True)
        self._thread.start()

    def own(self) -> dict[str, Any]:
        """This host's status entry."""
        assert self.control is not None and self.store is not None
        c, s = self.control, self.store
        generation, in_sync, fingerprints = c.fleet_view()
        return {
            "host": self.cfg.host_name,
            "revision": s.revision,
            "state_revision": s.guard_revision,
            "generation": generation,
            "in_sync": in_sync,
            "write_turns": s.turns_taken,
            "fingerprints": fingerprints,
            "bgp": self.bgp(),
        }

    def _publish_loop(self) -> None:
        while not self._closed.wait(STATUS_PERIOD_S):
            try:
                self._key.set(json.dumps(self.own(), sort_keys=True).encode())
            except Exception:  # a failed read must not stop publishing
                continue

    def status(self) -> dict[str, Any]:
        """Every live host's entry, the latest state, lags and divergences."""
        assert self.store is not None
        _rev, kvs = self.etcd.get_prefix(self.hosts_root)
        latest_rev = self.etcd.mod_revision(self.store.guard)
        hosts = []
        for kv in kvs:
            try:
                hosts.append(json.loads(kv.value))
            except ValueError:
                continue
        hosts.sort(key=lambda h: str(h.get("host")))
        latest_gen = max([int(h.get("generation", 0)) for h in hosts] + [0])
        for h in hosts:
            h["lag"] = {
                "generations": max(0, latest_gen - int(h.get("generation", 0))),
                "revisions": max(0, latest_rev - int(h.get("state_revision", 0))),
            }
        current = [h for h in hosts if h["lag"]["generations"] == 0]
        divergent = []
        vids = sorted({v for h in current for v in h.get("fingerprints", {})})
        for vid in vids:
            by: dict[str, list[str]] = {}
            for h in current:
                fp = h.get("fingerprints", {}).get(vid, "missing")
                by.setdefault(fp, []).append(str(h["host"]))
            if len(by) > 1:
                divergent.append({"vip_id": vid, "hosts_by_fingerprint": by})
        return {
            "store": self.etcd.describe(),
            "this_host": self.cfg.host_name,
            "state_revision": latest_rev,
            "generation": latest_gen,
            "hosts": hosts,
            "lagging": [str(h["host"]) for h in hosts if h["lag"]["generations"] > 0],
            "divergent": divergent,
            "health_hosts": self.health.hosts(),
            "read_at": time.time(),
        }

    def close(self) -> None:
        """Stop publishing and close the etcd client (the store closes with the control
        plane, before this)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(5)
        for stop in (self._key.close, self.health.close):
            with contextlib.suppress(XlbError):
                stop()
        self.etcd.close()
