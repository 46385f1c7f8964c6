"""Probes against real sockets on loopback: each type's success and its failures."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from lb.health.policy import HealthCheck
from lb.health.probe import ProbeResult, probe
from tests.health.conftest import Server, free_port


def _run(check: HealthCheck, port: int) -> ProbeResult:
    return asyncio.run(probe(check, "127.0.0.1", port))


def test_tcp_connect_succeeds(servers: list[Server]) -> None:
    servers.append(s := Server("tcp"))
    assert _run(HealthCheck(type="tcp"), s.port).ok


def test_tcp_refused_fails_at_once() -> None:
    r = _run(HealthCheck(type="tcp", timeout_s=1), free_port())
    assert not r.ok and r.error == "connection refused"


def test_http_expected_status_succeeds(servers: list[Server]) -> None:
    servers.append(s := Server("http", status=204))
    assert _run(HealthCheck(type="http", expect_status=[200, 204]), s.port).ok


def test_http_other_status_fails(servers: list[Server]) -> None:
    servers.append(s := Server("http", status=503))
    r = _run(HealthCheck(type="http"), s.port)
    assert not r.ok and "503" in (r.error or "")


def test_https_succeeds_without_verifying_the_certificate(
    servers: list[Server], tls_context: ssl.SSLContext
) -> None:
    servers.append(s := Server("https", tls=tls_context))
    r = _run(HealthCheck(type="https"), s.port)
    assert r.ok, r.error


def test_https_to_plain_http_fails(servers: list[Server]) -> None:
    servers.append(s := Server("http"))
    assert not _run(HealthCheck(type="https", timeout_s=1), s.port).ok


def test_udp_dns_answer_with_the_same_id_succeeds(servers: list[Server]) -> None:
    servers.append(s := Server("dns"))
    assert _run(HealthCheck(type="udp"), s.port).ok


def test_udp_echo_is_not_a_dns_answer(servers: list[Server]) -> None:
    servers.append(s := Server("udp"))
    r = _run(HealthCheck(type="udp"), s.port)
    assert not r.ok and "DNS" in (r.error or "")


def test_udp_payload_and_expected_prefix(servers: list[Server]) -> None:
    servers.append(s := Server("udp", answer=b"pong!"))
    ok = HealthCheck(type="udp", udp_payload_hex=b"ping".hex(), udp_expect_hex=b"pong".hex())
    bad = HealthCheck(type="udp", udp_payload_hex=b"ping".hex(), udp_expect_hex=b"PONG".hex())
    assert _run(ok, s.port).ok
    assert not _run(bad, s.port).ok


def test_udp_port_unreachable_fails() -> None:
    r = _run(HealthCheck(type="udp", timeout_s=1), free_port(socket.SOCK_DGRAM))
    assert not r.ok and r.error == "connection refused"


def test_udp_silence_times_out(servers: list[Server]) -> None:
    servers.append(s := Server("mute"))
    r = _run(HealthCheck(type="udp", interval_s=0.3, timeout_s=0.3), s.port)
    assert not r.ok and r.error == "timed out"


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_so_mark_is_set_on_the_probe_socket(kind: str, servers: list[Server]) -> None:
    servers.append(s := Server("tcp" if kind == "tcp" else "udp"))
    check = HealthCheck(type=kind, udp_payload_hex="00") if kind == "udp" else HealthCheck()
    r = asyncio.run(probe(check, "127.0.0.1", s.port, mark=0x58000001))
    assert r.ok, r.error
