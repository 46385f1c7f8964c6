"""Shared fixtures: one compiled data plane per test process, namespaces and pins by name.

Everything a test creates in the kernel carries this process's prefix (`xlbt<pid>`), and the
finalizers remove it by that name even when the test fails. At session start, leftovers of
earlier test processes that no longer run are removed the same way (by their prefix and dead
pid), never by a broad pattern.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lb.config import DataplaneConfig
from lb.dataplane.netns import pid_alive

PREFIX = f"xlbt{os.getpid()}"
BPFFS = Path("/sys/fs/bpf")
_STALE = re.compile(r"^xlbt(\d+)")

# Small enough to compile and create quickly, large enough for every packet test.
TEST_CONFIG = DataplaneConfig(ring_size=4099, max_vips=16, max_reals=64, conn_table_size=65536)


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_netns(name: str) -> None:
    """Delete one namespace by name (its veths go with it)."""
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _sweep_stale() -> None:
    for name in _netns_names():
        m = _STALE.match(name)
        if m and not pid_alive(int(m.group(1))):
            delete_netns(name)
    if BPFFS.is_dir():
        for p in BPFFS.iterdir():
            m = _STALE.match(p.name)
            if m and not pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove what crashed earlier test processes left behind (by prefix and dead pid)."""
    if os.geteuid() == 0:
        _sweep_stale()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip privileged tests, with the reason, when not root."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (BPF, XDP, network namespaces)")
    for item in items:
        if "bpf" in item.keywords or "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def test_prefix() -> str:
    """Prefix for every kernel object this test process names."""
    return PREFIX


@pytest.fixture(scope="session")
def dataplane_config() -> DataplaneConfig:
    """The compile-time configuration packet tests use."""
    return TEST_CONFIG


@pytest.fixture(scope="session")
def balancer(dataplane_config: DataplaneConfig) -> Iterator[object]:
    """The balancer, compiled once per test process (unpinned)."""
    from lb.dataplane.loader import Balancer

    b = Balancer(dataplane_config)
    yield b
    b.close()


@pytest.fixture
def pin_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A bpffs directory for one test's pins, removed afterwards even on failure."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    d = BPFFS / f"{PREFIX}_{safe}"
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """Factory making network namespaces named `<prefix>-<name>`, deleted after the test."""
    made: list[str] = []

    def make(name: str) -> str:
        full = f"{PREFIX}-{name}"
        subprocess.run(["ip", "netns", "add", full], check=True)
        made.append(full)
        return full

    yield make
    for full in reversed(made):
        delete_netns(full)
