"""Drain completion: live flows per backend from the connection table (packets through the
program with BPF_PROG_TEST_RUN)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lb.control.model import BackendSpec, VipSpec
from lb.dataplane.conntab import ConnTable
from lb.dataplane.flowhash import Flow5
from lb.ops.drain import count_flows
from tests.dataplane import packets as P
from tests.dataplane.lab import Lab

pytestmark = pytest.mark.bpf

XDP_TX = 3
TCP_VIP = VipSpec(protocol="tcp", address=P.VIP4, port=80,
                  backends=[BackendSpec(address=P.REAL4[0])])
UDP_VIP = VipSpec(protocol="udp", address=P.VIP4, port=53,
                  backends=[BackendSpec(address=P.REAL4[0])])


@pytest.fixture
def lab(balancer: Any) -> Iterator[Lab]:
    lab = Lab(balancer)
    lab.wipe()
    lab.config()
    lab.vip(P.VIP4, 80, "tcp", num=1)
    lab.vip(P.VIP4, 53, "udp", num=2)
    lab.real(1, P.REAL4[0])
    lab.real(2, P.REAL4[1])
    lab.ring(1, 1)
    lab.ring(2, 1)
    try:
        yield lab
    finally:
        lab.reset()


def _send(lab: Lab, frame: bytes) -> None:
    assert lab.run(frame).verdict == XDP_TX


def test_open_tcp_flows_count_until_the_client_closes(lab: Lab) -> None:
    for sport in (40000, 40001):
        _send(lab, P.tcp4(sport=sport))
    _send(lab, P.tcp4(sport=40000, flags="A", payload=b"x"))
    assert count_flows(lab.b, TCP_VIP, 1) == 2
    assert count_flows(lab.b, TCP_VIP, 2) == 0, "flows of another backend do not count"
    assert count_flows(lab.b, UDP_VIP, 1) == 0, "flows of another VIP do not count"
    assert count_flows(lab.b, TCP_VIP, 1, later_s=600) == 2, "open flows count while idle"
    _send(lab, P.tcp4(sport=40000, flags="FA"))
    _send(lab, P.tcp4(sport=40001, flags="R"))
    with ConnTable(lab.b) as table:
        entry = table.lookup(Flow5.of(P.CLIENT4, P.VIP4, 40000, 80, "tcp"))
    assert entry is not None and entry.closing, "a client FIN marks the entry closing"
    assert count_flows(lab.b, TCP_VIP, 1) == 2, "closing flows count for a grace period"
    assert count_flows(lab.b, TCP_VIP, 1, later_s=3) == 0
    _send(lab, P.tcp4(sport=40000))
    assert count_flows(lab.b, TCP_VIP, 1, later_s=3) == 1, "a new SYN reopens the entry"


def test_udp_flows_count_within_the_idle_timeout(lab: Lab) -> None:
    _send(lab, P.udp4(dport=53))
    assert count_flows(lab.b, UDP_VIP, 1) == 1
    assert count_flows(lab.b, UDP_VIP, 1, later_s=31) == 0


def test_entries_written_by_the_control_plane_count_by_their_age(lab: Lab) -> None:
    with ConnTable(lab.b) as table:
        for sport, age in ((1000, 0.5), (1001, 29.0), (1002, 31.0)):
            table.insert(Flow5.of(P.CLIENT4, P.VIP4, sport, 53, "udp"), 1, 2, udp=True,
                         age_s=age)
        for sport, age in ((2000, 0.5), (2001, 5.0)):
            table.insert(Flow5.of(P.CLIENT4, P.VIP4, sport, 80, "tcp"), 1, 1, closing=True,
                         age_s=age)
        table.insert(Flow5.of(P.CLIENT4, P.VIP4, 2002, 80, "tcp"), 1, 1, age_s=600.0)
        table.insert(Flow5.of(P.CLIENT4, P.VIP4, 2003, 80, "tcp"), 1, 7)
        assert count_flows(lab.b, UDP_VIP, 1, table=table) == 2, "UDP within 30 s"
        assert count_flows(lab.b, TCP_VIP, 1, table=table) == 2, (
            "an open flow and one closing for less than the grace (not another VIP's)")
    unknown = VipSpec(protocol="tcp", address=P.VIP4, port=8080)
    assert count_flows(lab.b, unknown, 1) == 0, "a VIP the data plane lacks has no flows"


def test_an_idle_open_tcp_flow_stops_counting_after_tcp_timeout(lab: Lab) -> None:
    # A client that vanished without FIN: with tcp_timeout_s (900 s by default) its flow
    # stops counting, so drain --wait ends; with 0 it counts forever.
    _send(lab, P.tcp4(sport=40000))
    assert count_flows(lab.b, TCP_VIP, 1, later_s=899) == 1
    assert count_flows(lab.b, TCP_VIP, 1, later_s=901) == 0, "idle past tcp_timeout_s"
    lab.config(tcp_timeout_s=0)
    assert count_flows(lab.b, TCP_VIP, 1, later_s=86400) == 1, "tcp_timeout_s 0: never"


def test_a_fin_of_an_unknown_flow_leaves_nothing_to_drain(lab: Lab) -> None:
    _send(lab, P.tcp4(sport=40000, flags="FA"))
    _send(lab, P.tcp4(sport=40001, flags="R"))
    assert count_flows(lab.b, TCP_VIP, 1) == 0
    with ConnTable(lab.b) as table:
        assert table.count() == 0, "a FIN or RST of an unknown flow opened a table entry"


def test_count_live_is_what_drains_count(lab: Lab) -> None:
    with ConnTable(lab.b) as table:
        for sport, age in ((1000, 0.5), (1001, 31.0)):  # UDP: live, expired
            table.insert(Flow5.of(P.CLIENT4, P.VIP4, sport, 53, "udp"), 1, 2, udp=True,
                         age_s=age)
        for sport, age in ((2000, 0.5), (2001, 1000.0)):  # TCP open: live, idle too long
            table.insert(Flow5.of(P.CLIENT4, P.VIP4, sport, 80, "tcp"), 1, 1, age_s=age)
        table.insert(Flow5.of(P.CLIENT4, P.VIP4, 2002, 80, "tcp"), 1, 1, closing=True,
                     age_s=5.0)  # closed past the grace
        assert table.count() == 5
        assert table.count_live() == 2
