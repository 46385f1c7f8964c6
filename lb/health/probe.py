"""One health probe over a real socket (asyncio): TCP connect, HTTP(S) GET, UDP request.

A probe returns `ProbeResult` and never raises for a network failure: refused, reset,
timed out, a wrong HTTP status or UDP answer are all just "failed, because ...".

With `mark`, the socket carries SO_MARK: the tunnelled mode's tc egress program
(xdp/hc_encap/hc_encap.c) encapsulates marked packets towards one backend, so a probe to the VIP
reaches that backend exactly the way client traffic does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from lb.dataplane.keys import socket_family
from lb.health.policy import HealthCheck

#: Largest HTTP status line or UDP answer read.
_MAX_READ = 4096
#: DNS header flags of the default UDP request: a standard query, recursion desired.
_DNS_FLAGS_RD = 0x0100
#: DNS QR bit (in the first flags byte): set in answers.
_DNS_QR = 0x80
#: The question of the default UDP request: the root name, type NS, class IN.
_DNS_ROOT_NS = b"\x00" + struct.pack("!HH", 2, 1)


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe."""

    ok: bool
    error: str | None = None
    latency_s: float = 0.0


def _socket(address: str, kind: socket.SocketKind, mark: int | None) -> socket.socket:
    s = socket.socket(socket_family(address), kind)
    try:
        s.setblocking(False)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except BaseException:
        s.close()
        raise
    return s


def dns_query(query_id: int) -> bytes:
    """A DNS query for the root's NS records (the default UDP request)."""
    return struct.pack("!HHHHHH", query_id, _DNS_FLAGS_RD, 1, 0, 0, 0) + _DNS_ROOT_NS


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.errno is not None:
        return f"{type(e).__name__}: {os.strerror(e.errno)}"
    return f"{type(e).__name__}: {e}"


async def probe(
    check: HealthCheck, address: str, port: int, *, mark: int | None = None
) -> ProbeResult:
    """Run one probe of `check` against address:port within its timeout."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(check.timeout_s):
            if check.type == "tcp":
                await _tcp(address, port, mark)
            elif check.type in ("http", "https"):
                await _http(check, address, port, mark)
            else:
                await _udp(check, address, port, mark)
    except ProbeFailed as e:
        return ProbeResult(False, str(e), time.monotonic() - start)
    except (OSError, TimeoutError, ssl.SSLError, EOFError) as e:
        return ProbeResult(False, _why(e), time.monotonic() - start)
    return ProbeResult(True, None, time.monotonic() - start)


class ProbeFailed(Exception):
    """The backend answered, but not as the check expects."""


async def _connect(address: str, port: int, mark: int | None) -> socket.socket:
    s = _socket(address, socket.SOCK_STREAM, mark)
    try:
        await asyncio.get_running_loop().sock_connect(s, (address, port))
    except BaseException:
        s.close()
        raise
    return s


async def _tcp(address: str, port: int, mark: int | None) -> None:
    s = await _connect(address, port, mark)
    s.close()


def _host_header(check: HealthCheck, address: str, port: int) -> str:
    if check.host:
        return check.host
    host = f"[{address}]" if ":" in address else address
    default = 443 if check.type == "https" else 80
    return host if port == default else f"{host}:{port}"


async def _http(check: HealthCheck, address: str, port: int, mark: int | None) -> None:
    s = await _connect(address, port, mark)
    ctx: ssl.SSLContext | None = None
    if check.type == "https":
        # Backends present the VIP's certificate, not one for their own address: the check
        # is about the answer, so the certificate is not verified.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        reader, writer = await asyncio.open_connection(
            sock=s, ssl=ctx, server_hostname=(check.host or address) if ctx else None
        )
    except BaseException:
        s.close()
        raise
    try:
        request = (
            f"GET {check.path} HTTP/1.0\r\nHost: {_host_header(check, address, port)}\r\n"
            "User-Agent: xlb-health\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode())
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await writer.wait_closed()
    parts = line.decode("latin-1").split()
    status_text = parts[1] if len(parts) > 1 else ""
    if not parts[0:1] or not parts[0].startswith("HTTP/") or not (
        status_text.isascii() and status_text.isdigit()
    ):
        raise ProbeFailed(f"not an HTTP answer: {line[:40]!r}")
    status = int(parts[1])
    if status not in check.expect_status:
        raise ProbeFailed(f"HTTP status {status}, expected {check.expect_status}")


async def _udp(check: HealthCheck, address: str, port: int, mark: int | None) -> None:
    loop = asyncio.get_running_loop()
    s = _socket(address, socket.SOCK_DGRAM, mark)
    try:
        # Connected: answers from anyone else are filtered by the kernel, and an ICMP port
        # unreachable comes back as ConnectionRefusedError.
        await loop.sock_connect(s, (address, port))
        query_id = int.from_bytes(os.urandom(2), "big")
        if check.udp_payload_hex is not None:
            payload = bytes.fromhex(check.udp_payload_hex)
        else:
            payload = dns_query(query_id)
        await loop.sock_sendall(s, payload)
        answer = await loop.sock_recv(s, _MAX_READ)
    finally:
        s.close()
    if check.udp_expect_hex is not None:
        want = bytes.fromhex(check.udp_expect_hex)
        if not answer.startswith(want):
            raise ProbeFailed(f"answer starts {answer[:len(want)].hex()}, expected {want.hex()}")
    elif check.udp_payload_hex is None and (
        len(answer) < 12 or answer[:2] != payload[:2] or not answer[2] & _DNS_QR
    ):
        raise ProbeFailed("not a DNS answer to the query")
