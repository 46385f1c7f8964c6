"""Attach, replace and detach the balancer's XDP program with pyroute2 (netlink).

One of the few modules that imports `pyroute2`; netlink errors are translated here. Rules:

- Native, generic or auto mode. Auto tries native and falls back to generic, and says why.
- A program already attached is replaced atomically in the mode it runs in
  (IFLA_XDP_EXPECTED_FD + XDP_FLAGS_REPLACE, so a concurrent change fails instead of being
  overwritten). The kernel swaps the program pointer: no packet sees "no program".
- A program that is not ours (its kernel name is not `xdp_balancer`) is only replaced with
  `replace_foreign=True`, and only ours is detached unless told otherwise.
- Everything works in a named network namespace: `IPRoute(netns=name, flags=0)`, where
  flags=0 makes a misspelt name fail instead of silently creating a namespace.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from lb.dataplane.loader import Balancer, prog_fd_by_id, prog_info_by_id
from lb.errors import Conflict, ForeignProgram, InvalidInput, KernelError

# Flags of IFLA_XDP_FLAGS (include/uapi/linux/if_link.h), named as there.
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

Mode = Literal["native", "generic"]
RequestedMode = Literal["native", "generic", "auto"]

PROGRAM_NAME = Balancer.PROGRAM
_MODE_FLAGS: dict[str, int] = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
# pyroute2 decodes IFLA_XDP_ATTACHED to these strings.
_ATTACHED: dict[str, str] = {
    "xdp": "native",
    "xdpgeneric": "generic",
    "xdpoffload": "offload",
    "xdpmulti": "multi",
}
_ERRNO_HINTS = {
    errno.ERANGE: "on veth: the peer's MTU is above the native XDP limit (3506)",
    errno.EOPNOTSUPP: "the driver has no native XDP support",
    errno.EPERM: "needs root (CAP_NET_ADMIN)",
}


@dataclass(frozen=True)
class XdpState:
    """What netlink reports attached to one interface."""

    interface: str
    netns: str | None
    ifindex: int
    prog_id: int | None
    mode: str | None
    prog_name: str | None

    @property
    def ours(self) -> bool:
        """True when the attached program is an xlb balancer."""
        return self.prog_name == PROGRAM_NAME


@dataclass(frozen=True)
class AttachInfo:
    """What an attach did: the program in effect, its mode and why that mode."""

    interface: str
    netns: str | None
    ifindex: int
    mode: Mode
    prog_id: int
    reason: str
    replaced_prog_id: int | None = None


def _where(interface: str, netns: str | None) -> str:
    return f"{interface} (netns {netns})" if netns else interface


@contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    from pyroute2 import IPRoute

    missing = InvalidInput(
        f"network namespace {netns!r} does not exist (no /run/netns/{netns})", field="netns"
    )
    # Checked first because pyroute2 0.9 leaks a socket when the namespace is missing.
    if netns and not os.path.exists(f"/run/netns/{netns}"):
        raise missing
    try:
        # ext_ack: the kernel's own words ("veth: Peer MTU is too large to set XDP").
        ipr = IPRoute(netns=netns, flags=0, ext_ack=True) if netns else IPRoute(ext_ack=True)
    except FileNotFoundError as e:
        raise missing from e
    try:
        yield ipr
    finally:
        ipr.close()


def _netlink_error(what: str, e: Exception) -> KernelError:
    code = int(getattr(e, "code", 0) or (e.args[0] if e.args else 0) or 0)
    text = e.args[1] if len(e.args) > 1 and e.args[1] else os.strerror(code)
    hint = _ERRNO_HINTS.get(code)
    return KernelError(f"{what}: {text} (errno {code}{'; ' + hint if hint else ''})")


def _index(ipr: Any, interface: str, netns: str | None) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise InvalidInput(f"no interface {_where(interface, netns)}", field="interface")
    return int(found[0])


def _query(ipr: Any, idx: int, interface: str, netns: str | None) -> XdpState:
    link = ipr.get_links(idx)[0]
    xdp = link.get_attr("IFLA_XDP")
    attached = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else None
    if not attached:
        return XdpState(interface, netns, idx, None, None, None)
    prog_id = (
        xdp.get_attr("IFLA_XDP_PROG_ID")
        or xdp.get_attr("IFLA_XDP_DRV_PROG_ID")
        or xdp.get_attr("IFLA_XDP_SKB_PROG_ID")
    )
    try:
        name: str | None = prog_info_by_id(int(prog_id)).name if prog_id else None
    except KernelError:
        # Detached between the two calls: report what netlink said.
        name = None
    return XdpState(
        interface, netns, idx, int(prog_id) if prog_id else None, _ATTACHED.get(attached), name
    )


def _set_xdp(
    ipr: Any, idx: int, fd: int, flags: int, what: str, *, expected_fd: int | None = None
) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd)]
    if expected_fd is not None:
        flags |= XDP_FLAGS_REPLACE
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    attrs.append(("IFLA_XDP_FLAGS", flags))
    try:
        ipr.link("set", index=idx, xdp={"attrs": attrs})
    except NetlinkError as e:
        raise _netlink_error(what, e) from e


def query(interface: str, *, netns: str | None = None) -> XdpState:
    """What is attached to `interface` (program id, mode, program name)."""
    with _ipr(netns) as ipr:
        return _query(ipr, _index(ipr, interface, netns), interface, netns)


def attach(
    prog_fd: int,
    interface: str,
    *,
    mode: RequestedMode = "auto",
    netns: str | None = None,
    replace_foreign: bool = False,
    expected_prog_id: int | None = None,
) -> AttachInfo:
    """Attach (or atomically replace) the XDP program on `interface`; returns what is in effect.

    With `expected_prog_id` (an upgrade), the program attached now must be that one.
    """
    where = _where(interface, netns)
    with _ipr(netns) as ipr:
        idx = _index(ipr, interface, netns)
        cur = _query(ipr, idx, interface, netns)
        replaced: int | None = None
        if expected_prog_id is not None and cur.prog_id != expected_prog_id:
            raise Conflict(
                f"{where} runs program id {cur.prog_id}, not id {expected_prog_id} as expected:"
                " someone changed it meanwhile; nothing was replaced",
                field="interface",
            )
        if cur.prog_id is not None:
            used, reason = _replace(ipr, prog_fd, cur, mode, replace_foreign)
            replaced = cur.prog_id
        elif mode == "auto":
            try:
                _set_xdp(ipr, idx, prog_fd, XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST,
                         f"attaching XDP to {where} in native mode")  # fmt: skip
                used, reason = "native", "auto: native mode accepted"
            except KernelError as e:
                _set_xdp(ipr, idx, prog_fd, XDP_FLAGS_SKB_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST,
                         f"attaching XDP to {where} in generic mode after native failed"
                         f" ({e.detail})")  # fmt: skip
                used, reason = "generic", f"auto: native refused ({e.detail}); fell back to generic"
        else:
            _set_xdp(ipr, idx, prog_fd, _MODE_FLAGS[mode] | XDP_FLAGS_UPDATE_IF_NOEXIST,
                     f"attaching XDP to {where} in {mode} mode")  # fmt: skip
            used, reason = mode, f"{mode} mode as configured"
        now = _query(ipr, idx, interface, netns)
    if now.prog_id is None or now.mode != used:
        raise KernelError(f"XDP on {where} is {now.mode} id {now.prog_id} after attaching {used}")
    return AttachInfo(interface, netns, idx, used, now.prog_id, reason, replaced)


def _replace(
    ipr: Any, prog_fd: int, cur: XdpState, mode: RequestedMode, replace_foreign: bool
) -> tuple[Mode, str]:
    where = _where(cur.interface, cur.netns)
    assert cur.prog_id is not None
    if not cur.ours and not replace_foreign:
        raise ForeignProgram(
            f"{where} already runs XDP program {cur.prog_name!r} (id {cur.prog_id},"
            f" {cur.mode} mode), which is not xlb's: detach it, or set replace_foreign",
            field="interface",
        )
    if cur.mode not in _MODE_FLAGS:
        raise Conflict(
            f"{where} has XDP attached in {cur.mode} mode (id {cur.prog_id}); xlb only replaces"
            " a native or generic program: detach it first",
            field="interface",
        )
    if mode != "auto" and mode != cur.mode:
        raise Conflict(
            f"{where} runs program id {cur.prog_id} in {cur.mode} mode and {mode} mode was asked;"
            " the kernel cannot switch modes atomically: detach first (traffic stops until the"
            " new attach), or keep xdp_mode auto/" + str(cur.mode),
            field="xdp_mode",
        )
    used: Mode = "native" if cur.mode == "native" else "generic"
    expected = prog_fd_by_id(cur.prog_id)
    try:
        _set_xdp(ipr, cur.ifindex, prog_fd, _MODE_FLAGS[used],
                 f"replacing XDP program id {cur.prog_id} on {where}",
                 expected_fd=expected)  # fmt: skip
    finally:
        os.close(expected)
    whose = "our" if cur.ours else f"foreign ({cur.prog_name!r}, replace_foreign)"
    return used, f"atomically replaced {whose} program id {cur.prog_id} in its {used} mode"


def detach(
    interface: str, *, netns: str | None = None, only_ours: bool = True
) -> XdpState | None:
    """Remove the XDP program from `interface`; returns what was removed (None if nothing)."""
    where = _where(interface, netns)
    with _ipr(netns) as ipr:
        idx = _index(ipr, interface, netns)
        cur = _query(ipr, idx, interface, netns)
        if cur.prog_id is None:
            return None
        if only_ours and not cur.ours:
            raise ForeignProgram(
                f"{where} runs XDP program {cur.prog_name!r} (id {cur.prog_id}), not xlb's:"
                " not detaching it",
                field="interface",
            )
        flags = _MODE_FLAGS.get(cur.mode or "", 0)
        expected = prog_fd_by_id(cur.prog_id)
        try:
            # Expect the program we looked at, so a concurrent upgrade is not undone.
            _set_xdp(ipr, idx, -1, flags, f"detaching XDP program id {cur.prog_id} from {where}",
                     expected_fd=expected)  # fmt: skip
        finally:
            os.close(expected)
        return cur


@contextmanager
def attached(
    prog_fd: int,
    interface: str,
    *,
    mode: RequestedMode = "auto",
    netns: str | None = None,
    replace_foreign: bool = False,
) -> Iterator[AttachInfo]:
    """Attach for the duration of a `with` block; detaches (ours only) on the way out."""
    info = attach(prog_fd, interface, mode=mode, netns=netns, replace_foreign=replace_foreign)
    try:
        yield info
    finally:
        detach(interface, netns=netns)


# --- gateway MAC ---------------------------------------------------------------------------

_NUD_INCOMPLETE = 0x01
_NUD_FAILED = 0x20
_RT_TABLE_MAIN = 254


def resolve_gateway_mac(interface: str, *, netns: str | None = None) -> str:
    """MAC of the default router out of `interface` (its neighbour entry), as aa:bb:..."""
    where = _where(interface, netns)
    how = "or set runtime.gateway_mac (XLB_RUNTIME__GATEWAY_MAC)"
    with _ipr(netns) as ipr:
        idx = _index(ipr, interface, netns)
        gateways: list[tuple[int, str]] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=family, table=_RT_TABLE_MAIN):
                if r["dst_len"] == 0 and r.get_attr("RTA_OIF") == idx:
                    gw = r.get_attr("RTA_GATEWAY")
                    if gw:
                        gateways.append((family, gw))
        if not gateways:
            raise InvalidInput(
                f"cannot resolve the gateway MAC: no default route with a gateway out of {where}"
                f" (add one: ip route add default via <router> dev {interface}) {how}",
                field="runtime.gateway_mac",
            )
        for fam, gw in gateways:
            for n in ipr.get_neighbours(family=fam, ifindex=idx, dst=gw):
                mac = n.get_attr("NDA_LLADDR")
                if mac and not n["state"] & (_NUD_INCOMPLETE | _NUD_FAILED):
                    return str(mac).lower()
        gw_list = ", ".join(gw for _, gw in gateways)
        raise InvalidInput(
            f"cannot resolve the gateway MAC: the default router {gw_list} on {where} has no"
            f" neighbour entry yet (ping it once, or ip neigh add {gateways[0][1]} lladdr <mac>"
            f" dev {interface}) {how}",
            field="runtime.gateway_mac",
        )
