"""Fixtures of the fleet tests: real etcd members and several control planes on one etcd.

Each "host" is a ControlPlane with its own state directory (its local SQLite copy) and its
own set of maps (a maps-only program per host, compiled once per test process), all sharing
one etcd cluster started by the test (`lb.fleet.members`: own data directory, loopback ports,
stopped by pid, removed afterwards).

BGP: a router namespace running BIRD and one LB-host namespace, on one veth.

Every BIRD a test starts is stopped by its pid file in the fixture's teardown (never by name),
then the namespaces go; names carry the test process's prefix (`xlbt<pid>g...`).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lb.config import DataplaneConfig, EtcdConfig
from lb.control.facade import ControlPlane
from lb.dataplane import netlink, netns
from lb.dataplane.mapio import MapIO
from lb.fleet.members import EtcdCluster, etcd_binary, sweep_stale
from lb.fleet.state import EtcdStore, etcd_store
from lb.lab import network as labmod
from lb.lab.router import LB_ASN, ROUTER_ASN, Neighbor, RouterBird
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
        """Every open host has the same generation and revision, in its maps too.

        The store's revision moves before the applier has written the maps (CI once dumped
        maps with the VIP's addresses and backends but not its ring); maps_revision moves after.
        """
        stores = [self.store(i) for i in self.hosts]
        return len({(s.generation, s.revision, s.maps_revision) for s in stores}) == 1 \
            and all(s.maps_revision == s.revision for s in stores)

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


_STALE_RUN = re.compile(r"^xlbt(\d+)")

R4, H4 = "198.18.250.1", "198.18.250.2"
R6, H6 = "2001:db8:250::1", "2001:db8:250::2"


@dataclass
class Pair:
    """A router namespace with BIRD and an LB-host namespace, and where their files are."""

    router_ns: str
    host_ns: str
    run_dir: Path
    router: RouterBird

    def bgp_settings(self, **kw: object) -> dict[str, object]:
        """The `bgp` settings of the LB host peering with the router over both families."""
        return {
            "enabled": True, "asn": LB_ASN, "hold_time": 3,
            "peers": [{"address": R4, "asn": ROUTER_ASN}, {"address": R6, "asn": ROUTER_ASN}],
            **kw,
        }


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_fleets() -> None:
    """Stop the BIRDs and daemons of earlier test processes that died (by pid file)."""
    if os.geteuid() != 0 or not labmod.RUN_ROOT.is_dir():
        return
    for d in labmod.RUN_ROOT.iterdir():
        m = _STALE_RUN.match(d.name)
        if m and not netns.pid_alive(int(m.group(1))):
            labmod.down(d.name)


@pytest.fixture
def bgp_dir(test_prefix: str) -> Iterator[Path]:
    """A run directory the stale sweep finds (`/run/xlb/xlbt<pid>g`), removed afterwards."""
    d = labmod.RUN_ROOT / f"{test_prefix}g"
    d.mkdir(parents=True, exist_ok=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def bgp_pair(test_prefix: str, bgp_dir: Path) -> Iterator[Pair]:
    """Router (BIRD, ECMP kernel export) and one host namespace linked by a veth."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces)")
    if shutil.which("bird") is None:
        pytest.skip("BIRD 2 is not installed (scripts/setup.sh installs bird2)")
    rns, hns = f"{test_prefix}gr", f"{test_prefix}gh"
    run = bgp_dir / "router"
    router = RouterBird(ns=rns, run_dir=run, router_id=R4,
                        neighbors=(Neighbor("lb1_4", H4), Neighbor("lb1_6", H6)))
    try:
        for ns in (rns, hns):
            netns.create(ns)
            netns.set_sysctls(ns, {"net.ipv6.conf.all.accept_dad": 0,
                                   "net.ipv6.conf.default.accept_dad": 0})
        netlink.add_veth(netlink.End(rns, "rt0", "02:58:4c:fa:00:01", 1500),
                         netlink.End(hns, "h0", "02:58:4c:fa:00:02", 1500))
        for ns, ifn, cidr in ((rns, "rt0", f"{R4}/24"), (rns, "rt0", f"{R6}/64"),
                              (hns, "h0", f"{H4}/24"), (hns, "h0", f"{H6}/64")):
            netlink.add_address(ns, ifn, cidr)
        router.start()
        yield Pair(rns, hns, run, router)
    finally:
        router.stop()
        for ns in (rns, hns):
            netns.delete(ns)
