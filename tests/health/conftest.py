"""Fixtures of the health tests: small servers on loopback, stopped and started at will."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


class Server:
    """A TCP or UDP server on 127.0.0.1 in a thread; `stop()` closes its port."""

    def __init__(self, kind: str, *, status: int = 200, answer: bytes | None = None,
                 tls: ssl.SSLContext | None = None, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.kind = kind
        self.status = status
        self.answer = answer
        self.tls = tls
        self.hits = 0
        stype = socket.SOCK_DGRAM if kind in ("udp", "dns", "mute") else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, stype)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        if stype == socket.SOCK_STREAM:
            self.sock.listen(64)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.kind in ("udp", "dns", "mute"):
                    data, peer = self.sock.recvfrom(2048)
                    self.hits += 1
                    if self.kind == "udp":
                        self.sock.sendto(self.answer or data, peer)
                    elif self.kind == "dns":
                        # Same id, QR set, no records: enough for a health check.
                        self.sock.sendto(data[:2] + bytes([0x81, 0x80]) + data[4:], peer)
                    continue
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.hits += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(2)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            if self.kind in ("http", "https"):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(1024)
                    if not chunk:
                        return
                    data += chunk
                conn.sendall(f"HTTP/1.0 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts (append them); all stopped afterwards."""
    made: list[Server] = []
    yield made
    for s in made:
        s.stop()


@pytest.fixture(scope="session")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server TLS context with a throwaway self-signed certificate."""
    d: Path = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=backend.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port nothing listens on (bound and released)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
