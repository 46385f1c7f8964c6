"""Fixtures for the kernel-facing tests: a veth pair inside a test namespace."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest


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


_SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_XDP = 6
XDP_PASS = 2


class _ProgLoadAttr(ctypes.Structure):
    # Head of the BPF_PROG_LOAD member of union bpf_attr, up to prog_name.
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
    ]


def load_pass_program(name: str) -> int:
    """Load `r0 = XDP_PASS; exit` as an XDP program called `name`; returns its fd.

    Attach tests only need a program with the right (or a foreign) name, and this one loads in
    microseconds, whatever state the balancer's C sources are in.
    """
    # BPF_MOV64_IMM(R0, XDP_PASS); BPF_EXIT_INSN()
    insns = (ctypes.c_uint64 * 2)(0xB7 | (XDP_PASS << 32), 0x95)
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_XDP, insn_cnt=2, insns=ctypes.addressof(insns),
        license=ctypes.addressof(lic), prog_name=name.encode(),
    )  # fmt: skip
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(_SYS_BPF[platform.machine()], BPF_PROG_LOAD, ctypes.byref(attr),
                          ctypes.sizeof(attr)))  # fmt: skip
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_LOAD {name}: {os.strerror(err)}")
    return fd


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
