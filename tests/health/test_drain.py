"""Drain completion: live flows per backend from the connection table (packets through the
program with BPF_PROG_TEST_RUN)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from lb.drain import count_flows
from lb.model import BackendSpec, VipSpec
from tests.dataplane import packets as P
from tests.dataplane.lab import Flow, Lab

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
    _send(lab, P.tcp4(sport=40000, flags="FA"))
    _send(lab, P.tcp4(sport=40001, flags="R"))
    entry = lab.lookup_conn(Flow(P.CLIENT4, P.VIP4, 40000, 80))
    assert entry is not None and entry[1] != 0, "a client FIN marks the entry closing"
    assert count_flows(lab.b, TCP_VIP, 1) == 2, "closing flows count for a grace period"
    later = time.monotonic_ns() + 3_000_000_000
    assert count_flows(lab.b, TCP_VIP, 1, now_ns=later) == 0
    _send(lab, P.tcp4(sport=40000))
    assert count_flows(lab.b, TCP_VIP, 1, now_ns=later) == 1, "a new SYN reopens the entry"


def test_udp_flows_count_within_the_idle_timeout(lab: Lab) -> None:
    _send(lab, P.udp4(dport=53))
    assert count_flows(lab.b, UDP_VIP, 1) == 1
    later = time.monotonic_ns() + 31_000_000_000
    assert count_flows(lab.b, UDP_VIP, 1, now_ns=later) == 0
