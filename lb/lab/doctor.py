"""`lbctl doctor --lab`: check a lab made by `lbctl lab up` hop by hop, then probe it.

The lab's topology is known (lb.lab.network), so every hop is checked by name with the
building blocks of lb.ops.doctor, and a few probes through every VIP find the first hop whose
counters stop moving.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

from lb.client import ApiError
from lb.control.model import vip_id
from lb.dataplane import netlink, netns
from lb.dataplane.keys import socket_family
from lb.dataplane.mapio import pinned_counters
from lb.errors import XlbError
from lb.lab import network as labmod
from lb.lab.network import Lab
from lb.ops.doctor import (
    Report,
    check_backend,
    check_balancer_attach,
    check_gateway_mac,
    check_mtu,
    check_xdp_peer,
    rp_filter,
)

PROBES = 10
PROBE_TIMEOUT = 1.0


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
    if netns.offloads(lab.client_ns, labmod.CLIENT_IF).get("tx-checksumming"):
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
    rp = rp_filter(lab.router_ns, labmod.RT_LB_IF)
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
        if rp_filter(lab.router_ns, rif) == 1:
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
    st = netns.ethtool_stats(lab.lb_ns, labmod.LB_IF)
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
    fam = socket_family(vip)
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
    vid = vip_id(protocol, ipaddress.ip_address(vip), port)
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
    except (OSError, ApiError):
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
