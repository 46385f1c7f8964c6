"""Fleet fixtures: a router namespace running BIRD and one LB-host namespace, on one veth.

Every BIRD a test starts is stopped by its pid file in the fixture's teardown (never by name),
then the namespaces go; names carry the test process's prefix (`xlbt<pid>g...`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lb.dataplane import netlink, netns
from lb.lab import network as labmod
from lb.lab.router import LB_ASN, ROUTER_ASN, Neighbor, RouterBird

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
