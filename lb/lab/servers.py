"""Lab backend servers: each answers with its backend name, so a client sees where it landed.

One process per backend, started inside the backend's namespace by lb/lab/network.py:

- HTTP on `--http-port` (IPv4 and IPv6): `GET /` answers `<name>\\n`, `GET /bytes/<n>` answers
  `n` bytes (full-size segments, to catch MTU trouble);
- a TCP stream service on `--stream-port`: sends `<name>\\n`, then echoes what it receives
  (long-lived connections for the removal, drain, crash and upgrade tests);
- UDP echo on `--udp-port`, one socket per `--udp-addr`: answers `<name> <payload>`. UDP
  sockets are bound to each address (the VIPs, the backend's own) so the answer leaves from
  the address the client sent to, as direct server return requires.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_BYTES = 1 << 24


class _DualStackHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 512

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _http_handler(name: str) -> type[BaseHTTPRequestHandler]:
    body = f"{name}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        """Answers with the backend name, or n bytes under /bytes/<n>."""

        protocol_version = "HTTP/1.1"
        server_version = "xlb-labsrv"

        def do_GET(self) -> None:
            """Serve / and /bytes/<n>."""
            payload = body
            if self.path.startswith("/bytes/"):
                try:
                    n = min(int(self.path.removeprefix("/bytes/")), MAX_BYTES)
                except ValueError:
                    n = 0
                payload = b"x" * n
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Backend", name)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            """Stay quiet: thousands of requests per test."""

    return Handler


class _DualStackTCPServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _stream_handler(name: str) -> type[socketserver.BaseRequestHandler]:
    hello = f"{name}\n".encode()

    class Handler(socketserver.BaseRequestHandler):
        """Greets with the backend name, then echoes until the client closes."""

        def handle(self) -> None:
            """Echo loop."""
            s: socket.socket = self.request
            with contextlib.suppress(OSError):
                s.sendall(hello)
                while data := s.recv(65536):
                    s.sendall(data)

    return Handler


def _udp_loop(name: str, socks: list[socket.socket], stop: threading.Event) -> None:
    prefix = f"{name} ".encode()
    while not stop.is_set():
        ready, _, _ = select.select(socks, [], [], 0.5)
        for s in ready:
            with contextlib.suppress(OSError):
                data, peer = s.recvfrom(65536)
                s.sendto(prefix + data, peer)


def _udp_socket(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Large enough for a burst of a thousand datagrams from the distribution tests.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind((addr, port))
    return s


def serve(
    name: str, *, http_port: int, stream_port: int, udp_port: int, udp_addrs: list[str],
    ready_file: Path | None = None,
) -> None:
    """Run the three services until SIGTERM or SIGINT."""
    http = _DualStackHTTPServer(("::", http_port), _http_handler(name))
    stream = _DualStackTCPServer(("::", stream_port), _stream_handler(name))
    udp = [_udp_socket(a, udp_port) for a in udp_addrs]
    stop = threading.Event()
    threads = [
        threading.Thread(target=http.serve_forever, daemon=True),
        threading.Thread(target=stream.serve_forever, daemon=True),
        threading.Thread(target=_udp_loop, args=(name, udp, stop), daemon=True),
    ]
    for t in threads:
        t.start()

    def _stop(_sig: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if ready_file is not None:
        ready_file.write_text("ready\n")
    while not stop.wait(1.0):
        pass
    http.shutdown()
    stream.shutdown()
    for s in udp:
        s.close()


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m lb.lab.servers --name b1 --udp-addr 198.18.0.10 ...`."""
    p = argparse.ArgumentParser(
        prog="python -m lb.lab.servers", description=__doc__.splitlines()[0]
    )
    p.add_argument("--name", required=True)
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--stream-port", type=int, default=9000)
    p.add_argument("--udp-port", type=int, default=9001)
    p.add_argument("--udp-addr", action="append", default=[])
    p.add_argument("--ready-file", type=Path)
    a = p.parse_args(argv)
    serve(a.name, http_port=a.http_port, stream_port=a.stream_port, udp_port=a.udp_port,
          udp_addrs=a.udp_addr, ready_file=a.ready_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
