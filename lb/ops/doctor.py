"""`lbctl doctor` on a real host: check an xlb LB or backend hop by hop, name what drops.

"It runs but does not forward" has a handful of causes on an XDP load balancer with direct
server return, each invisible from the LB alone: a veth peer without an XDP program (native
XDP_TX frames vanish), checksum offload on a sender (backends drop bad checksums), a gateway
MAC that is not the router's, links without room for the outer header, rp_filter on the
asymmetric return path, a backend without decapsulation or without the VIP on `lo`. The
doctor reads the configuration of every hop (links, programs, routes, sysctls, offloads,
pinned maps) and, in a lab, sends a few probes through every VIP while it watches the
counters of each hop, so the first hop whose counters stop moving is the one it names.

This module holds the findings, the checks of one hop, and the checks of a real host:

    lbctl doctor [--config FILE]       this host, from the xlb settings (interface, pins, ...)
    lbctl doctor --backend --vip ADDR  this host as a backend (decap or tunnel, VIP on lo, ARP,
                                       rp_filter on tunnel devices, checksum errors)

On a real host nothing can be probed end to end, so the doctor watches the counters instead:
it reads the data plane's own (glob_stats: every drop has a named slot), the interface's
(`ethtool -S`: the driver's XDP errors such as xdp_tx_errors; the kernel's link statistics,
/sys/class/net/IF/statistics, through netlink: rx/tx dropped and errors) and, on a backend,
the decap program's (decap_stats), twice `interval` seconds apart, and fails the hop whose
drop counters grow, with the reason its slot names. With interval 0 it reports the totals
since the maps were created (warnings: they may be old).

A lab (`lbctl doctor --lab`) is checked by lb.lab.doctor with the same building blocks; the
command line is lbctl.doctor's. Pinned maps are read with raw bpf(2) (lb.dataplane.mapio): the
doctor needs no compiler and no daemon.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lb.consts import GLOB_STATS
from lb.dataplane import netlink, netns
from lb.dataplane.loader import is_bpffs
from lb.dataplane.mapio import pinned_counters, pinned_decap_has, pinned_gateway_mac
from lb.errors import XlbError

Status = Literal["ok", "warn", "fail"]

BALANCER_PROG = "xdp_balancer"
# The XDP chain's root (docs/chain.md): the balancer runs behind it.
ROOT_PROG = "xdp_root"
DECAP_PROGS = ("tc_decap", "xdp_decap")
# Largest outer header the balancer adds (IPv6); GUE adds a few more but uses its own check.
ENCAP_OVERHEAD = 40
ETH_HLEN = 14
VETH_NATIVE_MAX_MTU = 3506
BPFFS = Path("/sys/fs/bpf")


@dataclass(frozen=True)
class Finding:
    """One check's outcome at one hop."""

    status: Status
    hop: str
    check: str
    detail: str
    fix: str = ""


@dataclass
class Report:
    """Every finding of one doctor run, in the order of the path."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, status: Status, hop: str, check: str, detail: str, fix: str = "") -> None:
        """Record one finding."""
        self.findings.append(Finding(status, hop, check, detail, fix))

    def ok(self, hop: str, check: str, detail: str) -> None:
        """Record a passed check."""
        self.add("ok", hop, check, detail)

    def fail(self, hop: str, check: str, detail: str, fix: str = "") -> None:
        """Record a failed check and how to fix it."""
        self.add("fail", hop, check, detail, fix)

    def warn(self, hop: str, check: str, detail: str, fix: str = "") -> None:
        """Record something suspicious that does not stop forwarding by itself."""
        self.add("warn", hop, check, detail, fix)

    @property
    def failed(self) -> list[Finding]:
        """The failed checks."""
        return [f for f in self.findings if f.status == "fail"]

    def render(self, *, verbose: bool = True) -> str:
        """Text for people: one line per finding, fixes indented below."""
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        lines = []
        for f in self.findings:
            if f.status == "ok" and not verbose:
                continue
            lines.append(f"[{mark[f.status]}] {f.hop:<16} {f.check}: {f.detail}")
            if f.fix:
                lines.append(f"{'':24}fix: {f.fix}")
        counts = Counter(f.status for f in self.findings)
        lines.append(f"\n{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failed")
        if self.failed:
            first = self.failed[0]
            lines.append(f"first failing hop: {first.hop} ({first.check})")
        return "\n".join(lines)


# Building blocks shared by lab and host checks.


def rp_filter(ns: str | None, ifname: str) -> int:
    # The kernel uses the larger of the "all" and the per-interface value.
    all_ = int(netns.get_sysctl(ns, "net.ipv4.conf.all.rp_filter"))
    one = int(netns.get_sysctl(ns, f"net.ipv4.conf.{ifname}.rp_filter"))
    return max(all_, one)


def check_xdp_peer(r: Report, hop: str, ns: str | None, ifname: str, peer_ns: str | None,
                   peer_if: str,
                   mode: str | None) -> None:
    """Native XDP_TX out of a veth needs an XDP program on its peer (XDP_PASS is enough)."""
    peer = netlink.link_info(peer_ns, peer_if)
    if mode != "native":
        r.ok(hop, "XDP on the veth peer", f"not needed ({mode or 'no'} XDP on {ifname})")
    elif peer.xdp_prog_id is None:
        r.fail(hop, "XDP on the veth peer",
               f"{peer_if} has no XDP program, so native XDP_TX frames from {ifname} are "
               f"dropped (ethtool -S {ifname}: xdp_tx_errors)",
               f"attach an XDP_PASS program to {peer_if} (python -c 'from lb.dataplane import"
               f" netlink; netlink.attach_xdp_pass(\"{peer_ns}\", \"{peer_if}\")'), or use"
               " generic mode")
    else:
        r.ok(hop, "XDP on the veth peer",
             f"{peer_if} runs {peer.xdp_prog_name} ({peer.xdp_mode}) for native XDP_TX")
    if mode == "native" and peer.mtu > VETH_NATIVE_MAX_MTU:
        r.fail(hop, "veth MTU for native XDP",
               f"peer {peer_if} MTU {peer.mtu} > {VETH_NATIVE_MAX_MTU}: native XDP is refused",
               f"ip link set {peer_if} mtu {VETH_NATIVE_MAX_MTU} (or less)")


def check_balancer_attach(r: Report, hop: str, ns: str | None, ifname: str,
                          want_mode: str | None) -> str | None:
    """The balancer is attached, by its name, in the expected mode; returns the mode."""
    li = netlink.link_info(ns, ifname)
    if not li.up:
        r.fail(hop, "link state", f"{ifname} is down", f"ip link set {ifname} up")
    if li.xdp_prog_id is None:
        r.fail(hop, "XDP program", f"nothing attached to {ifname}: packets go to the stack",
               "start the daemon (lbctl serve) or check its log")
        return None
    name = li.xdp_prog_name
    if name not in (BALANCER_PROG, ROOT_PROG):
        r.fail(hop, "XDP program", f"{ifname} runs {name!r} (id {li.xdp_prog_id}), "
               f"not {BALANCER_PROG}", "detach it, or set replace_foreign")
        return li.xdp_mode
    detail = f"{name} id {li.xdp_prog_id} in {li.xdp_mode} mode"
    if name == ROOT_PROG:
        detail += " (the XDP chain: filters, then the balancer)"
    if want_mode in ("native", "generic") and li.xdp_mode != want_mode:
        r.warn(hop, "XDP program", f"{detail}, configured {want_mode}",
               "restart the daemon after detaching (modes cannot be switched atomically)")
    else:
        r.ok(hop, "XDP program", detail)
    return li.xdp_mode


def check_gateway_mac(r: Report, hop: str, lb_cfg: Path, router_mac: str,
                      router_desc: str) -> None:
    """The MAC the balancer writes into every encapsulated frame is the router's."""
    try:
        mac = pinned_gateway_mac(lb_cfg)
    except XlbError as e:
        r.warn(hop, "gateway MAC", f"cannot read {lb_cfg}: {e.detail}")
        return
    if mac is None or mac == "00:00:00:00:00:00":
        r.fail(hop, "gateway MAC", "lb_cfg holds no gateway MAC: encapsulated frames have no "
               "next hop", "set runtime.gateway_mac, or give the interface a default route")
    elif mac != router_mac.lower():
        r.fail(hop, "gateway MAC", f"encapsulated frames go to {mac}, but {router_desc} is "
               f"{router_mac}: the router ignores them",
               f"set runtime.gateway_mac = \"{router_mac}\" and restart the daemon")
    else:
        r.ok(hop, "gateway MAC", f"encapsulated frames go to {mac} ({router_desc})")


def check_mtu(r: Report, hop: str, ns: str | None, ifname: str, *, inner_mtu: int,
              max_frame: int | None) -> None:
    """The link carrying encapsulated frames has room for the outer header."""
    mtu = netlink.link_info(ns, ifname).mtu
    need = inner_mtu + ENCAP_OVERHEAD
    if mtu < need:
        r.fail(hop, "MTU", f"{ifname} MTU {mtu} < {need} (client MTU {inner_mtu} + "
               f"{ENCAP_OVERHEAD} outer): full-size packets are dropped once encapsulated",
               f"ip link set {ifname} mtu {need} on every hop to the backends, or clamp the "
               f"clients' MSS")
    else:
        r.ok(hop, "MTU", f"{ifname} MTU {mtu} leaves room for the outer header")
    if max_frame:
        if max_frame > mtu + ETH_HLEN:
            r.fail(hop, "max frame", f"max_frame {max_frame} > MTU {mtu} + {ETH_HLEN}: larger "
                   "frames are dropped on the way out (err -90, EMSGSIZE)",
                   f"runtime.max_frame = {mtu + ETH_HLEN}")
        elif max_frame < need + ETH_HLEN:
            r.warn(hop, "max frame", f"max_frame {max_frame}: full-size client packets get "
                   "ICMP too-big and shrink (path MTU), costing a round trip",
                   f"runtime.max_frame = {need + ETH_HLEN} if the path allows")


def check_backend(r: Report, hop: str, ns: str | None, ifname: str, *, own: list[str],
                  vips: list[str], decap_pins: Path | None) -> None:
    """A DSR backend: decapsulation, VIP on lo, ARP settings, checksum errors."""
    li = netlink.link_info(ns, ifname)
    if not li.up:
        r.fail(hop, "link state", f"{ifname} is down", f"ip link set {ifname} up")
    tc = netlink.tc_ingress_progs(ns, ifname)
    names = [n for _, n in tc] + ([li.xdp_prog_name] if li.xdp_prog_id else [])
    tunnels = [x.ifname for x in netlink.links(ns) if x.kind in ("ipip", "ip6tnl", "fou")]
    if any(n in DECAP_PROGS for n in names):
        r.ok(hop, "decapsulation", f"{', '.join(n for n in names if n in DECAP_PROGS)} "
             f"on {ifname}")
    elif tunnels:
        r.ok(hop, "decapsulation", f"tunnel device {', '.join(tunnels)}")
        for t in tunnels:
            # The inner packet appears on the tunnel device; the route back to the client
            # leaves by the uplink, so strict reverse-path filtering drops it.
            if rp_filter(ns, t) == 1:
                r.fail(hop, "rp_filter", f"strict rp_filter on {t}: decapsulated packets "
                       "arrive there but the client is routed elsewhere, so they are dropped",
                       f"sysctl net.ipv4.conf.{t}.rp_filter=0 net.ipv4.conf.all.rp_filter=0")
    else:
        r.fail(hop, "decapsulation", f"no decap program on {ifname} and no tunnel device: "
               "encapsulated packets reach the stack as IPIP and are dropped",
               "attach xdp/decap/decap.c (lb/dataplane/decap.py: tc ingress or XDP), or create "
               "an ipip/ip6tnl device where the kernel has one")
    if decap_pins is not None and (decap_pins / "decap_addrs").exists():
        missing = [a for a in own
                   if not pinned_decap_has(decap_pins / "decap_addrs", ipaddress.ip_address(a))]
        if missing:
            r.fail(hop, "decap addresses", f"{', '.join(missing)} not in decap_addrs: packets "
                   "to it pass undecapsulated (DECAP_STAT_PASS_NOT_LOCAL)",
                   "Decap.add_local(<backend address>)")
        else:
            r.ok(hop, "decap addresses", f"decapsulates for {', '.join(own)}")
    lo = netlink.addresses(ns, "lo")
    lo_ips = {a.split("/")[0] for a in lo}
    missing_vips = [v for v in vips if v not in lo_ips]
    if missing_vips:
        r.fail(hop, "VIP on lo", f"{', '.join(missing_vips)} not on lo: the decapsulated "
               "packet is not for this host and is dropped",
               f"ip addr add {missing_vips[0]}/{32 if ':' not in missing_vips[0] else 128} "
               "dev lo")
    elif vips:
        r.ok(hop, "VIP on lo", ", ".join(vips))
    if not netlink.link_info(ns, "lo").up:
        r.fail(hop, "VIP on lo", "lo is down: its addresses are not local", "ip link set lo up")
    ignore = int(netns.get_sysctl(ns, "net.ipv4.conf.all.arp_ignore"))
    announce = int(netns.get_sysctl(ns, "net.ipv4.conf.all.arp_announce"))
    if ignore < 1 or announce < 2:
        r.warn(hop, "ARP for the VIP", f"arp_ignore={ignore} arp_announce={announce}: the "
               "backend may answer ARP for the VIP and steal it from the LB",
               "sysctl net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2")
    else:
        r.ok(hop, "ARP for the VIP", "arp_ignore=1, arp_announce=2")
    s = netns.snmp(ns)
    bad = {k: s.get(k, 0) for k in ("TcpInCsumErrors", "UdpInCsumErrors", "Udp6InCsumErrors")}
    if any(bad.values()):
        r.warn(hop, "checksums", "packets with bad checksums arrived so far ("
               + ", ".join(f"{k} {v}" for k, v in bad.items() if v) + "): a sender with tx "
               "checksum offload behind native XDP", "ethtool -K <client-side if> tx off")


# Counters: what drops, read twice.

#: Data-plane drop slots (glob_stats) -> what drops there and what to look at.
DROP_REASONS: dict[str, tuple[str, str]] = {
    "STAT_MALFORMED": ("malformed packets to a VIP (bad IP header or ICMP error)",
                       "capture on the interface: tcpdump -ni IF dst <vip>"),
    "STAT_FRAG": ("IP fragments to a VIP (no ports to hash them by)",
                  "clients fragment: check the path MTU and the MSS they are offered"),
    "STAT_IP_OPTIONS": ("IPv4 packets with options to a VIP", "nothing to fix in xlb: "
                        "options are refused by design (as Katran)"),
    "STAT_NO_BACKEND": ("packets to a VIP without a usable backend",
                        "lbctl backend list <vip>; lbctl health status"),
    "STAT_ENCAP_FAIL": ("packets that could not be encapsulated (no headroom, or an IPv6 "
                        "client to an IPv4-only backend)", "lbctl vip get <vip>: backends' "
                        "families"),
    "STAT_TOO_BIG": ("frames over max_frame after encapsulation (answered with ICMP too big)",
                     "raise the interface MTU or the runtime max_frame, or lower the MSS"),
}
DECAP_DROPS: dict[str, tuple[str, str]] = {
    "DECAP_STAT_DROP_MALFORMED": ("malformed tunnel packets", "capture on the interface"),
    "DECAP_STAT_DROP_ADJUST": ("the kernel refused to strip the outer header",
                               "try the other decap mode (tc or xdp)"),
    "DECAP_STAT_PASS_NOT_LOCAL": ("tunnel packets to an address decap does not know: they "
                                  "reach the stack still encapsulated and are dropped",
                                  "lbctl backend-host up again (it registers the interface's "
                                  "addresses)"),
}


def _is_xdp_error(name: str) -> bool:
    # veth: rx_queue_0_xdp_tx_errors, tx_queue_0_xdp_xmit_errors; mlx5: rx_xdp_tx_err, ...
    n = name.lower()
    return "xdp" in n and ("err" in n or "fail" in n)


@dataclass(frozen=True)
class Sample:
    """Counters of one hop at one moment."""

    at: float
    dataplane: dict[str, int]
    xdp_errors: dict[str, int]
    link: dict[str, int]


LINK_DROPS = ("rx_dropped", "tx_dropped", "rx_errors", "tx_errors")


def sample(ns: str | None, ifname: str, stats_map: Path | None,
           names: tuple[str, ...]) -> Sample:
    """Read the pinned counters (if any), `ethtool -S` XDP errors and link statistics."""
    dp: dict[str, int] = {}
    if stats_map is not None and stats_map.exists():
        try:
            dp = pinned_counters(stats_map, names)
        except XlbError:
            dp = {}
    try:
        eth = {k: v for k, v in netns.ethtool_stats(ns, ifname).items() if _is_xdp_error(k)}
    except (OSError, XlbError):
        eth = {}
    link = {k: v for k, v in netlink.link_stats(ns, ifname).items() if k in LINK_DROPS}
    return Sample(time.monotonic(), dp, eth, link)


def check_counters(r: Report, hop: str, ifname: str, before: Sample, after: Sample | None,
                   reasons: dict[str, tuple[str, str]]) -> None:
    """Fail the hop for each drop counter that grew between the samples (with no second
    sample: warn about every non-zero total)."""
    def delta(a: dict[str, int], b: dict[str, int] | None) -> dict[str, int]:
        if b is None:
            return {k: v for k, v in a.items() if v}
        return {k: b.get(k, 0) - v for k, v in a.items() if b.get(k, 0) > v}

    grew = after is not None
    report: Callable[..., None] = r.fail if grew else r.warn
    span = f" in {after.at - before.at:.1f} s" if after is not None else " since the maps were made"
    dp = delta(before.dataplane, after.dataplane if after else None)
    for slot, n in dp.items():
        if slot in reasons:
            what, fix = reasons[slot]
            report(hop, f"drops {slot}", f"{n} {what}{span}", fix)
    eth = delta(before.xdp_errors, after.xdp_errors if after else None)
    if eth:
        report(hop, "XDP errors (ethtool -S)",
               ", ".join(f"{k} +{v}" for k, v in eth.items()) + f"{span}: the driver dropped "
               "frames the program sent", "on a veth the peer needs an XDP program for native "
               "XDP_TX; else frames over the MTU (ip link show " + ifname + ")")
    link = delta(before.link, after.link if after else None)
    if link:
        r.warn(hop, "interface drops", ", ".join(f"{k} +{v}" for k, v in link.items()) + span,
               f"ip -s link show {ifname}")
    if not (dp.keys() & reasons.keys()) and not eth:
        counted = "growing" if grew else "counted"
        r.ok(hop, "drop counters", f"no drops {counted}{span}")


# A real host: the LB side from the xlb settings.


def check_host(config: str | None = None, netns_name: str | None = None,
               interval: float = 1.0) -> Report:
    """Checks of this host as an xlb LB, from its settings (interface, namespace, pins)."""
    from lb.settings import load_settings

    r = Report()
    try:
        s = load_settings(config, **({"netns": netns_name} if netns_name else {}))
    except XlbError as e:
        r.fail("settings", "configuration", e.detail)
        return r
    if not is_bpffs(BPFFS):
        r.fail("host", "bpffs", "/sys/fs/bpf is not a bpf filesystem: pins cannot persist",
               "mount -t bpf bpf /sys/fs/bpf")
    else:
        r.ok("host", "bpffs", "mounted")
    if s.interface is None:
        r.warn("host", "interface", "no interface configured: nothing attached",
               "set interface (XLB_INTERFACE)")
        return r
    ns = name = s.netns
    hop = f"LB {s.interface}"
    mode = check_balancer_attach(r, hop, name, s.interface, s.xdp_mode)
    li = netlink.link_info(name, s.interface)
    if li.kind == "veth" and mode == "native":
        r.warn(hop, "XDP on the veth peer", f"{s.interface} is a veth: its peer needs an XDP "
               "program for native XDP_TX (check it where the peer lives)")
    lb_cfg = s.pin_dir / "lb_cfg"
    if lb_cfg.exists():
        from lb.dataplane import attach as xdp

        try:
            gw = xdp.resolve_gateway_mac(s.interface, netns=ns)
            check_gateway_mac(r, hop, lb_cfg, gw, "the default router's neighbour entry")
        except XlbError as e:
            r.warn(hop, "gateway MAC", e.detail)
    else:
        r.warn(hop, "pins", f"{lb_cfg} missing: the daemon never ran with pin_dir {s.pin_dir}")
    check_mtu(r, hop, name, s.interface, inner_mtu=1500, max_frame=s.runtime.max_frame)
    _watch(r, hop, name, s.interface, s.pin_dir / "glob_stats", GLOB_STATS, DROP_REASONS,
           interval)
    return r


def _watch(r: Report, hop: str, ns: str | None, ifname: str, stats_map: Path,
           names: tuple[str, ...], reasons: dict[str, tuple[str, str]], interval: float) -> None:
    if not stats_map.exists():
        r.warn(hop, "drop counters", f"{stats_map} missing: no data-plane counters to read")
    before = sample(ns, ifname, stats_map, names)
    after = None
    if interval > 0:
        time.sleep(interval)
        after = sample(ns, ifname, stats_map, names)
    check_counters(r, hop, ifname, before, after, reasons)


def check_backend_host(vips: list[str], interface: str | None = None,
                       ns: str | None = None, decap_pins: Path | None = None,
                       interval: float = 1.0) -> Report:
    """Checks of this host (or namespace) as a DSR backend of the given VIPs."""
    r = Report()
    if interface is None:
        rt = netlink.route_get(ns, "198.18.0.1")
        interface = rt.get("oif")
        if not interface:
            r.fail("backend", "uplink", "no default route: give --interface",
                   "ip route add default via <router>")
            return r
    own = [a.split("/")[0] for a in netlink.addresses(ns, interface)
           if not ipaddress.ip_address(a.split("/")[0]).is_link_local]
    if decap_pins is None:
        from lb.install.layout import BACKEND_PIN_DIR

        # Where `lbctl backend-host up` pins them.
        if (BACKEND_PIN_DIR / interface / "decap_stats").exists():
            decap_pins = BACKEND_PIN_DIR / interface
    check_backend(r, f"backend {interface}", ns, interface, own=own, vips=vips,
                  decap_pins=decap_pins)
    if decap_pins is not None:
        from lb.dataplane.decap import DECAP_STATS

        _watch(r, f"backend {interface}", ns, interface, decap_pins / "decap_stats",
               DECAP_STATS, DECAP_DROPS, interval)
    return r
