"""Load the tunnelled-probe program (xdp/hc_encap/hc_encap.c) and attach it to tc egress.

The prober marks a probe's socket (SO_MARK) with `mark(index, address, gue)`; the tc egress
program on the balancer's interface encapsulates packets carrying that mark towards the
backend, with the VIP left as the inner destination. Marks are ``MARK_BASE | gue << 20 |
backend index``; packets with any other mark pass untouched.

The VIP must not be a local address of the LB host and its route must leave through the
balancer's interface (true of an "LB on a stick": VIPs are routed to the LB, never
configured on it), so the probe reaches the interface's egress. The prober's source address
must be routable back to the LB: the backend answers it directly (DSR).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING

from lb.dataplane import netlink
from lb.dataplane.keys import mac_bytes, put_field, set_addr
from lb.dataplane.loader import compile_program, load_func
from lb.errors import InvalidInput, KernelError

if TYPE_CHECKING:
    from lb.config import RuntimeConfig
    from lb.settings import Settings

SOURCE = "hc_encap/hc_encap.c"
#: The maps of xdp/hc_encap/hc_encap.c, in the order it declares them.
MAP_NAMES = ("hc_reals", "hc_cfg", "hc_stats")
PROGRAM = "tc_hc_encap"
#: Marks of tunnelled probes: MARK_BASE | gue << 20 | backend index ("XL" in the top byte).
MARK_BASE = 0x58000000
MARK_GUE = 1 << 20
MAX_INDEX = MARK_GUE - 1
#: tc filter priority of the program on egress (so it is removed by itself, nothing else).
TC_PRIO = 0xC7
HC_F_V6 = 1 << 0
HC_F_GUE = 1 << 1
#: Counter slots (enum hc_stat in xdp/hc_encap/hc_encap.c), in order.
HC_STATS = (
    "HC_STAT_ENCAP_V4",
    "HC_STAT_ENCAP_V6",
    "HC_STAT_PASS_FOREIGN",
    "HC_STAT_DROP_FAMILY",
    "HC_STAT_DROP_ADJUST",
)


class HcEncap:
    """The loaded tc program, its maps, and (once attached) where it runs."""

    def __init__(self, runtime: RuntimeConfig, *, max_reals: int = 4096) -> None:
        self.bpf = compile_program(SOURCE, [f"-DHC_MAX_REALS={max_reals}"])
        try:
            self.fn = load_func(self.bpf, PROGRAM, self.bpf.SCHED_CLS)
            self.reals, self.cfg, self.stats = (self.bpf[n.encode()] for n in MAP_NAMES)
            self.set_config(runtime)
        except Exception:
            self.bpf.cleanup()
            raise
        self._where: tuple[str | None, str] | None = None

    def set_config(self, runtime: RuntimeConfig) -> None:
        """Write the outer sources, GUE port and gateway MAC (zero MAC: keep the route's)."""
        leaf = self.cfg.Leaf()
        put_field(leaf, "gw_mac", mac_bytes(runtime.gateway_mac))
        leaf.gue_port = socket.htons(runtime.gue_port)
        put_field(leaf, "src_v4", runtime.src_v4.packed)
        put_field(leaf, "src_v6", runtime.src_v6.packed)
        self.cfg[self.cfg.Key(0)] = leaf

    def mark(self, index: int, address: str, gue: bool) -> int:
        """The SO_MARK that steers probes to this backend (programmed, idempotent)."""
        if not 0 < index <= MAX_INDEX:
            raise InvalidInput(f"backend index {index} does not fit a mark", field="index")
        mark = MARK_BASE | (MARK_GUE if gue else 0) | index
        addr = ipaddress.ip_address(address)
        leaf = self.reals.Leaf()
        set_addr(leaf.addr, addr)
        leaf.flags = (HC_F_V6 if addr.version == 6 else 0) | (HC_F_GUE if gue else 0)
        self.reals[self.reals.Key(mark)] = leaf
        return mark

    def release(self, mark: int) -> None:
        """Forget a mark (absent is fine)."""
        with contextlib.suppress(KeyError):
            del self.reals[self.reals.Key(mark)]

    def counters(self) -> dict[str, int]:
        """Every counter slot by its C name, summed over CPUs."""
        t = self.stats
        return {n: int(t.sum(t.Key(i)).value) for i, n in enumerate(HC_STATS)}

    def attach(self, ifname: str, ns: str | None = None) -> None:
        """Run the program on `ifname`'s tc egress (adds clsact when missing).

        Replaces our filter if one is there: a daemon killed without detaching leaves its
        program running on egress, and the next one must take the place, not fail (EEXIST).
        """
        with netlink.iproute(ns) as ipr:
            links = ipr.link_lookup(ifname=ifname)
            if not links:
                raise KernelError(f"no interface {ifname} to attach {PROGRAM} to")
            idx = links[0]
            if not any(q.get("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx)):
                ipr.tc("add", "clsact", idx)
            ipr.tc("replace-filter", "bpf", idx, ":1", fd=self.fn.fd, name=PROGRAM,
                   parent="ffff:fff3", classid=1, direct_action=True, prio=TC_PRIO)
        self._where = (ns, ifname)

    def detach(self) -> None:
        """Remove our egress filter only (other tc programs stay)."""
        if self._where is None:
            return
        ns, ifname = self._where
        self._where = None
        where = ["-n", ns] if ns else []
        subprocess.run(["tc", *where, "filter", "del", "dev", ifname, "egress",
                        "pref", str(TC_PRIO)], capture_output=True, timeout=10)

    def close(self) -> None:
        """Detach and unload."""
        self.detach()
        self.bpf.cleanup()


def tunnel_factory(settings: Settings, stack: ExitStack) -> Callable[[], HcEncap] | None:
    """How the daemon loads the tunnel on first use (None without an interface).

    An HcEncap is what lb.health.manager's `Tunnel` asks for (marks for backends).
    """
    if not settings.interface:
        return None
    ifname = settings.interface

    def make() -> HcEncap:
        hc = HcEncap(settings.runtime, max_reals=settings.dataplane.max_reals)
        try:
            hc.attach(ifname, settings.netns)
        except BaseException:
            hc.close()
            raise
        stack.callback(hc.close)
        return hc

    return make
