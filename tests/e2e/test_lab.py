"""The lab without the balancer: routing, the DSR return path, decap, ARP, MTU and teardown.

These pass before the balancer forwards: they prove every hop except the LB's XDP program,
so a failing forwarding test points at the balancer or the control plane, not the lab.
"""

from __future__ import annotations

import socket
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether

from lb.dataplane import netlink, netns
from lb.lab import network as labmod
from lb.lab.network import Lab

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

RSS_SRC4 = "198.19.0.1"
RSS_SRC6 = "2001:db8:ffff:ffff::1"


def test_every_namespace_and_link_exists(lab: Lab) -> None:
    """up builds one namespace per role and the links with the MTUs the design asks for."""
    assert set(labmod.lab_namespaces(lab.prefix)) == set(lab.namespaces())
    assert netlink.link_info(lab.client_ns, labmod.CLIENT_IF).mtu == labmod.CLIENT_MTU
    assert netlink.link_info(lab.lb_ns, labmod.LB_IF).mtu == labmod.CORE_MTU
    for i in lab.backend_ids:
        assert netlink.link_info(lab.backend_ns(i), labmod.BACKEND_IF).mtu == labmod.CORE_MTU


def test_platform_rules_are_applied(lab: Lab) -> None:
    """The veth rules: XDP on the LB's peer, client tx csum off, rp_filter off, forwarding."""
    peer = netlink.link_info(lab.router_ns, labmod.RT_LB_IF)
    assert peer.xdp_mode == "native" and peer.xdp_prog_name == netlink.PASS_PROG_NAME, \
        "router side of the LB link has no XDP program: native XDP_TX would vanish"
    assert netns.offloads(lab.client_ns, labmod.CLIENT_IF)["tx-checksumming"] is False
    assert netns.get_sysctl(lab.router_ns, "net.ipv4.conf.all.rp_filter") == "0"
    assert netns.get_sysctl(lab.router_ns, "net.ipv4.ip_forward") == "1"
    assert netns.get_sysctl(lab.router_ns, "net.ipv6.conf.all.forwarding") == "1"
    for i in lab.backend_ids:
        assert netns.get_sysctl(lab.backend_ns(i), "net.ipv4.conf.all.arp_ignore") == "1"
        progs = netlink.tc_ingress_progs(lab.backend_ns(i), labmod.BACKEND_IF)
        assert [n for _, n in progs] == ["tc_decap"], "backend has no decap program"


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_client_reaches_each_backend_directly(lab: Lab, family: int) -> None:
    """Routing sanity: HTTP and UDP from the client to every backend's own address."""
    for i in lab.backend_ids:
        addr = lab.backend4(i) if family == 4 else lab.backend6(i)
        http = labmod.http_requests(lab, addr, 10, workers=2)
        udp = labmod.udp_requests(lab, addr, 10, workers=2)
        assert (dict(http.per_backend), dict(http.failures)) == ({f"b{i}": 10}, {})
        assert (dict(udp.per_backend), dict(udp.failures)) == ({f"b{i}": 10}, {})


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_vip_routed_straight_to_a_backend_answers_from_the_vip(
    lab: Lab, family: int, vip_route_restored: None
) -> None:
    """With the router sending the VIP to backend 2 itself, the VIP on lo answers (no LB)."""
    if family == 4:
        netlink.replace_route(lab.router_ns, labmod.VIP_NET4, lab.backend4(2))
        vip = lab.vip4
    else:
        netlink.replace_route(lab.router_ns, labmod.VIP_NET6, lab.backend6(2))
        vip = lab.vip6
    http = labmod.http_requests(lab, vip, 20, workers=2)
    udp = labmod.udp_requests(lab, vip, 20, workers=2)
    assert (dict(http.per_backend), dict(http.failures)) == ({"b2": 20}, {})
    assert (dict(udp.per_backend), dict(udp.failures)) == ({"b2": 20}, {})


def test_full_size_segments_cross_the_lab(lab: Lab) -> None:
    """A large answer (full-MSS segments both ways' MTUs allow) arrives whole."""
    def fetch() -> bytes:
        with socket.create_connection((lab.backend4(1), labmod.HTTP_PORT), timeout=5) as s:
            s.sendall(b"GET /bytes/200000 HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    body = netns.call_in(lab.client_ns, fetch).partition(b"\r\n\r\n")[2]
    assert len(body) == 200000


def _inject_from_lb(lab: Lab, frame: bytes) -> None:
    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((labmod.LB_IF, 0))
            s.send(frame)

    netns.call_in(lab.lb_ns, send)


@pytest.mark.parametrize("family", [4, 6], ids=["ipip", "ip6ip6"])
def test_encapsulated_packet_from_lb_reaches_backend_socket(lab: Lab, family: int) -> None:
    """A hand-built encapsulated datagram sent by the LB is decapsulated by the backend,
    answered from the VIP, and the answer reaches the client directly (DSR)."""
    for i in lab.backend_ids:
        port = 41000 + 10 * family + i
        if family == 4:
            fam, client, vip = socket.AF_INET, lab.client4, lab.vip4
            outer = IP(src=RSS_SRC4, dst=lab.backend4(i)) / IP(src=client, dst=vip)
        else:
            fam, client, vip = socket.AF_INET6, lab.client6, lab.vip6
            outer = IPv6(src=RSS_SRC6, dst=lab.backend6(i)) / IPv6(src=client, dst=vip)
        frame = (Ether(src=lab.lb_mac, dst=lab.gateway_mac) / outer
                 / UDP(sport=port, dport=labmod.UDP_PORT) / b"hello")

        def listen(fam: socket.AddressFamily = fam, client: str = client,
                   port: int = port) -> socket.socket:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((client, port))
            s.settimeout(3)
            return s

        with netns.call_in(lab.client_ns, listen) as sock:
            _inject_from_lb(lab, bytes(frame))
            data, peer = sock.recvfrom(256)
        assert data == f"b{i} hello".encode(), f"backend {i} did not answer the inner packet"
        assert peer[0] == vip, "the answer did not come from the VIP"


def _arp_answers(lab: Lab, i: int, target: str) -> bool:
    """Ask on backend i's link who has `target`; True if anyone answers within a second."""
    rif = lab.router_backend_if(i)
    req = (Ether(src=lab.router_backend_mac(i), dst="ff:ff:ff:ff:ff:ff")
           / ARP(op=1, hwsrc=lab.router_backend_mac(i), psrc=lab.router_backend4(i),
                 pdst=target))

    def ask() -> bool:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)) as s:
            s.bind((rif, 0))
            s.settimeout(0.2)
            s.send(bytes(req))
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    raw = s.recv(2048)
                except TimeoutError:
                    continue
                ans = Ether(raw)
                if ARP in ans and ans[ARP].op == 2 and ans[ARP].psrc == target:
                    return True
            return False

    return netns.call_in(lab.router_ns, ask)


def test_backends_do_not_answer_arp_for_the_vip(lab: Lab) -> None:
    """arp_ignore keeps the VIP on lo private; the backend's own address still answers."""
    assert _arp_answers(lab, 1, lab.backend4(1)), "no ARP answer for the backend's own address"
    assert not _arp_answers(lab, 1, lab.vip4), "backend answered ARP for the VIP on lo"


def test_down_removes_everything_also_after_a_crash(test_prefix: str) -> None:
    """A lab whose creator vanished is removed by prefix: processes, namespaces, pins, files."""
    prefix = f"{test_prefix}x"
    spec = Lab(prefix=prefix, backends=1)
    labmod.up(spec)
    try:
        pid = int(spec.server_pid_file(1).read_text())
        assert netns.pids_in(spec.backend_ns(1)) == [pid]
    finally:
        removed = labmod.down(prefix)
    assert f"process {pid}" in removed
    assert not labmod.lab_namespaces(prefix)
    assert not spec.pin_dir.exists() and not spec.run_dir.exists()
    assert labmod.down(prefix) == [], "a second down found something left"
