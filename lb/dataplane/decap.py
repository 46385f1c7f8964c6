"""Load the backend decap programs (xdp/decap/decap.c) and drive their maps.

Backends without tunnel devices (no ipip/ip6tnl/fou in the kernel) run one of the two
programs to strip what the balancer added: IPIP, IPv6-in-IPv6, IPv4-in-IPv6 and GUE
variant 1 to `gue_port`, for outer destinations registered with `add_local`.

Attaching is the caller's job, with pyroute2 (run it in the backend's namespace):

    XDP (either program fd, native or generic mode):
        ip.link("set", index=idx, xdp_fd=decap.xdp_fd)          # detach: xdp_fd=-1
    tc ingress, direct action:
        ip.tc("add", "clsact", idx)
        ip.tc("add-filter", "bpf", idx, ":1", fd=decap.tc_fd, name="tc_decap",
              parent="ffff:fff2", classid=1, direct_action=True)  # ffff:fff2 = ingress
        ip.tc("del", "clsact", idx)                              # detach

Use one variant per interface: both on one link would leave tc nothing to strip.
Counter names are the C names of `enum decap_stat` in xdp/decap/decap.h, verbatim (a test
parses the header and compares).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from lb.dataplane.keys import IPAddress, family_of, get_addr, set_addr
from lb.dataplane.loader import compile_pinned, compile_program, load_func
from lb.errors import InvalidInput, KernelError, LimitReached, NotFound

SOURCE = "decap/decap.c"
XDP_PROGRAM = "xdp_decap"
TC_PROGRAM = "tc_decap"
MAP_NAMES = ("decap_addrs", "decap_cfg", "decap_stats")

# Counter slots (enum decap_stat in xdp/decap/decap.h), in order.
DECAP_STATS: tuple[str, ...] = (
    "DECAP_STAT_IPIP",
    "DECAP_STAT_IP6IP6",
    "DECAP_STAT_IP4IN6",
    "DECAP_STAT_GUE_V4",
    "DECAP_STAT_GUE_V6",
    "DECAP_STAT_PASS_NOT_ENCAP",
    "DECAP_STAT_PASS_NOT_LOCAL",
    "DECAP_STAT_PASS_FRAG",
    "DECAP_STAT_DROP_MALFORMED",
    "DECAP_STAT_DROP_ADJUST",
    "DECAP_STAT_SC_KEEP_SYN",
    "DECAP_STAT_SC_KEEP_SOCKET",
    "DECAP_STAT_SC_KEEP_COOKIE",
    "DECAP_STAT_SC_KEEP_LAST",
    "DECAP_STAT_SC_KEEP_OTHER",
    "DECAP_STAT_SC_FORWARD",
)
DECAP_STAT_MAX = len(DECAP_STATS)

# Compile-time defaults (#ifndef in xdp/decap/decap.h).
DECAP_MAX_ADDRS = 64
DECAP_DEFAULT_GUE_PORT = 6080

# tc verdicts (include/uapi/linux/pkt_cls.h), for readers of test-run results.
TC_ACT_OK = 0
TC_ACT_SHOT = 2


def _parse_addr(addr: IPAddress | str) -> IPAddress:
    if isinstance(addr, str):
        try:
            return ipaddress.ip_address(addr)
        except ValueError as e:
            raise InvalidInput(f"not an IP address: {addr!r}", field="addr") from e
    return addr


class Decap:
    """The loaded decap programs (XDP and tc) and their maps."""

    def __init__(
        self,
        *,
        gue_port: int | None = DECAP_DEFAULT_GUE_PORT,
        max_addrs: int = DECAP_MAX_ADDRS,
        pin_dir: Path | None = None,
    ) -> None:
        if max_addrs < 1:
            raise InvalidInput(f"max_addrs must be at least 1, got {max_addrs}", field="max_addrs")
        self.pin_dir = pin_dir
        cflags = [f"-DDECAP_MAX_ADDRS={max_addrs}"]
        if pin_dir is None:
            self.bpf = compile_program(SOURCE, cflags)
        else:
            self.bpf, _ = compile_pinned(SOURCE, cflags, pin_dir)
        try:
            self.xdp_fn = load_func(self.bpf, XDP_PROGRAM, self.bpf.XDP)
            self.tc_fn = load_func(self.bpf, TC_PROGRAM, self.bpf.SCHED_CLS)
            self.maps: dict[str, Any] = {name: self.bpf[name.encode()] for name in MAP_NAMES}
            # None keeps what a pinned decap_cfg already holds (0 means the default port).
            if gue_port is not None:
                self.set_gue_port(gue_port)
        except Exception:
            self.bpf.cleanup()
            raise

    @property
    def xdp_fd(self) -> int:
        """File descriptor of the XDP program."""
        return int(self.xdp_fn.fd)

    @property
    def tc_fd(self) -> int:
        """File descriptor of the tc (SCHED_CLS, direct-action) program."""
        return int(self.tc_fn.fd)

    def _addr_key(self, addr: IPAddress) -> Any:
        k = self.maps["decap_addrs"].Key()
        set_addr(k.addr, addr)
        k.family = family_of(addr)
        return k

    def add_local(self, addr: IPAddress | str) -> None:
        """Decapsulate tunnel packets whose outer destination is `addr` (idempotent)."""
        a = _parse_addr(addr)
        table = self.maps["decap_addrs"]
        try:
            table[self._addr_key(a)] = table.Leaf(1)
        except Exception as e:
            # BCC raises a bare Exception carrying strerror(errno); E2BIG = map full.
            if os.strerror(errno.E2BIG) in str(e):
                raise LimitReached(f"decap_addrs is full ({table.max_entries} addresses)") from e
            raise KernelError(f"adding {a} to decap_addrs failed: {e}") from e

    def remove_local(self, addr: IPAddress | str) -> None:
        """Stop decapsulating for `addr`; NotFound if it was not registered."""
        a = _parse_addr(addr)
        try:
            del self.maps["decap_addrs"][self._addr_key(a)]
        except KeyError as e:
            raise NotFound(f"{a} is not a decap address", field="addr") from e

    def local_addrs(self) -> list[IPAddress]:
        """The registered addresses, sorted IPv4 first."""
        addrs = [get_addr(k.addr, k.family) for k in self.maps["decap_addrs"]]
        return sorted(addrs, key=lambda a: (a.version, int(a)))

    def set_gue_port(self, port: int) -> None:
        """Set the GUE destination UDP port the programs recognise."""
        if not 1 <= port <= 0xFFFF:
            raise InvalidInput(f"GUE port must be 1..65535, got {port}", field="gue_port")
        table = self.maps["decap_cfg"]
        cfg = table.Leaf()
        cfg.gue_port = socket.htons(port)
        table[table.Key(0)] = cfg

    def gue_port(self) -> int:
        """The GUE port in effect (the compiled-in default while the map holds 0)."""
        table = self.maps["decap_cfg"]
        port = socket.ntohs(table[table.Key(0)].gue_port)
        return port or DECAP_DEFAULT_GUE_PORT

    def counters(self) -> dict[str, int]:
        """Every counter slot by its C name, summed over CPUs."""
        table = self.maps["decap_stats"]
        return {name: int(table.sum(table.Key(i)).value) for i, name in enumerate(DECAP_STATS)}

    def close(self) -> None:
        """Unload both programs and release the maps (pinned maps stay pinned)."""
        self.bpf.cleanup()

    def __enter__(self) -> Decap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
