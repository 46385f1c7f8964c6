"""The protection maps from Python: per-VIP source ranges (src_v4 / src_v6 LPM tries and the
src_denied counters), the SYN-flood guard and reply rate limits (guard_cfg), and what the
guard is doing now (guard_state). docs/protection.md describes the design.

Source ranges travel as plain tuples, `SrcKey = (family, vip_num, 16 address bytes,
prefix length)` -> SRC_ALLOW / SRC_DENY, as the reconciler's other maps do.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Iterable
from typing import Any

from lb.config import ProtectConfig
from lb.consts import (
    CONN_STAMP_MASK,
    CONN_STAMP_NS_SHIFT,
    FAMILY_V4,
    GUARD_MODE_ALWAYS,
    GUARD_MODE_AUTO,
    GUARD_MODE_OFF,
    GUARD_WINDOW_SHIFT,
)

# The loaded balancer (lb.dataplane.loader.Balancer), untyped here: the loader imports this
# module to write guard_cfg, and modules never import each other.
Balancer = Any

#: A source range as Python sees it: (family, VIP number, 16 address bytes, prefix length).
SrcKey = tuple[int, int, bytes, int]

#: Bits of the trie key that hold the VIP number (always matched whole).
VIP_NUM_BITS = 32

GUARD_MODES = {"off": GUARD_MODE_OFF, "auto": GUARD_MODE_AUTO, "always": GUARD_MODE_ALWAYS}
GUARD_MODE_NAMES = {v: k for k, v in GUARD_MODES.items()}

# CLOCK_MONOTONIC_COARSE: what bpf_ktime_get_coarse_ns() reads (Python 3.11 has no name).
_CLOCK_MONOTONIC_COARSE = 6


def _table(b: Balancer, family: int) -> Any:
    return b.src_v4 if family == FAMILY_V4 else b.src_v6


def _key(b: Balancer, key: SrcKey) -> Any:
    family, vip_num, raw, plen = key
    t = _table(b, family)
    k = t.Key()
    k.prefixlen = VIP_NUM_BITS + plen
    k.vip_num = vip_num
    if family == FAMILY_V4:
        k.addr = int.from_bytes(raw[:4], "little")  # network order, as stored
    else:
        ctypes.memmove(k.addr, raw, 16)
    return k


def set_src_range(b: Balancer, key: SrcKey, verdict: int) -> None:
    """Create or change one range of one VIP."""
    t = _table(b, key[0])
    t[_key(b, key)] = t.Leaf(verdict)


def del_src_range(b: Balancer, key: SrcKey) -> None:
    """Delete one range (absent is fine)."""
    with contextlib.suppress(KeyError):
        del _table(b, key[0])[_key(b, key)]


def read_src_ranges(b: Balancer) -> dict[SrcKey, int]:
    """Every range of every VIP, with its verdict."""
    out: dict[SrcKey, int] = {}
    for family, t in ((FAMILY_V4, b.src_v4), (6, b.src_v6)):
        for k, v in t.items():
            if family == FAMILY_V4:
                raw = int(k.addr).to_bytes(4, "little") + bytes(12)
            else:
                raw = bytes(k.addr)
            out[(family, int(k.vip_num), raw, int(k.prefixlen) - VIP_NUM_BITS)] = int(v.value)
    return out


#: How long after a change of a VIP's ranges a new stamp is trusted: two stamp units (the
#: change's and the next, xdp/balancer/srcrange.h; 2^CONN_STAMP_NS_SHIFT ns each) plus the
#: coarse clock's tick and a margin. Tests and the bench wait this long.
SRC_TRUST_WAIT_S = 0.06


def mark_src_changed(b: Balancer, vip_nums: Iterable[int]) -> None:
    """Stamp these VIPs' ranges as changed now (src_changed), once their tries and flags are
    written: each of their connection-table entries is checked against the ranges again on
    its next packet, instead of trusting the verdict its stamp caches (srcrange.h)."""
    unit = (time.clock_gettime_ns(_CLOCK_MONOTONIC_COARSE) >> CONN_STAMP_NS_SHIFT) \
        & CONN_STAMP_MASK
    t = b.src_changed
    for n in vip_nums:
        t[t.Key(n)] = t.Leaf(unit or 1)  # 0 means "never stamped": check every packet


def src_denied(b: Balancer, vip_num: int) -> int:
    """Packets VIP `vip_num`'s source ranges dropped, summed over CPUs."""
    t = b.src_denied
    return sum(int(c) for c in t[t.Key(vip_num)])


def reset_src_denied(b: Balancer, vip_nums: list[int]) -> None:
    """Zero the denied counters of freshly allocated VIP numbers."""
    t = b.src_denied
    for n in vip_nums:
        t[t.Key(n)] = t.Leaf()


def write_guard_config(b: Balancer, protect: ProtectConfig) -> None:
    """Write guard_cfg[0] from `protect` (the program reads it per SYN and per reply)."""
    t = b.guard_cfg
    leaf = t.Leaf()
    leaf.mode = GUARD_MODES[protect.syn_guard]
    leaf.syn_per_window = protect.syn_per_window
    leaf.echo_rate = protect.echo_rate
    leaf.echo_burst = protect.echo_burst
    leaf.too_big_rate = protect.too_big_rate
    leaf.too_big_burst = protect.too_big_burst
    t[t.Key(0)] = leaf


def clear_guard_config(b: Balancer) -> None:
    """All zero: no guard and no reply limits (what packet tests start from)."""
    b.guard_cfg[b.guard_cfg.Key(0)] = b.guard_cfg.Leaf()
    for name in ("guard_state", "rl_buckets"):
        t = b.maps[name]
        for i in range(len(t)):
            t.clearitem(t.Key(i))


def guard_window_now() -> int:
    """The guard window the program is in now."""
    return time.clock_gettime_ns(_CLOCK_MONOTONIC_COARSE) >> GUARD_WINDOW_SHIFT


def guard_status(b: Balancer) -> dict[str, Any]:
    """The guard's mode and which CPUs are in flood mode now (this or the last window)."""
    cfg = b.guard_cfg[b.guard_cfg.Key(0)]
    mode = GUARD_MODE_NAMES.get(int(cfg.mode), str(int(cfg.mode)))
    now = guard_window_now()
    flooding = []
    for cpu, st in enumerate(b.guard_state[b.guard_state.Key(0)]):
        if int(st.flood) and now - int(st.window) <= 1:
            flooding.append(cpu)
    active = mode == "always" or bool(flooding)
    return {"mode": mode, "flood": active, "flood_cpus": flooding,
            "syn_per_window": int(cfg.syn_per_window)}
