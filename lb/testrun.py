"""BPF_PROG_TEST_RUN through a raw bpf(2) syscall: run a loaded program on one packet.

BCC has no wrapper for it, so this is the one place that builds `union bpf_attr` for the
command by hand. With repeat > 1 the kernel does NOT reset the packet between iterations, so
only repeat idempotent paths.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

from lb.errors import KernelError

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_PROG_TEST_RUN = 10
# XDP_PACKET_HEADROOM: test-run gives the program this much room for bpf_xdp_adjust_head.
XDP_HEADROOM = 256


class _TestAttr(ctypes.Structure):
    # The `test` member of union bpf_attr (include/uapi/linux/bpf.h).
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class RunResult:
    """Verdict, output packet and kernel-measured duration of one test run."""

    verdict: int
    packet: bytes
    duration_ns: int


class TestRunner:
    """Runs one loaded program repeatedly, reusing its buffers."""

    __test__ = False  # not a pytest class

    def __init__(self, prog_fd: int, max_out: int = 4096) -> None:
        machine = platform.machine()
        if machine not in _SYS_BPF:
            raise KernelError(f"BPF_PROG_TEST_RUN: unsupported architecture {machine}")
        self._nr = _SYS_BPF[machine]
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self._libc.syscall
        self._prog_fd = prog_fd
        self._out = ctypes.create_string_buffer(max_out + XDP_HEADROOM)
        self._attr = _TestAttr()

    def run(self, packet: bytes, repeat: int = 1) -> RunResult:
        """Run the program on `packet`; returns the verdict and the packet as it left."""
        a = self._attr
        inbuf = ctypes.create_string_buffer(packet, len(packet))
        ctypes.memset(ctypes.addressof(a), 0, ctypes.sizeof(a))
        a.prog_fd = self._prog_fd
        a.data_in = ctypes.addressof(inbuf)
        a.data_size_in = len(packet)
        a.data_out = ctypes.addressof(self._out)
        a.data_size_out = len(self._out)
        a.repeat = repeat
        rc = self._syscall(self._nr, BPF_PROG_TEST_RUN, ctypes.byref(a), ctypes.sizeof(a))
        if rc != 0:
            err = ctypes.get_errno()
            raise KernelError(f"BPF_PROG_TEST_RUN failed: {os.strerror(err)} (errno {err})")
        return RunResult(a.retval, self._out.raw[: a.data_size_out], a.duration)
