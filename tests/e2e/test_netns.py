"""The namespace/veth primitives of lb/dataplane/netns.py, on a two-namespace veth pair."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from lb.dataplane import netlink, netns

pytestmark = pytest.mark.netns


@pytest.fixture
def pair(test_prefix: str) -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair with IPv4 and IPv6 addresses."""
    a, b = f"{test_prefix}-na", f"{test_prefix}-nb"
    with netns.namespace(a), netns.namespace(b):
        netlink.add_veth(netlink.End(a, "va", "02:00:00:00:0a:01", 1600),
                       netlink.End(b, "vb", "02:00:00:00:0a:02", 1600))
        netlink.add_address(a, "va", "198.18.250.1/24")
        netlink.add_address(b, "vb", "198.18.250.2/24")
        netlink.add_address(a, "va", "2001:db8:250::1/64")
        netlink.add_address(b, "vb", "2001:db8:250::2/64")
        yield a, b
    assert not netns.exists(a) and not netns.exists(b), "namespaces outlived their block"


def _echo_once(a: str, b: str, addr: str) -> bytes:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def listen() -> socket.socket:
        s = socket.socket(family)
        s.bind((addr, 5000))
        s.listen()
        return s

    server = netns.call_in(a, listen)
    client = netns.call_in(b, lambda: socket.create_connection((addr, 5000), timeout=5))
    with server, client:
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ping")
            return conn.recv(16)


@pytest.mark.parametrize("addr", ["198.18.250.1", "2001:db8:250::1"], ids=["ipv4", "ipv6"])
def test_veth_pair_carries_tcp(pair: tuple[str, str], addr: str) -> None:
    """A TCP connection crosses the pair in both families (sockets made inside namespaces)."""
    assert _echo_once(*pair, addr) == b"ping"


def test_link_info_reports_mac_mtu_and_peer(pair: tuple[str, str]) -> None:
    """link_info sees the MAC and MTU that add_veth set."""
    info = netlink.link_info(pair[0], "va")
    assert (info.mac, info.mtu, info.up, info.kind) == ("02:00:00:00:0a:01", 1600, True, "veth")
    assert info.xdp_mode is None


@pytest.mark.bpf
def test_xdp_pass_attaches_and_is_named(pair: tuple[str, str]) -> None:
    """xlb_pass attaches natively, is reported by name, and leaves traffic flowing."""
    with netlink.xdp_pass_attached(pair[0], "va"):
        info = netlink.link_info(pair[0], "va")
        assert info.xdp_mode == "native"
        assert info.xdp_prog_name == netlink.PASS_PROG_NAME
        assert _echo_once(*pair, "198.18.250.1") == b"ping"
    assert netlink.link_info(pair[0], "va").xdp_mode is None, "program still attached"


def test_sysctls_are_per_namespace(pair: tuple[str, str]) -> None:
    """A sysctl written in one namespace does not show in the other."""
    netns.set_sysctls(pair[0], {"net.ipv4.ip_forward": 1})
    assert netns.get_sysctl(pair[0], "net.ipv4.ip_forward") == "1"
    assert netns.get_sysctl(pair[1], "net.ipv4.ip_forward") == "0"


def test_offload_switch(pair: tuple[str, str]) -> None:
    """tx checksumming can be turned off and back on."""
    netns.set_offload(pair[1], "vb", "tx", on=False)
    assert netns.offloads(pair[1], "vb")["tx-checksumming"] is False
    netns.set_offload(pair[1], "vb", "tx", on=True)
    assert netns.offloads(pair[1], "vb")["tx-checksumming"] is True


def test_iproute_refuses_missing_namespace(test_prefix: str) -> None:
    """A typo in a namespace name raises instead of creating a namespace."""
    with pytest.raises(Exception, match="does not exist"):
        netlink.ifindex(f"{test_prefix}-nosuch", "lo")
    assert not netns.exists(f"{test_prefix}-nosuch")
