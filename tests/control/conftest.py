"""Fixtures of the control-plane tests: a fresh state directory and clean maps per test.

The maps belong to the session `balancer` (one compile per test process), so every test
that programs them starts by emptying them; the state directory is pytest's tmp_path.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lb.control import ControlPlane


@dataclass(frozen=True)
class StateSettings:
    """The part of lb.settings.Settings the control plane reads."""

    state_dir: Path


def clear_maps(b: Any) -> None:
    """Empty every map the control plane writes (and the connection table)."""
    from lb.reconcile import MapIO

    for name in ("vip_map", "vip_addrs", "conn_table"):
        t = b.maps[name]
        for k in list(t.keys()):
            del t[k]
    io = MapIO(b)
    for idx in io.read_reals():
        io.set_real(idx, None)
    zeros = array("I", bytes(4 * b.config.ring_size))
    for num in range(b.config.max_vips):
        changed = [i for i, v in enumerate(io.read_ring(num)) if v]
        io.write_ring(num, changed, zeros)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A fresh state directory."""
    return tmp_path / "state"


@pytest.fixture
def maps(balancer: Any) -> Any:
    """The session balancer with every control-plane map emptied."""
    clear_maps(balancer)
    return balancer


@pytest.fixture
def make_control(state_dir: Path) -> Iterator[Callable[..., ControlPlane]]:
    """Factory of ControlPlanes on the test's state directory, closed afterwards."""
    made: list[ControlPlane] = []

    def make(balancer: Any = None, **kw: Any) -> ControlPlane:
        cp = ControlPlane(StateSettings(state_dir), balancer, **kw)
        made.append(cp)
        return cp

    yield make
    for cp in made:
        cp.close()


@pytest.fixture
def control(maps: Any, make_control: Callable[..., ControlPlane]) -> ControlPlane:
    """A ControlPlane on clean maps and a fresh state directory."""
    return make_control(maps)
