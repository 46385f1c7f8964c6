"""What an anonymous or slow client can make the daemon do (issue 14, item 20), tested with
raw sockets against the daemon's own uvicorn configuration (xlb_api.server) on loopback.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from tests.api.conftest import TOKEN, Served

pytestmark = pytest.mark.bpf

VIP = json.dumps({"protocol": "tcp", "address": "198.18.0.10", "port": 80}).encode()


def _connect(api: Served) -> socket.socket:
    u = urlsplit(api.url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    return s


def _read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, headers, body by Content-Length)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += s.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _closed_by_peer(s: socket.socket, within: float) -> bool:
    """True if the server closes `s` within `within` seconds (it may answer first)."""
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_a_change_without_token_is_401_before_the_body_is_read(api: Served) -> None:
    s = _connect(api)
    try:
        # 500 MB announced, a few KB sent: the answer must not wait for the rest.
        s.sendall(b"POST /v1/vips HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500000000\r\n\r\n" + b" " * 4096)
        t0 = time.monotonic()
        status, headers, body = _read_response(s)
        assert status == 401 and time.monotonic() - t0 < 5
        assert json.loads(body)["type"] == "urn:xlb:problem:unauthorized"
        assert headers.get("connection") == "close"
        assert _closed_by_peer(s, 5), "the connection stays open for the unread body"
    finally:
        s.close()
    assert api.control.list_vips() == []


def test_a_wrong_token_is_401_before_the_body_is_read(api: Served) -> None:
    s = _connect(api)
    try:
        s.sendall(b"PUT /v1/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"1000\r\n" + b" " * 4096 + b"\r\n")
        status, _, body = _read_response(s)
        assert status == 401, body
    finally:
        s.close()


def test_a_body_over_the_limit_is_413_naming_the_limit(serve: Callable[..., Served]) -> None:
    api = serve(max_body_bytes=4096)
    r = api.client.post("/v1/vips", content=b" " * 5000,
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["type"] == "urn:xlb:problem:payload-too-large"
    assert "4096 bytes" in body["detail"] and "max_body_bytes" in body["detail"]
    assert "XLB_API_MAX_BODY_BYTES" in body["detail"]


def test_a_chunked_body_over_the_limit_is_413(serve: Callable[..., Served]) -> None:
    api = serve(max_body_bytes=4096)
    s = _connect(api)
    try:
        s.sendall(b"POST /v1/vips HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            s.sendall(b"800\r\n" + b" " * 2048 + b"\r\n")
        status, _, body = _read_response(s)
        assert status == 413 and b"payload-too-large" in body
    finally:
        s.close()
    assert api.control.list_vips() == []


def test_a_chunked_body_within_the_limit_is_served(api: Served) -> None:
    s = _connect(api)
    try:
        s.sendall(b"POST /v1/vips HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n"
                  + f"{len(VIP):x}\r\n".encode() + VIP + b"\r\n0\r\n\r\n")
        status, _, body = _read_response(s)
        assert status == 201, body
    finally:
        s.close()


def test_idle_and_slow_header_connections_are_closed(serve: Callable[..., Served]) -> None:
    api = serve(head_timeout_s=1.0, idle_timeout_s=1)
    silent = [_connect(api) for _ in range(50)]
    slow = _connect(api)
    served = _connect(api)
    try:
        served.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(served)[0] == 200
        t0 = time.monotonic()
        # One header byte every 0.2 s: never a complete head within the deadline.
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            try:
                slow.send(bytes([b]))
            except OSError:
                break
            if time.monotonic() - t0 > 3:
                break
            time.sleep(0.2)
        assert time.monotonic() - t0 < 3, "a slow-header connection was kept past 3 s"
        assert _closed_by_peer(slow, 2)
        assert all(_closed_by_peer(s, 2) for s in silent), "a silent connection stays open"
        assert _closed_by_peer(served, 2), "an idle keep-alive connection stays open"
        # The daemon still serves new clients.
        assert api.anon.get("/healthz").status_code == 200
    finally:
        for s in (*silent, slow, served):
            s.close()
