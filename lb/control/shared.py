"""What the control plane needs of a state store, so one host's SQLite and the fleet's etcd
(lb/fleet/state.py) are interchangeable.

`Store` (lb/control/store.py) is the embedded default; the etcd store derives from it, keeps
it as the host's durable local copy, and adds two things a shared store has: changes made by
other hosts (`follow`: applied through the control plane's `apply`, under its lock, so the
maps follow), and writes that lose a race (`write` raises `StaleState`; the control plane
calls `catch_up` and validates the group again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from lb.control.model import VipSpec
from lb.control.store import Committed, StoreStatus
from lb.errors import Conflict


class StaleState(Conflict):
    """Another host changed the shared state after this change was validated."""

    kind = "stale-state"


class StateStore(Protocol):
    """A durable desired state with group commit (see lb/control/store.py)."""

    @property
    def generation(self) -> int:
        """Generation of the last committed change."""
        ...

    @property
    def staged_generation(self) -> int:
        """Generation including the changes staged since the last write."""
        ...

    @property
    def vips(self) -> Mapping[str, VipSpec]:
        """Stored VIPs by id, in creation order."""
        ...

    @property
    def vip_nums(self) -> Mapping[str, int]:
        """VIP id -> VIP number."""
        ...

    @property
    def real_idx(self) -> Mapping[str, int]:
        """Backend address -> index into reals."""
        ...

    def stage(self, upserts: Iterable[VipSpec] = (), deletes: Iterable[str] = ()) -> Committed:
        """Apply one change to the in-memory copy as the next generation."""
        ...

    def write(self) -> None:
        """Store every staged change; StaleState when another writer was first."""
        ...

    def abort(self) -> None:
        """Undo every change staged since the last write."""
        ...

    def follow(self, apply: Callable[[Callable[[], None]], None]) -> None:
        """Apply other hosts' changes from now on, each through `apply(update)`."""
        ...

    def catch_up(self) -> None:
        """Bring the in-memory copy to the latest shared state (the caller's lock held)."""
        ...

    def stale(self) -> bool:
        """True when the shared state moved past what this copy holds (one round trip)."""
        ...

    def lost_race(self, tries: int) -> None:
        """A write lost `tries` races in a row: wait for, or take, the fleet's write turn."""
        ...

    def writes_done(self) -> None:
        """A write group ended: give back the write turn if this host holds it."""
        ...

    def status(self) -> StoreStatus:
        """What the store is and whether it takes writes now."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...
