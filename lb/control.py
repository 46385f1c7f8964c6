"""The control plane facade: desired state in, durable store, maps brought to it.

Every write runs under one lock and follows the same write-ahead order: validate fully,
store durably (one SQLite transaction, generation bumped), apply to the maps, return. A
write that is stored but cannot be applied is still acknowledged (the state is durable):
it is counted in `reconcile_errors` and retried by the next change, `repair()` or the next
start, which always brings the maps to the stored state.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lb.errors import NotFound
from lb.model import (
    BackendSpec,
    BackendUpdate,
    Drift,
    Plan,
    State,
    VipSpec,
    VipUpdate,
)

if TYPE_CHECKING:
    from lb.dataplane import Balancer


class ControlSettings(Protocol):
    """What the control plane needs from lb.settings.Settings."""

    @property
    def state_dir(self) -> Path:
        """Directory holding the SQLite store."""
        ...


class ControlPlane:
    """Thread-safe facade over the desired state, its store and the maps (SKELETON)."""

    def __init__(self, settings: ControlSettings, balancer: Balancer | None) -> None:
        self._lock = threading.RLock()
        self._settings = settings
        self._balancer = balancer
        self._vips: dict[str, VipSpec] = {}
        self._generation = 0
        self._reconcile_errors = 0

    @property
    def generation(self) -> int:
        """Generation of the stored state (bumped by every applied change)."""
        return self._generation

    @property
    def reconcile_errors(self) -> int:
        """Number of times applying a stored change to the maps failed."""
        return self._reconcile_errors

    def list_vips(self) -> list[VipSpec]:
        """Every VIP, in creation order."""
        with self._lock:
            return list(self._vips.values())

    def get_vip(self, vip_id: str) -> VipSpec:
        """One VIP by id; NotFound."""
        with self._lock:
            try:
                return self._vips[vip_id]
            except KeyError:
                raise NotFound(f"VIP {vip_id} does not exist", field="vip_id") from None

    def create_vip(self, spec: VipSpec) -> VipSpec:
        """Create a VIP with its backends; Conflict, LimitReached, InvalidInput."""
        raise NotImplementedError

    def update_vip(self, vip_id: str, changes: VipUpdate) -> VipSpec:
        """Change a VIP's flags, encapsulation or outer source."""
        raise NotImplementedError

    def delete_vip(self, vip_id: str) -> None:
        """Delete a VIP; NotFound."""
        raise NotImplementedError

    def list_backends(self, vip_id: str) -> list[BackendSpec]:
        """The backends of a VIP; NotFound."""
        return list(self.get_vip(vip_id).backends)

    def add_backend(self, vip_id: str, spec: BackendSpec) -> BackendSpec:
        """Add a backend to a VIP; NotFound, Conflict, LimitReached, InvalidInput."""
        raise NotImplementedError

    def update_backend(self, vip_id: str, address: str, changes: BackendUpdate) -> BackendSpec:
        """Change a backend's weight or state; NotFound."""
        raise NotImplementedError

    def remove_backend(self, vip_id: str, address: str) -> None:
        """Remove a backend from a VIP; NotFound."""
        raise NotImplementedError

    def replace_backends(self, vip_id: str, backends: list[BackendSpec]) -> list[BackendSpec]:
        """Replace a VIP's whole backend list in one change."""
        raise NotImplementedError

    def get_state(self) -> State:
        """The whole desired state with its generation."""
        with self._lock:
            return State(vips=list(self._vips.values()), generation=self._generation)

    def plan(self, state: State) -> Plan:
        """What apply_state(state) would change, without changing anything."""
        raise NotImplementedError

    def apply_state(self, state: State, *, if_generation: int | None = None) -> Plan:
        """Make `state` the desired state in one change; PreconditionFailed."""
        raise NotImplementedError

    def verify(self) -> list[Drift]:
        """Differences between the maps and the desired state."""
        raise NotImplementedError

    def repair(self) -> list[Drift]:
        """Fix every difference; returns what was fixed."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the store (the maps keep their content)."""
