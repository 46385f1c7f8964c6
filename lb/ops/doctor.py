"""`lbctl doctor`: check an xlb lab or host hop by hop and name the hop that drops.

"It runs but does not forward" has a handful of causes on an XDP load balancer with direct
server return, each invisible from the LB alone: a veth peer without an XDP program (native
XDP_TX frames vanish), checksum offload on a sender (backends drop bad checksums), a gateway
MAC that is not the router's, links without room for the outer header, rp_filter on the
asymmetric return path, a backend without decapsulation or without the VIP on `lo`. The
doctor reads the configuration of every hop (links, programs, routes, sysctls, offloads,
pinned maps) and, in a lab, sends a few probes through every VIP while it watches the
counters of each hop, so the first hop whose counters stop moving is the one it names.

    lbctl doctor --lab [PREFIX]        a lab made by `lbctl lab up` (default prefix xlab)
    lbctl doctor [--config FILE]       this host, from the xlb settings (interface, pins, ...)
    lbctl doctor --backend --vip ADDR  this host as a backend (decap or tunnel, VIP on lo, ARP,
                                       rp_filter on tunnel devices, checksum errors)

Exit status: 0 when nothing failed, 1 when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lb.dataplane import bpf, netlink, netns
from lb.errors import KernelError, XlbError
from lb.lab import network as labmod
from lb.lab.network import Lab

Status = Literal["ok", "warn", "fail"]

BALANCER_PROG = "xdp_balancer"
DECAP_PROGS = ("tc_decap", "xdp_decap")
# Largest outer header the balancer adds (IPv6); GUE adds a few more but uses its own check.
ENCAP_OVERHEAD = 40
ETH_HLEN = 14
VETH_NATIVE_MAX_MTU = 3506
PROBES = 10
PROBE_TIMEOUT = 1.0


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


# Pinned maps, read with raw bpf(2): the doctor must not need a compiler or the daemon.

_PERCPU_MAP_TYPES = {5, 6, 10}  # percpu hash, percpu array, LRU percpu hash


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


@contextlib.contextmanager
def _pinned(path: Path) -> Iterator[tuple[int, Any]]:
    fd = bpf.obj_get(path)
    try:
        yield fd, bpf.map_info(fd)
    finally:
        os.close(fd)


def _lookup(fd: int, key: bytes, size: int) -> bytes | None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(size)
    attr = bpf.ElemAttr(map_fd=fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf))
    if bpf.bpf_errno(bpf.BPF_MAP_LOOKUP_ELEM, attr):
        return None
    return vbuf.raw


def pinned_counters(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """A per-CPU array of u64 counters, summed over CPUs, by slot name."""
    out: dict[str, int] = {}
    with _pinned(path) as (fd, info):
        percpu = info.type in _PERCPU_MAP_TYPES
        stride = (info.value_size + 7) // 8 * 8
        ncpu = _possible_cpus() if percpu else 1
        for i, name in enumerate(names[: info.max_entries]):
            raw = _lookup(fd, i.to_bytes(4, "little"), stride * ncpu)
            if raw is not None:
                out[name] = sum(
                    int.from_bytes(raw[c * stride : c * stride + 8], "little") for c in range(ncpu)
                )
    return out


def pinned_gateway_mac(path: Path) -> str | None:
    """The gateway MAC the balancer uses: the first field of lb_cfg[0]."""
    with _pinned(path) as (fd, info):
        raw = _lookup(fd, (0).to_bytes(4, "little"), info.value_size)
    return None if raw is None else ":".join(f"{b:02x}" for b in raw[:6])


def pinned_decap_has(path: Path, addr: str) -> bool:
    """Whether a decap_addrs map holds an address (key: __be32 addr[4], __u32 family)."""
    a = ipaddress.ip_address(addr)
    key = a.packed.ljust(16, b"\0") + (4 if a.version == 4 else 6).to_bytes(4, "little")
    with _pinned(path) as (fd, info):
        if info.key_size != len(key):
            raise KernelError(f"{path}: key size {info.key_size}, expected {len(key)}")
        return _lookup(fd, key, info.value_size) is not None


# Building blocks shared by lab and host checks.


def _rp_filter(ns: str | None, ifname: str) -> int:
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
    if name != BALANCER_PROG:
        r.fail(hop, "XDP program", f"{ifname} runs {name!r} (id {li.xdp_prog_id}), "
               f"not {BALANCER_PROG}", "detach it, or set replace_foreign")
        return li.xdp_mode
    detail = f"{BALANCER_PROG} id {li.xdp_prog_id} in {li.xdp_mode} mode"
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
            if _rp_filter(ns, t) == 1:
                r.fail(hop, "rp_filter", f"strict rp_filter on {t}: decapsulated packets "
                       "arrive there but the client is routed elsewhere, so they are dropped",
                       f"sysctl net.ipv4.conf.{t}.rp_filter=0 net.ipv4.conf.all.rp_filter=0")
    else:
        r.fail(hop, "decapsulation", f"no decap program on {ifname} and no tunnel device: "
               "encapsulated packets reach the stack as IPIP and are dropped",
               "attach xdp/decap/decap.c (lb/dataplane/decap.py: tc ingress or XDP), or create "
               "an ipip/ip6tnl device where the kernel has one")
    if decap_pins is not None and (decap_pins / "decap_addrs").exists():
        missing = [a for a in own if not pinned_decap_has(decap_pins / "decap_addrs", a)]
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


# The lab, hop by hop.


def _lab_max_frame(lab: Lab) -> int | None:
    import tomllib

    with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
        cfg = tomllib.loads(lab.config_file.read_text())
        return int(cfg.get("runtime", {}).get("max_frame", 0)) or None
    return None


def _lab_static(r: Report, lab: Lab) -> str | None:
    """Configuration of every hop; returns the LB's XDP mode."""
    # Client.
    hop = f"client {labmod.CLIENT_IF}"
    lb_mode = netlink.link_info(lab.lb_ns, labmod.LB_IF).xdp_mode
    if netlink.offloads(lab.client_ns, labmod.CLIENT_IF).get("tx-checksumming"):
        if lb_mode == "native":
            r.fail(hop, "checksum offload",
                   f"tx checksumming is on for {labmod.CLIENT_IF}: its packets keep partial "
                   "checksums through native XDP on the LB and the backends drop them",
                   f"ethtool -K {labmod.CLIENT_IF} tx off (in {lab.client_ns})")
        else:
            r.warn(hop, "checksum offload",
                   f"tx checksumming is on for {labmod.CLIENT_IF}: harmless with "
                   f"{lb_mode or 'no'} XDP on the LB, fatal once it runs native",
                   f"ethtool -K {labmod.CLIENT_IF} tx off (in {lab.client_ns})")
    else:
        r.ok(hop, "checksum offload", "tx checksumming off")
    rt = netlink.route_get(lab.client_ns, lab.vip4)
    if rt.get("oif") != labmod.CLIENT_IF:
        r.fail(hop, "route to the VIP", f"{rt}", f"ip route add default via {lab.router_client4}")

    # Router.
    hop = "router"
    fwd4 = netns.get_sysctl(lab.router_ns, "net.ipv4.ip_forward")
    fwd6 = netns.get_sysctl(lab.router_ns, "net.ipv6.conf.all.forwarding")
    if (fwd4, fwd6) != ("1", "1"):
        r.fail(hop, "forwarding", f"ip_forward={fwd4}, ipv6 forwarding={fwd6}",
               "sysctl net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
    else:
        r.ok(hop, "forwarding", "IPv4 and IPv6 forwarding on")
    for vip in (lab.vip4, lab.vip6):
        rt = netlink.route_get(lab.router_ns, vip)
        want_gw = lab.lb4 if ":" not in vip else lab.lb6
        if rt.get("oif") != labmod.RT_LB_IF or rt.get("gateway") != want_gw:
            r.fail(hop, "VIP route", f"{vip} goes {rt.get('oif')} via {rt.get('gateway')}, not "
                   f"to the LB ({want_gw} on {labmod.RT_LB_IF})",
                   f"ip route replace {labmod.VIP_NET4 if ':' not in vip else labmod.VIP_NET6}"
                   f" via {want_gw}")
        else:
            r.ok(hop, "VIP route", f"{vip} via the LB {want_gw}")
    rp = _rp_filter(lab.router_ns, labmod.RT_LB_IF)
    if rp:
        r.fail(f"router {labmod.RT_LB_IF}", "rp_filter",
               f"rp_filter={rp}: the encapsulated frames' RSS-friendly sources have no route "
               "back through the LB link and are dropped (TcpExt IPReversePathFilter)",
               f"sysctl net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.{labmod.RT_LB_IF}.rp_filter=0")
    for i in lab.backend_ids:
        rif = lab.router_backend_if(i)
        rt = netlink.route_get(lab.router_ns, lab.backend4(i))
        if rt.get("oif") != rif:
            r.fail(f"router {rif}", "backend route", f"{lab.backend4(i)} goes {rt}")
        if _rp_filter(lab.router_ns, rif) == 1:
            r.fail(f"router {rif}", "rp_filter",
                   "strict rp_filter: the backend's answers come from the VIP, whose route "
                   "points at the LB, so the router drops them (direct server return)",
                   f"sysctl net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.{rif}.rp_filter=0")

    # LB.
    hop = f"LB {labmod.LB_IF}"
    mode = check_balancer_attach(r, hop, lab.lb_ns, labmod.LB_IF, lab.xdp_mode)
    check_xdp_peer(r, f"router {labmod.RT_LB_IF}", lab.lb_ns, labmod.LB_IF, lab.router_ns,
                   labmod.RT_LB_IF, mode)
    lb_cfg = lab.lb_pin_dir / "lb_cfg"
    if lb_cfg.exists():
        check_gateway_mac(r, hop, lb_cfg, netlink.link_info(lab.router_ns, labmod.RT_LB_IF).mac,
                          f"the router's {labmod.RT_LB_IF}")
    check_mtu(r, hop, lab.lb_ns, labmod.LB_IF, inner_mtu=labmod.CLIENT_MTU,
              max_frame=_lab_max_frame(lab))
    for i in lab.backend_ids:
        check_mtu(r, f"router {lab.router_backend_if(i)}", lab.router_ns,
                  lab.router_backend_if(i), inner_mtu=labmod.CLIENT_MTU, max_frame=None)
    errs = _xdp_tx_errors(lab)
    if errs:
        r.warn(hop, "XDP_TX errors", f"{errs} frames dropped on XDP_TX so far (a peer without "
               "XDP, or frames over the MTU)")
    glob = _glob(lab)
    drops = {k: v for k, v in glob.items() if v and k in _DROP_REASONS}
    if drops:
        r.warn(hop, "drop counters", ", ".join(f"{k} {v}" for k, v in drops.items()))
    pid = labmod.daemon_pid(lab)
    if pid is None:
        r.warn(hop, "daemon", "not running: the data plane forwards on its own, but nothing "
               "can be changed", f"lbctl lab up again, or lbctl serve --config {lab.config_file}")
    else:
        r.ok(hop, "daemon", f"pid {pid}, API on {lab.api_socket}")

    # Backends.
    for i in lab.backend_ids:
        check_backend(r, f"backend b{i}", lab.backend_ns(i), labmod.BACKEND_IF,
                      own=[lab.backend4(i), lab.backend6(i)], vips=[lab.vip4, lab.vip6],
                      decap_pins=lab.decap_pin_dir)
    return mode


_DROP_REASONS = ("STAT_XDP_DROP", "STAT_MALFORMED", "STAT_NO_BACKEND", "STAT_ENCAP_FAIL",
                 "STAT_FRAG", "STAT_IP_OPTIONS", "STAT_TOO_BIG")


def _glob(lab: Lab) -> dict[str, int]:
    from lb.consts import GLOB_STATS

    path = lab.lb_pin_dir / "glob_stats"
    if not path.exists():
        return {}
    try:
        return pinned_counters(path, GLOB_STATS)
    except XlbError:
        return {}


def _xdp_tx_errors(lab: Lab) -> int:
    st = netlink.ethtool_stats(lab.lb_ns, labmod.LB_IF)
    return sum(v for k, v in st.items() if k.endswith("xdp_tx_errors"))


@dataclass
class _Counters:
    """Counters of every hop at one moment."""

    links: dict[str, dict[str, int]]
    glob: dict[str, int]
    snmp: dict[str, dict[str, int]]
    xdp_tx_errors: int


def _snapshot(lab: Lab) -> _Counters:
    links = {
        "rt-cl": netlink.link_stats(lab.router_ns, labmod.RT_CLIENT_IF),
        "rt-lb": netlink.link_stats(lab.router_ns, labmod.RT_LB_IF),
        "lb0": netlink.link_stats(lab.lb_ns, labmod.LB_IF),
        "cl0": netlink.link_stats(lab.client_ns, labmod.CLIENT_IF),
    }
    for i in lab.backend_ids:
        links[f"rt-b{i}"] = netlink.link_stats(lab.router_ns, lab.router_backend_if(i))
        links[f"b{i}"] = netlink.link_stats(lab.backend_ns(i), labmod.BACKEND_IF)
    snmp = {f"b{i}": netns.snmp(lab.backend_ns(i)) for i in lab.backend_ids}
    snmp["router"] = netns.snmp(lab.router_ns)
    return _Counters(links, _glob(lab), snmp, _xdp_tx_errors(lab))


def _send_probes(lab: Lab, protocol: str, vip: str, port: int) -> int:
    """PROBES new flows to a VIP from the client, all at once; returns how many were answered."""
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    answered: list[bool] = []

    def one(n: int) -> None:
        with netns.entered(lab.client_ns):
            if protocol == "tcp":
                try:
                    with socket.create_connection((vip, port), timeout=PROBE_TIMEOUT):
                        answered.append(True)
                except OSError:
                    answered.append(False)
                return
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(PROBE_TIMEOUT)
                try:
                    s.sendto(f"doctor{n}".encode(), (vip, port))
                    s.recvfrom(2048)
                    answered.append(True)
                except OSError:
                    answered.append(False)

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(PROBES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(answered)


def _delta(a: dict[str, int], b: dict[str, int], key: str) -> int:
    return b.get(key, 0) - a.get(key, 0)


def _probe_vip(r: Report, lab: Lab, protocol: str, vip: str, port: int) -> None:
    """Send probes through one VIP and name the first hop whose counters do not move."""
    vid = f"{protocol}:[{vip}]:{port}" if ":" in vip else f"{protocol}:{vip}:{port}"
    before = _snapshot(lab)
    answered = _send_probes(lab, protocol, vip, port)
    time.sleep(0.2)
    after = _snapshot(lab)
    hop_ok = f"probe {vid}"
    if answered == PROBES:
        r.ok(hop_ok, "end to end", f"{answered}/{PROBES} new flows answered")
        return

    def d(link: str, key: str) -> int:
        return _delta(before.links[link], after.links[link], key)

    g = {k: after.glob.get(k, 0) - before.glob.get(k, 0) for k in after.glob}
    lost = f"{answered}/{PROBES} answered"
    tx_err = after.xdp_tx_errors - before.xdp_tx_errors
    to_backends = {i: d(f"rt-b{i}", "tx_packets") for i in lab.backend_ids}
    if d("rt-cl", "rx_packets") == 0:
        r.fail("client -> router", "probe " + vid,
               f"{lost}; the router's {labmod.RT_CLIENT_IF} received nothing",
               "check the client's route and link")
    elif d("lb0", "rx_packets") == 0 and g.get("STAT_XDP_TX", 0) == 0:
        r.fail("router -> LB", "probe " + vid,
               f"{lost}; nothing reached {labmod.LB_IF}: the router does not send the VIP to "
               "the LB", f"ip route replace <VIP prefix> via {lab.lb4} (router)")
    elif g.get("STAT_XDP_TX", 0) == 0:
        reasons = {k: v for k, v in g.items() if v and k != "STAT_XDP_PASS"}
        hint = ("the VIP is not configured in the balancer" if g.get("STAT_PASS_NON_VIP")
                else ", ".join(f"{k} +{v}" for k, v in reasons.items()) or "no counter moved")
        r.fail(f"LB {labmod.LB_IF}", "probe " + vid,
               f"{lost}; the balancer did not forward ({hint})",
               "lbctl vip get / lbctl stats; is the program attached?")
    elif tx_err or d("rt-lb", "rx_packets") == 0:
        r.fail(f"LB -> router {labmod.RT_LB_IF}", "probe " + vid,
               f"{lost}; the balancer sent (XDP_TX +{g.get('STAT_XDP_TX', 0)}) but the frames "
               f"vanished on the veth (xdp_tx_errors +{tx_err}, {labmod.RT_LB_IF} rx "
               f"+{d('rt-lb', 'rx_packets')}): the peer has no XDP program",
               f"attach an XDP program (XDP_PASS is enough) to {labmod.RT_LB_IF}")
    elif not any(to_backends.values()):
        rpf = _delta(before.snmp["router"], after.snmp["router"], "TcpExtIPReversePathFilter")
        r.fail("router -> backend", "probe " + vid,
               f"{lost}; the router received the encapsulated frames but forwarded none to "
               "a backend" + (f" (rp_filter dropped {rpf})" if rpf else
                              ": wrong gateway MAC, rp_filter or no route to the backend"),
               "see the gateway MAC, rp_filter and backend route findings")
    else:
        named = False
        for i, n in to_backends.items():
            if n and _backend_drop(r, lab, i, vid, lost, port, before.snmp[f"b{i}"],
                                   after.snmp[f"b{i}"]):
                named = True
        if not named:
            r.fail("backend -> client", "probe " + vid,
                   f"{lost}; the backends took the packets but the answers did not reach the "
                   f"client ({labmod.CLIENT_IF} rx +{d('cl0', 'rx_packets')}): the backend's "
                   "default route, or rp_filter on the router's backend links",
                   "route the backends via the router; rp_filter=0 on the router")


def _backend_drop(r: Report, lab: Lab, i: int, vid: str, lost: str, port: int,
                  a: dict[str, int], b: dict[str, int]) -> bool:
    """Name what backend i did with the probes it received; False if it saw nothing wrong."""
    def d(*keys: str) -> int:
        return sum(_delta(a, b, k) for k in keys)

    hop = f"backend b{i}"
    unknown = d("IpInUnknownProtos", "Ip6InUnknownProtos")
    csum = d("TcpInCsumErrors", "UdpInCsumErrors", "Udp6InCsumErrors")
    addr = d("IpInAddrErrors", "Ip6InAddrErrors")
    noport = d("UdpNoPorts", "Udp6NoPorts", "TcpOutRsts")
    if unknown:
        r.fail(hop, "probe " + vid,
               f"{lost}; {unknown} packets reached b{i} still encapsulated (InUnknownProtos): "
               "no decap program on its link, or its address is not in decap_addrs",
               "attach the decap program (lb/dataplane/decap.py) and Decap.add_local(<address>)")
    elif csum:
        r.fail(hop, "probe " + vid,
               f"{lost}; {csum} decapsulated packets had bad checksums at b{i}: tx checksum "
               "offload on the client side with native XDP",
               f"ethtool -K {labmod.CLIENT_IF} tx off")
    elif addr:
        r.fail(hop, "probe " + vid,
               f"{lost}; b{i} dropped {addr} decapsulated packets as not for itself "
               "(InAddrErrors): the VIP is not on its lo", "ip addr add <VIP> dev lo")
    elif noport:
        r.fail(hop, "probe " + vid,
               f"{lost}; b{i} refused the flows ({noport}: no listener on port {port})",
               "start the service, bound to the VIP or to any address")
    else:
        return False
    return True


def _lab_vips(lab: Lab) -> list[tuple[str, str, int]] | None:
    if labmod.daemon_pid(lab) is None or not lab.api_socket.exists():
        return None
    try:
        vips = labmod.LabApi(lab, timeout=5).get("/v1/vips")
    except (OSError, labmod.ApiError):
        return None
    items = vips.get("data", []) if isinstance(vips, dict) else vips
    return [(str(v["protocol"]), str(v["address"]), int(v["port"])) for v in items]


def check_lab(lab: Lab, *, probe: bool = True) -> Report:
    """Every check of a lab, then (if asked and the daemon answers) probes through its VIPs."""
    r = Report()
    missing = [ns for ns in lab.namespaces() if not netns.exists(ns)]
    if missing:
        r.fail("lab", "namespaces", f"missing: {', '.join(missing)}", "lbctl lab up")
        return r
    r.ok("lab", "namespaces", f"{len(lab.namespaces())} namespaces of lab {lab.prefix}")
    _lab_static(r, lab)
    if not probe:
        return r
    vips = _lab_vips(lab)
    if vips is None:
        r.warn("probe", "VIPs", "the daemon does not answer: no VIP list, no probes")
        return r
    if not vips:
        r.warn("probe", "VIPs", "no VIP configured: nothing to probe",
               "lbctl vip add tcp 198.18.0.10:80, then lbctl backend add ...")
    for protocol, vip, port in vips:
        if port == 0:
            port = labmod.HTTP_PORT if protocol == "tcp" else labmod.UDP_PORT
        _probe_vip(r, lab, protocol, vip, port)
    return r


# A real host: the LB side from the xlb settings.


def check_host(config: str | None = None, netns_name: str | None = None) -> Report:
    """Checks of this host as an xlb LB, from its settings (interface, namespace, pins)."""
    from lb.settings import load_settings

    r = Report()
    try:
        s = load_settings(config, **({"netns": netns_name} if netns_name else {}))
    except XlbError as e:
        r.fail("settings", "configuration", e.detail)
        return r
    if not labmod._bpffs_mounted():
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
    return r


def check_backend_host(vips: list[str], interface: str | None = None,
                       ns: str | None = None, decap_pins: Path | None = None) -> Report:
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
    check_backend(r, f"backend {interface}", ns, interface, own=own, vips=vips,
                  decap_pins=decap_pins)
    return r


# Command line.


def main(argv: list[str] | None = None) -> int:
    """`lbctl doctor [--lab [PREFIX]] [--config FILE] [--no-probe] [--json] [-q]`."""
    p = argparse.ArgumentParser(prog="lbctl doctor", description=__doc__.splitlines()[0])
    p.add_argument("--lab", nargs="?", const=labmod.DEFAULT_PREFIX, metavar="PREFIX",
                   help="check a lab (default prefix xlab)")
    p.add_argument("--config", help="xlb settings file for a host check")
    p.add_argument("--backend", action="store_true", help="check this host as a backend")
    p.add_argument("--vip", action="append", default=[], help="a VIP the backend serves")
    p.add_argument("--interface", help="the backend's uplink (default: the default route's)")
    p.add_argument("--netns", help="named namespace to check instead of this one")
    p.add_argument("--decap-pins", type=Path, help="pin directory of the decap maps")
    p.add_argument("--no-probe", action="store_true", help="no probe traffic through the VIPs")
    p.add_argument("--json", action="store_true", help="findings as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and failures")
    a = p.parse_args(argv)
    if a.lab is not None:
        report = check_lab(Lab.load(a.lab), probe=not a.no_probe)
    elif a.backend:
        report = check_backend_host(a.vip, a.interface, a.netns, a.decap_pins)
    else:
        report = check_host(a.config, a.netns)
    if a.json:
        print(json.dumps([asdict(f) for f in report.findings], indent=1))
    else:
        print(report.render(verbose=not a.quiet))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
