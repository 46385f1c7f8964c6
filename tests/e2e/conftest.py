"""End-to-end fixtures: one lab per test process, named after the process's test prefix.

The lab's namespaces (`xlbt<pid>l-*`) and pins (`/sys/fs/bpf/xlbt<pid>l`) are swept by the
root conftest when a crashed test process left them behind; its run directory and the
processes named there (servers, daemon) are swept here, by the same prefix and dead pid.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.client import ApiError, vip_path
from lb.dataplane import netlink, netns
from lb.lab import network as labmod
from lb.lab.network import Lab, LabApi, Stream

_STALE_RUN = re.compile(r"^xlbt(\d+)")


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_labs() -> None:
    """Remove labs of earlier test processes that no longer run (by prefix and dead pid)."""
    if os.geteuid() != 0 or not labmod.RUN_ROOT.is_dir():
        return
    for d in labmod.RUN_ROOT.iterdir():
        m = _STALE_RUN.match(d.name)
        if m and not netns.pid_alive(int(m.group(1))):
            labmod.down(d.name)


@pytest.fixture(scope="session")
def lab_prefix(test_prefix: str) -> str:
    """Prefix of this test process's lab (distinct from a user's `xlab`)."""
    return f"{test_prefix}l"


@pytest.fixture(scope="session")
def lab(lab_prefix: str) -> Iterator[Lab]:
    """A running lab (topology, decap, servers; no daemon), shared by the e2e tests."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, BPF)")
    spec = Lab(prefix=lab_prefix, backends=3)
    labmod.up(spec)
    try:
        yield spec
    finally:
        labmod.down(lab_prefix)
        assert not labmod.lab_namespaces(lab_prefix), "lab namespaces left behind"


@pytest.fixture
def vip_route_restored(lab: Lab) -> Iterator[None]:
    """Put the router's VIP routes back to the LB after a test that moved them."""
    yield
    netlink.replace_route(lab.router_ns, labmod.VIP_NET4, lab.lb4)
    netlink.replace_route(lab.router_ns, labmod.VIP_NET6, lab.lb6)


REPO = Path(__file__).resolve().parents[2]


def vip_id(protocol: str, address: str, port: int) -> str:
    """The API's VIP id: `tcp:198.18.0.10:80`, `udp:[2001:db8::10]:53`."""
    return f"{protocol}:[{address}]:{port}" if ":" in address else f"{protocol}:{address}:{port}"


@pytest.fixture(scope="session")
def lab_daemon(lab: Lab) -> Iterator[LabApi]:
    """The lab's daemon (native mode), shared by the e2e modules; stopped at the end."""
    ensure_daemon(lab)
    try:
        yield LabApi(lab)
    finally:
        labmod.stop_daemon(lab)


def ensure_daemon(lab: Lab) -> None:
    """Start the lab's daemon unless it runs (a test may have stopped or crashed it)."""
    if labmod.daemon_pid(lab) is None:
        labmod.start_daemon(lab)


@contextlib.contextmanager
def daemon_running(lab: Lab) -> Iterator[LabApi]:
    """The lab's daemon for the duration of a block (stopped, not detached, afterwards)."""
    labmod.start_daemon(lab)
    try:
        yield LabApi(lab)
    finally:
        labmod.stop_daemon(lab)


class Vips:
    """Creates VIPs through the API and deletes them when the test ends."""

    def __init__(self, api: LabApi) -> None:
        self.api = api
        self.made: list[str] = []

    def create(self, protocol: str, address: str, port: int,
               backends: list[tuple[str, int]], **flags: Any) -> str:
        """Create a VIP with (address, weight) backends and flags (encap=...); returns its id."""
        body = {"protocol": protocol, "address": address, "port": port, **flags,
                "backends": [{"address": a, "weight": w} for a, w in backends]}
        # Recorded before the POST: a create whose answer is lost (a timeout under load) is
        # still deleted afterwards, not left to collide with the next test's VIP.
        self.made.append(vip_id(protocol, address, port))
        return str(self.api.post("/v1/vips", body)["id"])

    def cleanup(self) -> None:
        """Delete what this test made (tolerating what the test deleted itself)."""
        for vid in self.made:
            with contextlib.suppress(ApiError):
                self.api.delete(vip_path(vid))


# The fixtures most e2e modules share; a module that needs another daemon (generic mode, other
# settings) defines its own `api`, and `vips` then uses that one.


@pytest.fixture(scope="module")
def api(lab: Lab, lab_daemon: LabApi) -> LabApi:
    """The daemon, native mode."""
    ensure_daemon(lab)
    return lab_daemon


@pytest.fixture
def vips(api: LabApi) -> Iterator[Vips]:
    """VIPs made by one test, deleted after it."""
    v = Vips(api)
    yield v
    v.cleanup()


@pytest.fixture
def streams() -> Iterator[list[Stream]]:
    """Streams a test opens, closed afterwards."""
    made: list[Stream] = []
    yield made
    for s in made:
        s.close()
