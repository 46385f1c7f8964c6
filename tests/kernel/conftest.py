"""Fixtures for the kernel-facing tests: a veth pair inside a test namespace."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from lb.dataplane.netlink import load_xdp_pass


@dataclass(frozen=True)
class Veth:
    """A veth pair `a`/`b`, both ends inside namespace `ns`."""

    ns: str
    a: str = "xv0"
    b: str = "xv1"

    def ip(self, *args: str) -> None:
        """Run `ip -n <ns> ...` (raises on failure)."""
        subprocess.run(["ip", "-n", self.ns, *args], check=True, capture_output=True)


@pytest.fixture
def veth(netns: Callable[[str], str]) -> Veth:
    """A fresh namespace with a veth pair, both ends up; deleted with the namespace."""
    v = Veth(netns("k"))
    v.ip("link", "add", v.a, "type", "veth", "peer", "name", v.b)
    v.ip("link", "set", v.a, "up")
    v.ip("link", "set", v.b, "up")
    return v


def load_pass_program(name: str) -> int:
    """Load `r0 = XDP_PASS; exit` as an XDP program called `name`; returns its fd.

    Attach tests only need a program with the right (or a foreign) name, and this one loads in
    microseconds, whatever state the balancer's C sources are in.
    """
    return load_xdp_pass(name)


@pytest.fixture
def ours_fd() -> Iterator[int]:
    """A program named like the balancer (xdp_balancer): recognised as ours."""
    fd = load_pass_program("xdp_balancer")
    yield fd
    os.close(fd)


@pytest.fixture
def foreign_fd() -> Iterator[int]:
    """A program with another name: foreign."""
    fd = load_pass_program("xdp_other")
    yield fd
    os.close(fd)
