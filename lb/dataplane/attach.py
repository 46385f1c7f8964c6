"""Attach, replace and detach the balancer's XDP program with pyroute2 (netlink).

The balancer's attach policy over lb.dataplane.netlink's primitives (one netlink socket
helper, one XDP set call, one table of mode names). Rules:

- Native, generic or auto mode. Auto tries native and falls back to generic, and says why.
- A program already attached is replaced atomically in the mode it runs in
  (IFLA_XDP_EXPECTED_FD + XDP_FLAGS_REPLACE, so a concurrent change fails instead of being
  overwritten). The kernel swaps the program pointer: no packet sees "no program".
- A program that is not ours (its kernel name is not `xdp_balancer`) is only replaced with
  `replace_foreign=True`, and only ours is detached unless told otherwise.
- Everything works in a named network namespace (netlink.iproute: a misspelt name fails
  instead of silently creating a namespace).
- Without CAP_SYS_ADMIN a program cannot be opened by id (BPF_PROG_GET_FD_BY_ID), so with a
  pin directory the attached program is also pinned there (PROG_PIN) and opened by path to
  tell that it is ours and to replace it atomically: a daemon with CAP_BPF and
  CAP_NET_ADMIN restarts and upgrades itself.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lb.dataplane import netlink
from lb.dataplane.loader import Balancer, obj_get, obj_pin, prog_fd_by_id, prog_info
from lb.dataplane.netlink import (
    ATTACHED_MODES,
    MODE_FLAGS,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    index,
    iproute,
    set_xdp,
)
from lb.errors import Conflict, ForeignProgram, InvalidInput, KernelError

Mode = Literal["native", "generic"]
RequestedMode = Literal["native", "generic", "auto"]

PROGRAM_NAME = Balancer.PROGRAM
# The attached balancer program's pin in the pin directory (beside the maps).
PROG_PIN = "prog_" + PROGRAM_NAME
# The root program of the XDP chain (lb.dataplane.chain) is ours too, pinned as ROOT_PIN.
ROOT_NAME = "xdp_root"
ROOT_PIN = "prog_" + ROOT_NAME
OUR_NAMES = frozenset({PROGRAM_NAME, ROOT_NAME})


def open_prog(prog_id: int, pin_dir: Path | None = None) -> int | None:
    """An fd of loaded program `prog_id` (the caller closes it): by id, which needs
    CAP_SYS_ADMIN, else through the program pin in `pin_dir` when the pin is that program
    (file permissions only). None when neither works (gone, or not ours without the
    capability)."""
    try:
        return prog_fd_by_id(prog_id)
    except KernelError:
        pass
    for name in (PROG_PIN, ROOT_PIN) if pin_dir is not None else ():
        assert pin_dir is not None
        path = pin_dir / name
        if not path.exists():
            continue
        fd = obj_get(path)
        if prog_info(fd).id == prog_id:
            return fd
        os.close(fd)
    return None


def pin_program(prog_fd: int, pin_dir: Path, name: str = PROG_PIN) -> None:
    """Make `prog_fd` the program pin `name` of `pin_dir` (replacing the previous one)."""
    path = pin_dir / name
    path.unlink(missing_ok=True)
    obj_pin(prog_fd, path)


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
        """True when the attached program is xlb's: the balancer, or the chain's root."""
        return self.prog_name in OUR_NAMES


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


def _query(
    ipr: Any, idx: int, interface: str, netns: str | None, pin_dir: Path | None = None
) -> XdpState:
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
    name: str | None = None
    fd = open_prog(int(prog_id), pin_dir) if prog_id else None
    if fd is not None:  # None: detached meanwhile, or not ours without CAP_SYS_ADMIN
        try:
            name = prog_info(fd).name
        finally:
            os.close(fd)
    return XdpState(
        interface, netns, idx, int(prog_id) if prog_id else None, ATTACHED_MODES.get(attached), name
    )


def query(
    interface: str, *, netns: str | None = None, pin_dir: Path | None = None
) -> XdpState:
    """What is attached to `interface` (program id, mode, program name)."""
    with iproute(netns) as ipr:
        return _query(ipr, index(ipr, netns, interface), interface, netns, pin_dir)


def attach(
    prog_fd: int,
    interface: str,
    *,
    mode: RequestedMode = "auto",
    netns: str | None = None,
    replace_foreign: bool = False,
    expected_prog_id: int | None = None,
    pin_dir: Path | None = None,
    pin_name: str = PROG_PIN,
) -> AttachInfo:
    """Attach (or atomically replace) the XDP program on `interface`; returns what is in effect.

    With `expected_prog_id` (an upgrade), the program attached now must be that one. With
    `pin_dir`, the program attached is pinned there as `pin_name` (PROG_PIN, or ROOT_PIN).
    """
    where = netlink.where(interface, netns)
    with iproute(netns) as ipr:
        idx = index(ipr, netns, interface)
        cur = _query(ipr, idx, interface, netns, pin_dir)
        replaced: int | None = None
        if expected_prog_id is not None and cur.prog_id != expected_prog_id:
            raise Conflict(
                f"{where} runs program id {cur.prog_id}, not id {expected_prog_id} as expected:"
                " someone changed it meanwhile; nothing was replaced",
                field="interface",
            )
        if cur.prog_id is not None:
            used, reason = _replace(ipr, prog_fd, cur, mode, replace_foreign, pin_dir)
            replaced = cur.prog_id
        elif mode == "auto":
            try:
                set_xdp(ipr, idx, prog_fd, XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST,
                         f"attaching XDP to {where} in native mode")  # fmt: skip
                used, reason = "native", "auto: native mode accepted"
            except KernelError as e:
                set_xdp(ipr, idx, prog_fd, XDP_FLAGS_SKB_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST,
                         f"attaching XDP to {where} in generic mode after native failed"
                         f" ({e.detail})")  # fmt: skip
                used, reason = "generic", f"auto: native refused ({e.detail}); fell back to generic"
        else:
            set_xdp(ipr, idx, prog_fd, MODE_FLAGS[mode] | XDP_FLAGS_UPDATE_IF_NOEXIST,
                     f"attaching XDP to {where} in {mode} mode")  # fmt: skip
            used, reason = mode, f"{mode} mode as configured"
        now = _query(ipr, idx, interface, netns)
    if now.prog_id is None or now.mode != used:
        raise KernelError(f"XDP on {where} is {now.mode} id {now.prog_id} after attaching {used}")
    if pin_dir is not None:
        pin_program(prog_fd, pin_dir, pin_name)
    return AttachInfo(interface, netns, idx, used, now.prog_id, reason, replaced)


def _replace(
    ipr: Any, prog_fd: int, cur: XdpState, mode: RequestedMode, replace_foreign: bool,
    pin_dir: Path | None,
) -> tuple[Mode, str]:  # fmt: skip
    where = netlink.where(cur.interface, cur.netns)
    assert cur.prog_id is not None
    if not cur.ours and not replace_foreign:
        raise ForeignProgram(
            f"{where} already runs XDP program {cur.prog_name!r} (id {cur.prog_id},"
            f" {cur.mode} mode), which is not xlb's: detach it, or set replace_foreign",
            field="interface",
        )
    if cur.mode not in MODE_FLAGS:
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
    # None: a foreign program without CAP_SYS_ADMIN, replaced without the expected-program
    # check (still one swap of the program pointer).
    expected = open_prog(cur.prog_id, pin_dir)
    try:
        set_xdp(ipr, cur.ifindex, prog_fd, MODE_FLAGS[used],
                 f"replacing XDP program id {cur.prog_id} on {where}",
                 expected_fd=expected)  # fmt: skip
    finally:
        if expected is not None:
            os.close(expected)
    whose = "our" if cur.ours else f"foreign ({cur.prog_name!r}, replace_foreign)"
    return used, f"atomically replaced {whose} program id {cur.prog_id} in its {used} mode"


def detach(
    interface: str, *, netns: str | None = None, only_ours: bool = True,
    pin_dir: Path | None = None,
) -> XdpState | None:  # fmt: skip
    """Remove the XDP program from `interface`; returns what was removed (None if nothing).
    With `pin_dir`, its program pins go too (they would keep the programs loaded)."""
    where = netlink.where(interface, netns)
    with iproute(netns) as ipr:
        idx = index(ipr, netns, interface)
        cur = _query(ipr, idx, interface, netns, pin_dir)
        if cur.prog_id is None:
            return None
        if only_ours and not cur.ours:
            raise ForeignProgram(
                f"{where} runs XDP program {cur.prog_name!r} (id {cur.prog_id}), not xlb's:"
                " not detaching it",
                field="interface",
            )
        flags = MODE_FLAGS.get(cur.mode or "", 0)
        expected = open_prog(cur.prog_id, pin_dir)
        try:
            # Expect the program we looked at, so a concurrent upgrade is not undone.
            set_xdp(ipr, idx, -1, flags, f"detaching XDP program id {cur.prog_id} from {where}",
                     expected_fd=expected)  # fmt: skip
        finally:
            if expected is not None:
                os.close(expected)
        if pin_dir is not None:
            for name in (PROG_PIN, ROOT_PIN):
                (pin_dir / name).unlink(missing_ok=True)
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
    where = netlink.where(interface, netns)
    how = "or set runtime.gateway_mac (XLB_RUNTIME__GATEWAY_MAC)"
    with iproute(netns) as ipr:
        idx = index(ipr, netns, interface)
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
