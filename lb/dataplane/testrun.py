"""BPF_PROG_TEST_RUN through a raw bpf(2) syscall: run a loaded program on one packet.

BCC has no wrapper for it; the call and its attr struct are lb.dataplane.bpf's. With repeat > 1 the
kernel does NOT reset the packet between iterations, so only repeat idempotent paths.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from lb.dataplane.bpf import BPF_PROG_TEST_RUN, TestRunAttr, bpf, sys_bpf_nr

# XDP_PACKET_HEADROOM: test-run gives the program this much room for bpf_xdp_adjust_head.
XDP_HEADROOM = 256


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
        sys_bpf_nr("BPF_PROG_TEST_RUN")  # an unknown architecture fails here, not on run
        self._prog_fd = prog_fd
        self._out = ctypes.create_string_buffer(max_out + XDP_HEADROOM)
        self._attr = TestRunAttr()

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
        bpf(BPF_PROG_TEST_RUN, a, "BPF_PROG_TEST_RUN failed", hints=False)
        return RunResult(a.retval, self._out.raw[: a.data_size_out], a.duration)

    def time_frames(self, addresses: Sequence[int], size: int) -> tuple[int, Counter[int]]:
        """Run each `size`-byte frame at these addresses once (benchmarks): the output is not
        copied back; returns the kernel-measured total ns and how many frames got each verdict.
        """
        a = TestRunAttr(prog_fd=self._prog_fd, data_size_in=size, repeat=1)
        total = 0
        verdicts: Counter[int] = Counter()
        for addr in addresses:
            a.data_in = addr
            # The kernel writes the output size back here and treats it as the next call's
            # buffer size: reset it, or a larger output fails with ENOSPC.
            a.data_size_out = 0
            bpf(BPF_PROG_TEST_RUN, a, "BPF_PROG_TEST_RUN failed", hints=False)
            total += a.duration
            verdicts[a.retval] += 1
        return total, verdicts
