"""What the running kernel must offer the data plane, checked before BCC compiles anything.

Each BPF feature the programs use that is younger than the BPF core is probed once per
process by loading a few raw instructions that use it (no compiler, microseconds), the way
`bpftool feature probe` does. A kernel without one is refused in one line that names what is
missing, the Linux release that added it, and the kernels xlb is tested on, instead of a
verifier log from deep inside BCC. `make test-kernels` is the evidence behind SUPPORTED.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
from dataclasses import dataclass

from lb.dataplane import bpf
from lb.errors import UnsupportedKernel

# The kernels `make test-kernels` runs the whole data-plane suite on (scripts/kernels.conf
# plus the CI host's own kernel).
SUPPORTED = ("6.1", "6.12", "6.18")
BPF_PROG_TYPE_SCHED_CLS = 3

# Instruction encoding (include/uapi/linux/bpf.h): code, dst|src<<4, off, imm.
_MOV64_IMM = 0xB7
_STX_MEM_DW = 0x7B
_STX_ATOMIC_DW = 0xDB
_CALL = 0x85
_EXIT = 0x95
_BPF_CMPXCHG = 0xF0 | 0x01  # BPF_CMPXCHG | BPF_FETCH
_R10 = 10


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def _ret(value: int) -> bytes:
    return _insn(_MOV64_IMM, 0, imm=value) + _insn(_EXIT)


def _helper_call(helper: int) -> bytes:
    # r1 is the context at entry; the other arguments 0 (an offset, a mode, flags).
    args = b"".join(_insn(_MOV64_IMM, r, imm=0) for r in (2, 3, 4, 5))
    return args + _insn(_CALL, imm=helper) + _ret(0)


# cmpxchg on a stack slot: the connection table's slot claim (__sync_val_compare_and_swap).
_CMPXCHG = (
    _insn(_MOV64_IMM, 1, imm=0)
    + _insn(_STX_MEM_DW, _R10, 1, off=-8)
    + _insn(_MOV64_IMM, 0, imm=0)
    + _insn(_MOV64_IMM, 1, imm=1)
    + _insn(_STX_ATOMIC_DW, _R10, 1, off=-8, imm=_BPF_CMPXCHG)
    + _ret(0)
)


@dataclass(frozen=True)
class Feature:
    """One BPF feature a program needs, with a probe that uses it."""

    name: str
    since: str  # the Linux release that added it
    prog_type: int
    code: bytes  # the probe program


FEATURES: dict[str, tuple[Feature, ...]] = {
    "xdp_balancer": (
        Feature("bpf_ktime_get_coarse_ns", "5.11", bpf.BPF_PROG_TYPE_XDP, _helper_call(160)),
        Feature("BPF atomic compare-and-exchange", "5.12", bpf.BPF_PROG_TYPE_XDP, _CMPXCHG),
        Feature("bpf_xdp_adjust_head", "4.10", bpf.BPF_PROG_TYPE_XDP, _helper_call(44)),
        Feature("bpf_xdp_adjust_tail", "4.18", bpf.BPF_PROG_TYPE_XDP, _helper_call(65)),
        # Events and capture (xdp/balancer/events.h); bpf_xdp_load_bytes came with it.
        Feature("bpf_xdp_get_buff_len", "5.18", bpf.BPF_PROG_TYPE_XDP, _helper_call(188)),
    ),
    "xdp_decap": (
        Feature("bpf_xdp_adjust_head", "4.10", bpf.BPF_PROG_TYPE_XDP, _helper_call(44)),
    ),
    "tc_decap": (
        Feature("bpf_skb_change_proto", "4.8", BPF_PROG_TYPE_SCHED_CLS, _helper_call(31)),
        Feature("bpf_skb_adjust_room", "4.13", BPF_PROG_TYPE_SCHED_CLS, _helper_call(50)),
    ),
    "tc_hc_encap": (
        Feature("bpf_skb_change_proto", "4.8", BPF_PROG_TYPE_SCHED_CLS, _helper_call(31)),
        Feature("bpf_skb_adjust_room", "4.13", BPF_PROG_TYPE_SCHED_CLS, _helper_call(50)),
    ),
}


@functools.cache
def probe(feature: Feature) -> bool:
    """Whether the running kernel loads `feature`'s probe (cached per process)."""
    code = ctypes.create_string_buffer(feature.code, len(feature.code))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = bpf.ProgLoadAttr(
        prog_type=feature.prog_type, insn_cnt=len(feature.code) // 8,
        insns=ctypes.addressof(code), license=ctypes.addressof(lic), prog_name=b"xlb_probe",
    )  # fmt: skip
    fd, err = bpf.bpf_try(bpf.BPF_PROG_LOAD, attr)
    if fd >= 0:
        os.close(fd)
        return True
    if err == errno.EPERM:
        # Not a missing feature: nothing loads without privileges (the verifier's own
        # refusals are EINVAL or EACCES).
        raise bpf.error(f"probing the kernel for {feature.name}", err)
    return False


def missing(program: str) -> list[Feature]:
    """The features of `program` the running kernel lacks."""
    return [f for f in FEATURES.get(program, ()) if not probe(f)]


def refusal(program: str, lacking: list[Feature]) -> str:
    """The one line that refuses a kernel."""
    what = ", ".join(f"{f.name} (Linux {f.since})" for f in lacking)
    return (
        f"Linux {platform.release()} cannot run {program}: it lacks {what}; xlb runs on Linux"
        f" {SUPPORTED[0]} or newer (tested on {', '.join(SUPPORTED)})"
    )


def require(program: str) -> None:
    """Raise UnsupportedKernel (one line) when the kernel lacks a feature of `program`."""
    lacking = missing(program)
    if lacking:
        raise UnsupportedKernel(refusal(program, lacking))
