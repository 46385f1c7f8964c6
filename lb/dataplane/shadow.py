"""The balancer's own instructions loaded a second time, counting into private maps.

lb.ops.explain runs a synthesised packet through the live program to tell where a flow goes.
Run through the attached program, that packet would be counted as traffic (the VIP's and the
backend's packets and bytes, the global verdict counters), and per-CPU counters cannot be
rolled back while the program runs: a user-space write replaces every CPU's value at once,
losing what other CPUs counted meanwhile.

So the packet runs through a shadow: the instructions BCC compiled (`BPF.dump_func`) loaded
again with raw bpf(2), every map reference the same map (vip_map, rings, reals, conn_table,
lb_cfg: the flow meets exactly what a real packet meets) except the counter maps, which name
per-CPU arrays of the same shape that only the shadow writes. The shadow is never attached.
Its counters are then exactly what the explained packet moved, whatever other traffic does.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

from lb.dataplane import bpf
from lb.dataplane.mapio import possible_cpus
from lb.errors import KernelError

if TYPE_CHECKING:
    from lb.dataplane.loader import Balancer

BPF_MAP_CREATE = 0
#: ld_imm64 (BPF_LD | BPF_IMM | BPF_DW) and its source register for "imm is a map fd".
BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1
#: The maps the shadow gets private copies of (those the program has): everything that
#: counts, nothing that steers; ev_cfg, whose private copy (all zero) keeps explained
#: packets out of the event stream; and vip_cache, the per-CPU copy of a VIP lookup, so an
#: explained packet (run from a task, which a NAPI softirq can interrupt on its CPU) never
#: shares an entry with the live program's packets.
COUNTER_MAPS = ("vip_stats", "real_stats", "pair_cache", "pair_stats", "glob_stats", "ev_cfg",
                "vip_cache")
_INSN = 8
_FUNC = b"xdp_balancer"


def _map_like(info: bpf.MapInfo) -> int:
    """A new, empty map of the same type and shape (per-CPU array or hash)."""
    attr = bpf.MapCreateAttr(info.type, info.key_size, info.value_size, info.max_entries,
                             info.flags)  # fmt: skip
    return bpf.bpf(BPF_MAP_CREATE, attr, f"creating the shadow's {info.name}")


def _retarget(insns: bytearray, fds: dict[int, int]) -> int:
    """Point every ld_imm64 of a map fd in `fds` at its replacement; how many it changed."""
    changed = 0
    for off in range(0, len(insns) - _INSN, _INSN):
        if insns[off] != BPF_LD_IMM64 or insns[off + 1] >> 4 != BPF_PSEUDO_MAP_FD:
            continue
        fd = int.from_bytes(insns[off + 4 : off + 8], "little", signed=True)
        if fd in fds:
            insns[off + 4 : off + 8] = fds[fd].to_bytes(4, "little", signed=True)
            changed += 1
    return changed


class ShadowProgram:
    """The balancer's program loaded again with private counter maps (never attached)."""

    def __init__(self, balancer: Balancer) -> None:
        self.prog_id = balancer.prog_id
        self._fds: list[int] = []
        self.counters: dict[str, int] = {}
        self._ncpu = possible_cpus()
        try:
            replace: dict[int, int] = {}
            for name in COUNTER_MAPS:
                if name not in balancer.maps:
                    continue
                info = bpf.map_info(int(balancer.maps[name].map_fd))
                fd = _map_like(info)
                self._fds.append(fd)
                self.counters[name] = fd
                replace[int(balancer.maps[name].map_fd)] = fd
            insns = bytearray(balancer.bpf.dump_func(_FUNC))
            if _retarget(insns, replace) == 0:
                raise KernelError("the balancer's instructions name none of its counter maps")
            buf = (ctypes.c_char * len(insns)).from_buffer(insns)
            lic = ctypes.create_string_buffer(b"GPL")
            attr = bpf.ProgLoadAttr(
                prog_type=bpf.BPF_PROG_TYPE_XDP, insn_cnt=len(insns) // _INSN,
                insns=ctypes.addressof(buf), license=ctypes.addressof(lic),
                prog_name=b"xlb_explain",
            )  # fmt: skip
            self.prog_fd = bpf.bpf(bpf.BPF_PROG_LOAD, attr, "loading the explain shadow")
            self._fds.append(self.prog_fd)
        except BaseException:
            self.close()
            raise

    def words(self, name: str, index: int) -> tuple[int, ...]:
        """Slot `index` of the private counter map `name`: each u64 word summed over CPUs."""
        fd = self.counters[name]
        info = bpf.map_info(fd)
        stride = (info.value_size + 7) // 8 * 8
        key = ctypes.c_uint32(index)
        buf = ctypes.create_string_buffer(stride * self._ncpu)
        attr = bpf.ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(buf))
        bpf.bpf(bpf.BPF_MAP_LOOKUP_ELEM, attr, f"reading the shadow's {name}")
        raw = buf.raw
        n = info.value_size // 8
        return tuple(
            sum(int.from_bytes(raw[c * stride + 8 * w : c * stride + 8 * w + 8], "little")
                for c in range(self._ncpu))
            for w in range(n)
        )  # fmt: skip

    def close(self) -> None:
        """Release the program and its private maps."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> ShadowProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
