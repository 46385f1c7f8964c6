"""`lbctl backend-host up|down|status`: a host (or namespace) made a DSR backend of some VIPs.

up, on interface IF:
  * the decap program (xdp/decap/decap.c) on IF, tc ingress or XDP, decapsulating tunnel
    packets to IF's own addresses; its maps pinned in <pin_root>/<IF> (counters survive);
  * each VIP on `lo` (/32 or /128), so the kernel accepts the inner packet and the server
    answers from the VIP (direct server return);
  * net.ipv4.conf.{all,IF}.arp_ignore=1 and arp_announce=2, so the host never answers ARP
    for a VIP (the balancer owns it on the wire), and rp_filter=2 (loose) on all and IF: the
    decapsulated packet's source is a client the strict check would reject where routes are
    asymmetric.
Every change is recorded in <state_dir>/<IF>.json before it is made, with the previous
sysctl values; `down` undoes each recorded change (detach, unpin, addresses, sysctls in
their old values). `up` over an earlier `up` (a crash, a reboot that kept the state file)
first undoes what that one recorded. Errors are one line naming what is wrong.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lb.dataplane import netlink, netns
from lb.errors import Conflict, InvalidInput, KernelError, NotFound
from lb.install import layout

Mode = Literal["tc", "xdp"]
TC_NAME = "tc_decap"
XDP_NAME = "xdp_decap"


def sysctls_for(interface: str) -> dict[str, int]:
    """The sysctls `up` sets, and their values (rp_filter only ever loosened: strict 1
    becomes loose 2, off stays off)."""
    # XXX: an interface name with a dot (eth0.100) is a sysctl path with a slash
    # (net/ipv4/conf/eth0/100); VLAN interfaces are not handled yet.
    out: dict[str, int] = {}
    for scope in ("all", interface):
        out[f"net.ipv4.conf.{scope}.arp_ignore"] = 1
        out[f"net.ipv4.conf.{scope}.arp_announce"] = 2
        out[f"net.ipv4.conf.{scope}.rp_filter"] = 2
    return out


def _wanted(key: str, value: int, current: str) -> int | None:
    """The value `up` writes for `key` (None: leave it)."""
    if key.endswith(".rp_filter"):
        return value if current.strip() == "1" else None
    return None if current.strip() == str(value) else value


@dataclass
class BackendState:
    """What `up` changed on one interface (the state file)."""

    interface: str
    mode: Mode
    #: Informational: commands act in their own --netns (the same namespace seen from there).
    netns: str | None = None
    pin_dir: str = ""
    #: VIPs this `up` put on lo (those already there are not ours to remove).
    vips_added: list[str] = field(default_factory=list)
    vips: list[str] = field(default_factory=list)
    #: sysctl -> value before `up` changed it.
    sysctls_before: dict[str, str] = field(default_factory=dict)
    attached: bool = False
    decap_addrs: list[str] = field(default_factory=list)
    #: The XDP program's id once attached (its name needs CAP_SYS_ADMIN to read back).
    xdp_prog_id: int | None = None


@dataclass(frozen=True)
class BackendHost:
    """Where a backend's state and pins go (defaults: the installed layout)."""

    interface: str
    netns: str | None = None
    state_dir: Path = layout.BACKEND_STATE_DIR
    pin_root: Path = layout.BACKEND_PIN_DIR

    @property
    def state_file(self) -> Path:
        """<state_dir>/<interface>.json."""
        return self.state_dir / f"{self.interface}.json"

    @property
    def pin_dir(self) -> Path:
        """The decap maps' pins."""
        return self.pin_root / self.interface

    def load(self) -> BackendState | None:
        """The recorded state, or None."""
        try:
            return BackendState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            raise InvalidInput(f"state file {self.state_file} is unreadable: {e}") from None

    def save(self, st: BackendState) -> None:
        """Write the state file (atomically, 0600)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(st), f, indent=1)
        os.replace(tmp, self.state_file)


def _vip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidInput(f"--vip {text!r} is not an IP address", field="vip") from None
    if a.is_loopback or a.is_multicast or a.is_unspecified or a.is_link_local:
        raise InvalidInput(f"--vip {a} is not a usable VIP (loopback, multicast, link-local "
                           "or unspecified)", field="vip")
    return a


def _plen(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return 32 if a.version == 4 else 128


def _addresses_by_link(ns: str | None) -> dict[str, list[str]]:
    with netlink.iproute(ns) as ipr:
        names = {int(m["index"]): str(m.get("IFLA_IFNAME")) for m in ipr.get_links()}
        out: dict[str, list[str]] = {n: [] for n in names.values()}
        for a in ipr.get_addr():
            out.setdefault(names.get(int(a["index"]), "?"), []).append(str(a.get("IFA_ADDRESS")))
    return out


def _del_address(ns: str | None, ifname: str, addr: str, plen: int) -> None:
    with netlink.iproute(ns) as ipr, contextlib.suppress(Exception):
        ipr.addr("del", index=netlink.index(ipr, ns, ifname), address=addr, prefixlen=plen)


_TC_FILTER_RE = re.compile(r"\s(\S+) direct-action")


def tc_filter_names(ns: str | None, ifname: str) -> list[str]:
    """Names of the BPF filters on an interface's ingress, as the filters carry them
    (TCA_BPF_NAME): readable with CAP_NET_ADMIN, unlike the programs' own names, which tc
    looks up by id (CAP_SYS_ADMIN)."""
    res = netns.run(ns, ["tc", "filter", "show", "dev", ifname, "ingress"], check=False)
    return _TC_FILTER_RE.findall(res.stdout)


def _read_sysctl(ns: str | None, key: str) -> str | None:
    try:
        return netns.get_sysctl(ns, key)
    except FileNotFoundError:
        return None


def up(h: BackendHost, vips: list[str], mode: Mode = "tc") -> BackendState:
    """Make the interface a backend of `vips` (module doc); returns the recorded state."""
    if mode not in ("tc", "xdp"):
        raise InvalidInput(f"--mode must be tc or xdp, got {mode!r}", field="mode")
    if not vips:
        raise InvalidInput("give at least one --vip", field="vip")
    addrs = [_vip(v) for v in vips]
    info = netlink.link_info(h.netns, h.interface)  # "no interface X" if there is none
    by_link = _addresses_by_link(h.netns)
    # A VIP on another interface is a real address of this host: the balancer's VIP would
    # clash with it (and ARP would answer it).
    for a in addrs:
        for ifname, have in by_link.items():
            if ifname != "lo" and str(a) in have:
                raise Conflict(f"address {a} is in use on {netlink.where(ifname, h.netns)}: a "
                               "VIP must not be an address of an interface", field="vip")
    if h.load() is not None:
        down(h)
        by_link = _addresses_by_link(h.netns)
    if info.xdp_prog_id is not None:
        raise Conflict(f"{netlink.where(h.interface, h.netns)} already has an XDP program "
                       f"(id {info.xdp_prog_id}, {info.xdp_prog_name}): detach it first",
                       field="interface")
    foreign = tc_filter_names(h.netns, h.interface)
    if foreign:
        raise Conflict(f"{netlink.where(h.interface, h.netns)} already has tc ingress filters "
                       f"{', '.join(foreign)}: remove them first", field="interface")
    own = [a.split("/")[0] for a in netlink.addresses(h.netns, h.interface)]
    own = [a for a in own if not ipaddress.ip_address(a).is_link_local]
    if not own:
        raise InvalidInput(f"{netlink.where(h.interface, h.netns)} has no address: the balancer"
                           " encapsulates to the backend's address, give the interface one",
                           field="interface")
    st = BackendState(interface=h.interface, mode=mode, netns=h.netns, pin_dir=str(h.pin_dir),
                      vips=[str(a) for a in addrs], decap_addrs=own)
    writes: dict[str, int] = {}
    for key, value in sysctls_for(h.interface).items():
        current = _read_sysctl(h.netns, key)
        if current is not None and (w := _wanted(key, value, current)) is not None:
            st.sysctls_before[key] = current
            writes[key] = w
    h.save(st)
    try:
        netns.set_sysctls(h.netns, writes)
        for a in addrs:
            if str(a) not in by_link.get("lo", []):
                st.vips_added.append(str(a))
                h.save(st)
                netlink.add_address(h.netns, "lo", f"{a}/{_plen(a)}")
        _attach(h, st)
    except BaseException:
        down(h)
        raise
    return st


def _attach(h: BackendHost, st: BackendState) -> None:
    from lb.dataplane.decap import Decap

    h.pin_dir.parent.mkdir(parents=True, exist_ok=True)
    decap = Decap(pin_dir=h.pin_dir)
    try:
        for a in st.decap_addrs:
            decap.add_local(a)
        st.attached = True
        h.save(st)
        if st.mode == "xdp":
            try:
                netlink.xdp_attach(h.netns, h.interface, decap.xdp_fd, "native")
            except KernelError:
                netlink.xdp_attach(h.netns, h.interface, decap.xdp_fd, "generic")
            st.xdp_prog_id = netlink.link_info(h.netns, h.interface).xdp_prog_id
            h.save(st)
        else:
            netlink.tc_attach_ingress(h.netns, h.interface, decap.tc_fd, TC_NAME)
    finally:
        # The attachment holds the program; the pins hold the maps.
        decap.close()


def down(h: BackendHost) -> BackendState:
    """Undo what `up` recorded; NotFound when nothing was recorded for the interface."""
    st = h.load()
    if st is None:
        raise NotFound(f"backend-host is not up on {netlink.where(h.interface, h.netns)} "
                       f"(no {h.state_file})", field="interface")
    if st.attached:
        with contextlib.suppress(InvalidInput):  # the interface is gone: so is the program
            info = netlink.link_info(h.netns, st.interface)
            if st.mode == "xdp" and info.xdp_prog_id is not None \
                    and info.xdp_prog_id == st.xdp_prog_id:
                netlink.xdp_detach(h.netns, st.interface)
            elif st.mode == "tc" and TC_NAME in tc_filter_names(h.netns, st.interface):
                netlink.tc_detach(h.netns, st.interface)
    if st.pin_dir:
        shutil.rmtree(st.pin_dir, ignore_errors=True)
    for v in st.vips_added:
        _del_address(h.netns, "lo", v, _plen(ipaddress.ip_address(v)))
    if st.sysctls_before:
        netns.set_sysctls(h.netns, st.sysctls_before)
    h.state_file.unlink(missing_ok=True)
    return st


def status(h: BackendHost) -> dict[str, Any]:
    """The recorded state, what is live (program attached, VIPs on lo, sysctls) and the
    decap counters."""
    from lb.dataplane.decap import DECAP_STATS
    from lb.dataplane.mapio import pinned_counters

    st = h.load()
    if st is None:
        raise NotFound(f"backend-host is not up on {netlink.where(h.interface, h.netns)} "
                       f"(no {h.state_file})", field="interface")
    info = netlink.link_info(h.netns, st.interface)
    tc = tc_filter_names(h.netns, st.interface)
    on_lo = set(_addresses_by_link(h.netns).get("lo", []))
    counters: dict[str, int] = {}
    stats = Path(st.pin_dir) / "decap_stats"
    if stats.exists():
        counters = pinned_counters(stats, DECAP_STATS)
    return {
        "interface": st.interface, "netns": h.netns, "mode": st.mode,
        "attached": (info.xdp_prog_id is not None and info.xdp_prog_id == st.xdp_prog_id)
        if st.mode == "xdp" else TC_NAME in tc,
        "xdp_mode": info.xdp_mode,
        "vips": {v: v in on_lo for v in st.vips},
        "decap_addrs": st.decap_addrs,
        "sysctls": {k: _read_sysctl(h.netns, k) for k in sysctls_for(st.interface)},
        "sysctls_before": st.sysctls_before,
        "counters": counters,
    }
