"""What this LB host announces, and when: the daemon's side of the BGP speaker.

The rule (`Announcer.desired`): every address that carries at least one VIP, as a /32 or /128,
when the data plane is attached, the stored state reached the maps, and the operator has not
drained the host; nothing otherwise. The daemon calls `sync()` every `bgp.sync_interval_s` (and
right after a change), so a VIP added or deleted, a detach behind the daemon's back or a drain
shows on the router within that interval.

The drain flag is a file under `<state_dir>/bgp/` (written with fsync): a drained host stays
drained across daemon restarts and reboots until `undrain`. Stopping the daemon withdraws
nothing (the speaker and the data plane keep running); `stop_speaker()` is for an operator
who takes the host out for good, or the daemon detaching on exit.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lb.config import BgpConfig
from lb.control.facade import ControlPlane
from lb.errors import XlbError
from lb.fleet.bgp import IPAddress, Speaker, SpeakerState

log = logging.getLogger("xlb.fleet")


@dataclass
class HostStatus:
    """The host's announcement: drain flag, why it announces what it does, speaker state."""

    enabled: bool
    drained: bool
    drained_since: float | None
    announcing: bool
    reason: str
    desired: list[str] = field(default_factory=list)
    speaker: SpeakerState | None = None
    last_error: str | None = None
    last_sync: float | None = None


class Announcer:
    """Keeps the speaker's routes equal to `desired()`; owns the persisted drain flag."""

    def __init__(
        self,
        cfg: BgpConfig,
        state_dir: Path,
        control: ControlPlane,
        attached: Callable[[], bool],
    ) -> None:
        self.cfg = cfg
        self.control = control
        self.attached = attached
        self.work_dir = state_dir / "bgp"
        self.speaker = Speaker(cfg, self.work_dir)
        self._drain_file = self.work_dir / "drained"
        self._lock = threading.Lock()
        self._pushed: set[IPAddress] | None = None
        self._reason = "not synced yet"
        self.last_error: str | None = None
        self.last_sync: float | None = None
        self._summary: tuple[float, dict[str, Any]] | None = None

    # Drain flag.

    @property
    def drained(self) -> bool:
        """True when the operator drained this host (persisted)."""
        return self._drain_file.exists()

    def drained_since(self) -> float | None:
        """When the host was drained (epoch seconds), or None."""
        try:
            return self._drain_file.stat().st_mtime
        except OSError:
            return None

    def drain(self) -> None:
        """Withdraw every VIP route and keep them withdrawn until `undrain` (survives restarts)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self._drain_file.open("w") as f:
            f.write(f"{time.time()}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.work_dir)
        self.sync()

    def undrain(self) -> None:
        """Announce again (when the data plane is attached and in sync)."""
        self._drain_file.unlink(missing_ok=True)
        _fsync_dir(self.work_dir)
        self.sync()

    # Routes.

    def desired(self) -> tuple[set[IPAddress], str]:
        """The addresses to announce now, and why."""
        if self.drained:
            return set(), "drained by the operator"
        if not self.attached():
            return set(), "the data plane is not attached"
        if not self.control.in_sync:
            return set(), "the stored state has not reached the maps"
        addrs: set[IPAddress] = {
            ipaddress.ip_address(v.address) for v in self.control.list_vips()
        }
        return addrs, f"announcing {len(addrs)} VIP address(es)" if addrs else "no VIPs"

    def sync(self) -> set[IPAddress]:
        """Bring the speaker to `desired()`: start or adopt it, reconfigure on a change."""
        with self._lock:
            try:
                want, self._reason = self.desired()
                if self.speaker.pid() is None:
                    self.speaker.start(want)
                    log.info("BGP speaker started, announcing %d address(es)", len(want))
                elif want != self._pushed:
                    self.speaker.announce(want)
                    log.info("BGP routes now: %s", ", ".join(sorted(map(str, want))) or "none")
                self._pushed = want
                self.last_error = None
            except XlbError as e:
                self._pushed = None
                if e.detail != self.last_error:
                    log.warning("BGP: %s", e.detail)
                self.last_error = e.detail
            self.last_sync = time.time()
            return self._pushed or set()

    def withdraw_all(self) -> None:
        """Withdraw every route now (the daemon detaches on exit); the speaker keeps running."""
        with self._lock:
            if self.speaker.pid() is not None:
                self.speaker.announce(set())
                self._pushed = set()

    def stop_speaker(self) -> bool:
        """Stop the speaker (its sessions close, the routers withdraw at once)."""
        with self._lock:
            self._pushed = None
            return self.speaker.stop()

    def status(self) -> HostStatus:
        """Drain flag, desired routes, the speaker's sessions and routes."""
        want, reason = self.desired()
        sp = self.speaker.state()
        return HostStatus(
            enabled=True, drained=self.drained, drained_since=self.drained_since(),
            announcing=bool(sp.running and sp.routes), reason=reason,
            desired=sorted(map(str, want)), speaker=sp, last_error=self.last_error,
            last_sync=self.last_sync,
        )


    def summary(self) -> dict[str, Any]:
        """This host's BGP line in the fleet status: state, peers up, routes announced.

        state: "announcing", "drained", "withdrawn" (nothing to announce, `reason` says why)
        or "error" (the speaker is down or failed, `reason` says how). Asked every time the
        fleet node publishes (10 times a second), so the speaker (a birdc call) is asked at
        most once per `sync_interval_s` and the answer reused in between.
        """
        now = time.monotonic()
        with self._lock:
            if self._summary is not None and now - self._summary[0] < self.cfg.sync_interval_s:
                return self._summary[1]
        st = self.status()
        sp = st.speaker
        problem = st.last_error or (sp.error if sp is not None else None)
        if st.drained:
            state, reason = "drained", st.reason
        elif problem:
            state, reason = "error", problem
        elif st.announcing:
            state, reason = "announcing", st.reason
        else:
            state, reason = "withdrawn", st.reason
        peers = [] if sp is None else sp.peers
        out: dict[str, Any] = {
            "state": state, "reason": reason,
            "routes": len(sp.routes) if sp is not None else 0,
            "peers_up": sum(p.up for p in peers), "peers": len(peers),
        }
        with self._lock:
            self._summary = (now, out)
        return out


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def status_dict(st: HostStatus | None, vip_packets: int | None) -> dict[str, Any]:
    """The host status as plain data (the API's GET /v1/host body)."""
    if st is None:
        return {"bgp_enabled": False, "drained": False, "drained_since": None,
                "announcing": False, "reason": "BGP is off (bgp.enabled = false)",
                "desired_routes": [], "speaker": None, "peers": [], "last_error": None,
                "vip_packets": vip_packets}
    sp = st.speaker
    return {
        "bgp_enabled": st.enabled,
        "drained": st.drained,
        "drained_since": st.drained_since,
        "announcing": st.announcing,
        "reason": st.reason,
        "desired_routes": st.desired,
        "speaker": None if sp is None else {
            "running": sp.running, "pid": sp.pid, "routes": sp.routes, "error": sp.error,
        },
        "peers": [] if sp is None else [
            {"name": p.name, "address": p.address, "asn": p.asn, "up": p.up,
             "state": p.bgp_state, "info": p.info, "since": p.since,
             "routes_exported": p.routes_exported}
            for p in sp.peers
        ],
        "last_error": st.last_error,
        "vip_packets": vip_packets,
    }
