"""Fixtures of the fleet tests: real etcd members and several control planes on one etcd.

Each "host" is a ControlPlane with its own state directory (its local SQLite copy) and its
own set of maps (a maps-only program per host, compiled once per test process), all sharing
one etcd cluster started by the test (`lb.fleet.members`: own data directory, loopback ports,
stopped by pid, removed afterwards).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lb.config import DataplaneConfig, EtcdConfig
from lb.control.facade import ControlPlane
from lb.dataplane.mapio import MapIO
from lb.fleet.members import EtcdCluster, etcd_binary, sweep_stale
from lb.fleet.state import EtcdStore, etcd_store
from tests.control.conftest import MapsOnly, clear_maps

FLEET_CONFIG = DataplaneConfig(ring_size=1021, max_vips=16, max_reals=64, conn_table_size=1024)
#: For the writer child: room for 60 backends in one ring (7919 is prime).
WRITER_CONFIG = DataplaneConfig(ring_size=7919, max_vips=4, max_reals=64, conn_table_size=1024)
HOSTS = 3


@dataclass(frozen=True)
class StateDir:
    """What ControlPlane needs of lb.settings.Settings."""

    state_dir: Path


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def dump(maps: Any, control: ControlPlane) -> dict[str, Any]:
    """What one host's maps hold: VIPs, addresses, backends, and the used rings' slots."""
    io = MapIO(maps)
    vip_map = io.read_vip_map()
    rings = {num: list(io.read_ring(num)) for num, _ in vip_map.values()}
    return {"vip_map": vip_map, "vip_addrs": io.read_vip_addrs(), "reals": io.read_reals(),
            "rings": rings}


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_etcd() -> None:
    """Stop etcd members that a test process which died left behind (by recorded pid)."""
    sweep_stale()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One etcd member on loopback, removed afterwards."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (scripts/setup.sh installs etcd-server)")
    with EtcdCluster(tmp_path / "etcd", 1) as c:
        yield c


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three etcd members on loopback, removed afterwards."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (scripts/setup.sh installs etcd-server)")
    with EtcdCluster(tmp_path / "etcd3", 3) as c:
        yield c


@pytest.fixture(scope="session")
def host_maps() -> Iterator[list[MapsOnly]]:
    """One set of the balancer's maps per host, compiled once per test process."""
    made = [MapsOnly(FLEET_CONFIG) for _ in range(HOSTS)]
    yield made
    for m in made:
        m.close()


class Fleet:
    """Control planes on one etcd: `start(i)` opens host i, `stop(i)` closes it."""

    def __init__(self, root: Path, cluster: EtcdCluster, maps: list[MapsOnly] | None) -> None:
        self.root = root
        self.cluster = cluster
        self.maps = maps
        self.hosts: dict[int, ControlPlane] = {}

    def config(self, i: int, **kw: Any) -> EtcdConfig:
        """The etcd configuration of host i."""
        return EtcdConfig(endpoints=self.cluster.endpoints, host_name=f"lb{i}",
                          timeout_s=kw.pop("timeout_s", 1.0), **kw)

    def start(self, i: int, **kw: Any) -> ControlPlane:
        """Open host i (its state directory survives stop/start)."""
        state = self.root / f"lb{i}"
        balancer = self.maps[i] if self.maps is not None else None
        cp = ControlPlane(StateDir(state), balancer, config=FLEET_CONFIG,
                          store=etcd_store(state, self.config(i, **kw)))
        self.hosts[i] = cp
        return cp

    def stop(self, i: int) -> None:
        """Close host i."""
        self.hosts.pop(i).close()

    def store(self, i: int) -> EtcdStore:
        """Host i's store."""
        s = self.hosts[i]._store
        assert isinstance(s, EtcdStore)
        return s

    def converged(self) -> bool:
        """Every open host has applied the same generation and revision."""
        stores = [self.store(i) for i in self.hosts]
        return len({(s.generation, s.revision) for s in stores}) == 1

    def close(self) -> None:
        """Close every host."""
        for i in list(self.hosts):
            self.stop(i)


@pytest.fixture
def fleet(tmp_path: Path, etcd: EtcdCluster,
          host_maps: list[MapsOnly]) -> Iterator[Fleet]:
    """Three hosts with maps, on one etcd member (not started: call fleet.start(i))."""
    for m in host_maps:
        clear_maps(m)
    f = Fleet(tmp_path, etcd, host_maps)
    yield f
    f.close()
