"""End-to-end fixtures: one lab per test process, named after the process's test prefix.

The lab's namespaces (`xlbt<pid>l-*`) and pins (`/sys/fs/bpf/xlbt<pid>l`) are swept by the
root conftest when a crashed test process left them behind; its run directory and the
processes named there (servers, daemon) are swept here, by the same prefix and dead pid.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb import netns
from lb.lab import Lab

_STALE_RUN = re.compile(r"^xlbt(\d+)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_labs() -> None:
    """Remove labs of earlier test processes that no longer run (by prefix and dead pid)."""
    if os.geteuid() != 0 or not labmod.RUN_ROOT.is_dir():
        return
    for d in labmod.RUN_ROOT.iterdir():
        m = _STALE_RUN.match(d.name)
        if m and not _pid_alive(int(m.group(1))):
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
    netns.replace_route(lab.router_ns, labmod.VIP_NET4, lab.lb4)
    netns.replace_route(lab.router_ns, labmod.VIP_NET6, lab.lb6)
