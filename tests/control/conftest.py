"""Fixtures of the control-plane tests: a fresh state directory and clean maps per test.

The control plane is tested on the real maps of xdp/balancer/maps.h, created by a maps-only program
(`MapsOnly`, compiled once per test process) rather than by the balancer: these tests are
about what lands in the maps, and must not break while xdp/balancer/balancer.c is being changed.
Tests that need packets through the program (test_ordering.py) use the session `balancer`.
Every test that programs the maps starts by emptying them; the state directory is tmp_path.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lb.config import DataplaneConfig, xdp_source_dir
from lb.control.facade import ControlPlane
from lb.dataplane.loader import MAP_NAMES

# The XDP function exists only so BCC has something to compile next to the maps.
MAPS_ONLY_SOURCE = """
#include <uapi/linux/bpf.h>
#include "balancer/maps.h"
int xdp_maps_only(struct xdp_md *ctx) { return XDP_PASS; }
"""


class MapsOnly:
    """The balancer's maps without its program: what ControlPlane needs of a Balancer."""

    def __init__(self, config: DataplaneConfig, *, pin_dir: Path | None = None) -> None:
        import bcc

        self.config = config
        self.pin_dir = pin_dir
        from lb.dataplane.loader import adopt_pins

        flags = [f"-I{xdp_source_dir()}", *config.cflags()]
        self.bpf = bcc.BPF(text=MAPS_ONLY_SOURCE.encode(), cflags=flags)
        if pin_dir is not None:
            # On the pins, as the loader puts the balancer's maps (opened by path).
            pin_dir.mkdir(parents=True, exist_ok=True)
            diffs, _ = adopt_pins(self.bpf, pin_dir)
            assert not diffs, diffs
        self.maps: dict[str, Any] = {n: self.bpf[n.encode()] for n in MAP_NAMES}

    def __getattr__(self, name: str) -> Any:
        maps = self.__dict__.get("maps")
        if maps is not None and name in maps:
            return maps[name]
        raise AttributeError(name)

    def close(self) -> None:
        """Release the maps (pinned ones stay pinned)."""
        self.bpf.cleanup()


@dataclass(frozen=True)
class StateSettings:
    """The part of lb.settings.Settings the control plane reads."""

    state_dir: Path


def clear_maps(b: Any) -> None:
    """Empty every map the control plane writes (and the connection table)."""
    from lb.dataplane.mapio import MapIO

    for name in ("vip_map", "vip_addrs", "conn_table"):
        t = b.maps[name]
        for k in list(t.keys()):
            del t[k]
    # Disarmed, as on a new map: other tests seed VIPs without the control plane.
    b.vip_filter[b.vip_filter.Key(0)] = b.vip_filter.Leaf()
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


@pytest.fixture(scope="session")
def maps_only(dataplane_config: DataplaneConfig) -> Iterator[MapsOnly]:
    """The maps of xdp/balancer/maps.h with the test configuration, once per test process."""
    m = MapsOnly(dataplane_config)
    yield m
    m.close()


@pytest.fixture
def maps(maps_only: MapsOnly) -> MapsOnly:
    """The maps, emptied."""
    clear_maps(maps_only)
    return maps_only


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


@pytest.fixture
def live(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The session balancer (program and maps), emptied before and after; skipped, with the
    reason, while xdp/balancer/balancer.c does not load."""
    from lb.errors import KernelError

    try:
        b = request.getfixturevalue("balancer")
    except KernelError as e:
        pytest.skip(f"xdp/balancer/balancer.c does not load yet: {e}")
    clear_maps(b)
    yield b
    clear_maps(b)
