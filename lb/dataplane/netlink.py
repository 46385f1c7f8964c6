"""Links, addresses, routes, XDP and tc programs on interfaces, through netlink (pyroute2).

Everything is addressed by (namespace name, interface name); `name=None` is the caller's own
namespace (a real host). The namespaces themselves, and commands run inside them (ethtool),
are lb.dataplane.netns's.

Two veth facts drive the helpers here (docs/veth-lab.md has all of them): native
XDP_TX or XDP_REDIRECT into a veth delivers only if the peer has an XDP program
(`load_xdp_pass` makes the smallest one), and checksum offload must be off on senders whose
packets cross native XDP (`set_offload`).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyroute2 import IPRoute

from lb.dataplane import bpf
from lb.errors import InvalidInput, KernelError

NETNS_RUN_DIR = Path("/run/netns")

XdpMode = Literal["native", "generic"]

# Flags of IFLA_XDP_FLAGS (include/uapi/linux/if_link.h), named as there. The mode used to
# attach must be used to detach.
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4
MODE_FLAGS: dict[str, int] = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
#: IFLA_XDP_ATTACHED as pyroute2 decodes it -> the mode names xlb uses everywhere.
ATTACHED_MODES: dict[str, str] = {
    "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi",
}  # fmt: skip
_ERRNO_HINTS = {
    errno.ERANGE: "on veth: the peer's MTU is above the native XDP limit (3506)",
    errno.EOPNOTSUPP: "the driver has no native XDP support",
    errno.EPERM: "needs root (CAP_NET_ADMIN)",
}


# Links and addresses.


@contextmanager
def iproute(name: str | None) -> Iterator[IPRoute]:
    """A netlink socket inside an existing namespace (never creates one on a typo).

    Every function here takes `name=None` for the caller's own namespace (a real host).
    ext_ack: errors carry the kernel's own words ("veth: Peer MTU is too large to set XDP").
    """
    missing = InvalidInput(
        f"network namespace {name!r} does not exist (no {NETNS_RUN_DIR}/{name})", field="netns"
    )
    # Checked first: flags=0 fails on a missing namespace, but pyroute2 0.9 leaks a socket.
    if name is not None and not (NETNS_RUN_DIR / name).exists():
        raise missing
    try:
        ipr = IPRoute(netns=name, flags=0, ext_ack=True) if name else IPRoute(ext_ack=True)
    except FileNotFoundError as e:
        raise missing from e
    try:
        yield ipr
    finally:
        ipr.close()


def netlink_error(what: str, e: Exception) -> KernelError:
    """A pyroute2 NetlinkError as a KernelError: what was attempted, the kernel's words, errno."""
    code = int(getattr(e, "code", 0) or (e.args[0] if e.args else 0) or 0)
    text = e.args[1] if len(e.args) > 1 and e.args[1] else os.strerror(code)
    hint = _ERRNO_HINTS.get(code)
    return KernelError(f"{what}: {text} (errno {code}{'; ' + hint if hint else ''})")


def ifindex(name: str | None, ifname: str) -> int:
    """Interface index of `ifname` inside a namespace."""
    with iproute(name) as ipr:
        return index(ipr, name, ifname)


def where(ifname: str, name: str | None) -> str:
    """`eth0`, or `eth0 (netns lb1)` inside a namespace: how messages name an interface."""
    return f"{ifname} (netns {name})" if name else ifname


def index(ipr: IPRoute, name: str | None, ifname: str) -> int:
    """Interface index of `ifname` on an open netlink socket (InvalidInput if there is none)."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise InvalidInput(f"no interface {where(ifname, name)}", field="interface")
    return int(found[0])


@dataclass(frozen=True)
class End:
    """One end of a veth pair: namespace, interface name, optional MAC and MTU."""

    netns: str
    ifname: str
    mac: str | None = None
    mtu: int = 1500


def add_veth(a: End, b: End, *, up: bool = True) -> None:
    """Create a veth pair with one end in each namespace, set MACs and MTUs, bring it up."""
    with iproute(a.netns) as ipr:
        ipr.link("add", ifname=a.ifname, kind="veth",
                 peer={"ifname": b.ifname, "net_ns_fd": b.netns})
    for end in (a, b):
        set_link(end.netns, end.ifname, up=up, mtu=end.mtu, mac=end.mac)


def set_link(
    name: str | None, ifname: str, *, up: bool | None = None, mtu: int | None = None,
    mac: str | None = None,
) -> None:
    """Change state, MTU or MAC of an interface inside a namespace."""
    attrs: dict[str, Any] = {}
    if mtu is not None:
        attrs["mtu"] = mtu
    if mac is not None:
        attrs["address"] = mac
    if up is not None:
        attrs["state"] = "up" if up else "down"
    if not attrs:
        return
    with iproute(name) as ipr:
        ipr.link("set", index=index(ipr, name, ifname), **attrs)


IFA_F_NODAD = 0x02


def add_address(name: str | None, ifname: str, iface: str) -> None:
    """Add an address like `198.18.1.2/24` or `2001:db8:1::2/64` (IPv6 without DAD delay)."""
    i = ipaddress.ip_interface(iface)
    kw: dict[str, Any] = {}
    if i.version == 6:
        # Tentative addresses cannot be bound for a second or more.
        kw["flags"] = IFA_F_NODAD
    with iproute(name) as ipr:
        ipr.addr("add", index=index(ipr, name, ifname), address=str(i.ip),
                 prefixlen=i.network.prefixlen, **kw)


def add_route(name: str | None, dst: str, gateway: str) -> None:
    """Add a route (`default` or a prefix) via a gateway inside a namespace."""
    gw = ipaddress.ip_address(gateway)
    kw: dict[str, Any] = {"gateway": str(gw)}
    if dst == "default":
        kw["dst"] = "0.0.0.0/0" if gw.version == 4 else "::/0"
    else:
        kw["dst"] = str(ipaddress.ip_network(dst))
    if gw.version == 6:
        kw["family"] = 10
    with iproute(name) as ipr:
        ipr.route("add", **kw)


def replace_route(name: str | None, dst: str, gateway: str) -> None:
    """Point an existing (or new) route at another gateway inside a namespace."""
    gw = ipaddress.ip_address(gateway)
    with iproute(name) as ipr:
        ipr.route("replace", dst=str(ipaddress.ip_network(dst)), gateway=str(gw),
                  family=2 if gw.version == 4 else 10)


def route_get(name: str | None, dst: str) -> dict[str, Any]:
    """The kernel's route decision for `dst` in a namespace (oif name, gateway, prefsrc)."""
    a = ipaddress.ip_address(dst)
    with iproute(name) as ipr:
        try:
            msg = ipr.route("get", dst=str(a), family=2 if a.version == 4 else 10)[0]
        except Exception as e:  # pyroute2 raises NetlinkError: no route, unreachable
            return {"error": str(e)}
        oif = msg.get("RTA_OIF")
        ifname = None
        if oif:
            links = ipr.get_links(oif)
            ifname = links[0].get("IFLA_IFNAME") if links else None
        return {"oif": ifname, "gateway": msg.get("RTA_GATEWAY"), "prefsrc": msg.get("RTA_PREFSRC"),
                "type": msg.get("type")}


def neighbours(name: str | None, ifname: str) -> dict[str, str]:
    """Neighbour table entries (address -> MAC) learnt on one interface."""
    with iproute(name) as ipr:
        idx = index(ipr, name, ifname)
        out: dict[str, str] = {}
        for n in ipr.get_neighbours(ifindex=idx):
            addr, mac = n.get("NDA_DST"), n.get("NDA_LLADDR")
            if addr and mac and not ipaddress.ip_address(addr).is_multicast:
                out[str(addr)] = str(mac)
        return out


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel reports about one interface."""

    netns: str | None
    ifname: str
    index: int
    mac: str
    mtu: int
    up: bool
    kind: str | None
    peer_index: int | None
    xdp_mode: str | None
    xdp_prog_id: int | None

    @property
    def xdp_prog_name(self) -> str | None:
        """Name of the attached XDP program, if any."""
        return prog_name(self.xdp_prog_id) if self.xdp_prog_id else None


def _link_info(name: str | None, msg: Any) -> LinkInfo:
    xdp = msg.get("IFLA_XDP")
    mode = prog_id = None
    if xdp is not None:
        attached = xdp.get("IFLA_XDP_ATTACHED")
        mode = ATTACHED_MODES.get(attached, attached) if attached else None
        prog_id = xdp.get("IFLA_XDP_PROG_ID") or None
    info = msg.get("IFLA_LINKINFO")
    kind = info.get("IFLA_INFO_KIND") if info is not None else None
    return LinkInfo(
        netns=name,
        ifname=str(msg.get("IFLA_IFNAME")),
        index=int(msg["index"]),
        mac=str(msg.get("IFLA_ADDRESS")),
        mtu=int(msg.get("IFLA_MTU")),
        up=bool(msg["flags"] & 1),
        kind=kind,
        peer_index=msg.get("IFLA_LINK"),
        xdp_mode=mode,
        xdp_prog_id=prog_id,
    )


def link_info(name: str | None, ifname: str) -> LinkInfo:
    """State, MAC, MTU and attached XDP program of one interface."""
    with iproute(name) as ipr:
        return _link_info(name, ipr.get_links(index(ipr, name, ifname))[0])


def links(name: str | None) -> list[LinkInfo]:
    """Every interface of a namespace."""
    with iproute(name) as ipr:
        return [_link_info(name, m) for m in ipr.get_links()]


def addresses(name: str | None, ifname: str) -> list[str]:
    """Addresses of an interface as `address/prefixlen`."""
    with iproute(name) as ipr:
        idx = index(ipr, name, ifname)
        return [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)]


# XDP programs on veths.


def set_xdp(
    ipr: IPRoute, idx: int, fd: int, flags: int, what: str, *, expected_fd: int | None = None
) -> None:
    """Attach program `fd` (-1: detach) with IFLA_XDP_FLAGS `flags`; with `expected_fd`, only
    if that program is the one attached now (XDP_FLAGS_REPLACE). KernelError naming `what`."""
    from pyroute2.netlink.exceptions import NetlinkError

    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd)]
    if expected_fd is not None:
        flags |= XDP_FLAGS_REPLACE
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    attrs.append(("IFLA_XDP_FLAGS", flags))
    try:
        ipr.link("set", index=idx, xdp={"attrs": attrs})
    except NetlinkError as e:
        raise netlink_error(what, e) from e


def xdp_attach(name: str | None, ifname: str, prog_fd: int, mode: XdpMode = "native") -> None:
    """Attach (or replace, whatever it is) an XDP program on an interface in a namespace.

    For labs and helper programs; the balancer goes through lb.dataplane.attach, which
    replaces atomically and only its own program.
    """
    with iproute(name) as ipr:
        set_xdp(ipr, index(ipr, name, ifname), prog_fd, MODE_FLAGS[mode],
                f"attaching XDP to {ifname} in {mode} mode")


def xdp_detach(name: str | None, ifname: str, mode: XdpMode | None = None) -> None:
    """Detach the XDP program of an interface; the mode defaults to the one attached."""
    if mode is None:
        attached = link_info(name, ifname).xdp_mode
        if attached not in MODE_FLAGS:
            return
        mode = "native" if attached == "native" else "generic"
    with iproute(name) as ipr:
        set_xdp(ipr, index(ipr, name, ifname), -1, MODE_FLAGS[mode],
                f"detaching XDP from {ifname}")


@contextmanager
def xdp_attached(
    name: str | None, ifname: str, prog_fd: int, mode: XdpMode = "native"
) -> Iterator[None]:
    """Keep an XDP program attached for the duration of a `with` block."""
    xdp_attach(name, ifname, prog_fd, mode)
    try:
        yield
    finally:
        if name is None or (NETNS_RUN_DIR / name).exists():
            xdp_detach(name, ifname, mode)


# Raw bpf(2) through lb.dataplane.bpf: the two-instruction XDP_PASS program, names by id.

XDP_PASS = 2
PASS_PROG_NAME = "xlb_pass"


def load_xdp_pass(name: str = PASS_PROG_NAME) -> int:
    """Load `r0 = XDP_PASS; exit` as an XDP program named `name`; returns its fd.

    Attached to a veth peer it makes native XDP_TX/XDP_REDIRECT into that veth deliver, at no
    cost worth measuring. No compiler involved, so it loads in microseconds. Close the fd when
    attached: the attachment keeps the program alive.
    """
    # BPF_MOV64_IMM(R0, XDP_PASS); BPF_EXIT_INSN()
    insns = (ctypes.c_uint64 * 2)(0xB7 | (XDP_PASS << 32), 0x95)
    lic = ctypes.create_string_buffer(b"GPL")
    attr = bpf.ProgLoadAttr(
        prog_type=bpf.BPF_PROG_TYPE_XDP, insn_cnt=2, insns=ctypes.addressof(insns),
        license=ctypes.addressof(lic), prog_name=name.encode(),
    )  # fmt: skip
    return bpf.bpf(bpf.BPF_PROG_LOAD, attr, f"bpf({bpf.BPF_PROG_LOAD}) failed", hints=False)


@contextmanager
def xdp_pass_attached(name: str | None, ifname: str, mode: XdpMode = "native") -> Iterator[None]:
    """Keep xlb_pass attached to an interface for the duration of a `with` block."""
    fd = load_xdp_pass()
    try:
        with xdp_attached(name, ifname, fd, mode):
            yield
    finally:
        os.close(fd)


def attach_xdp_pass(name: str | None, ifname: str, mode: XdpMode = "native") -> None:
    """Attach xlb_pass to an interface and leave it there (it goes with the interface)."""
    fd = load_xdp_pass()
    try:
        xdp_attach(name, ifname, fd, mode)
    finally:
        os.close(fd)


def prog_name(prog_id: int) -> str | None:
    """The name of a loaded BPF program by id (None if it is gone)."""
    try:
        fd = bpf.prog_fd_by_id(prog_id)
    except KernelError:
        return None
    try:
        return bpf.prog_info(fd).name
    finally:
        os.close(fd)


# tc ingress (clsact + cls_bpf direct action), e.g. a backend's decap program.


def tc_attach_ingress(name: str | None, ifname: str, prog_fd: int, prog_name_: str) -> None:
    """Add clsact (if missing) and a direct-action BPF filter on ingress."""
    with iproute(name) as ipr:
        idx = index(ipr, name, ifname)
        if not any(q.get("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx)):
            ipr.tc("add", "clsact", idx)
        ipr.tc("add-filter", "bpf", idx, ":1", fd=prog_fd, name=prog_name_,
               parent="ffff:fff2", classid=1, direct_action=True)


def tc_detach(name: str | None, ifname: str) -> None:
    """Remove clsact and with it every tc BPF program of an interface."""
    with iproute(name) as ipr:
        idx = index(ipr, name, ifname)
        if any(q.get("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx)):
            ipr.tc("del", "clsact", idx)


def tc_ingress_progs(name: str | None, ifname: str) -> list[tuple[int, str]]:
    """(program id, program name) of each BPF filter on an interface's ingress."""
    # pyroute2 0.9 does not decode TCA_BPF_ID, so read tc's own rendering.
    where = ["-n", name] if name is not None else []
    res = subprocess.run(["tc", *where, "filter", "show", "dev", ifname, "ingress"],
                         capture_output=True, text=True, timeout=10)
    return [(int(m.group(1)), m.group(2)) for m in _TC_PROG_RE.finditer(res.stdout)]


_TC_PROG_RE = re.compile(r"\bid (\d+) name (\S+)")


# Counters.


def link_stats(name: str | None, ifname: str) -> dict[str, int]:
    """Kernel interface counters (rx_packets, tx_packets, rx_dropped, ...)."""
    with iproute(name) as ipr:
        msg = ipr.get_links(index(ipr, name, ifname))[0]
        stats = msg.get("IFLA_STATS64") or msg.get("IFLA_STATS") or {}
        return {k: int(v) for k, v in dict(stats).items() if isinstance(v, int)}
