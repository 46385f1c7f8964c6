"""Fixtures of the API tests: a real uvicorn on loopback around a real control plane.

The balancer is compiled once per test process (its own small configuration, so these tests
never disturb the packet tests' maps). Every test gets a fresh state directory, hence a
fresh ControlPlane, which brings the maps to its (empty) stored state on construction, and
its own uvicorn server on a free loopback port, stopped at the end even when the test fails.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from lb.config import DataplaneConfig, RuntimeConfig
from lb.control.facade import ControlPlane
from xlb_api.main import create_app
from xlb_api.server import uvicorn_config
from xlb_api.settings import ApiSettings

TOKEN = "test-token-0123456789"
# What auto mode says when it falls back (lb.dataplane.attach), as the tests' attachment.
AUTO_REASON = "auto: native refused (no driver support); fell back to generic"
#: Small but with room: 16 VIPs, 255 backends, a ring balancing 40 backends.
API_CONFIG = DataplaneConfig(ring_size=4099, max_vips=16, max_reals=256, conn_table_size=4096)
RUNTIME = RuntimeConfig(
    gateway_mac="02:00:00:00:00:fe",
    src_v4=ipaddress.IPv4Address("198.18.0.1"),
    src_v6=ipaddress.IPv6Address("2001:db8::1"),
)
PROBLEM = "urn:xlb:problem:"


@dataclass(frozen=True)
class StateDir:
    """What ControlPlane needs of lb.settings.Settings."""

    state_dir: Path


@pytest.fixture(scope="session")
def api_balancer() -> Iterator[Any]:
    """The balancer program with the API tests' configuration (unpinned)."""
    from lb.dataplane.loader import Balancer, write_runtime_config

    b = Balancer(API_CONFIG)
    write_runtime_config(b, RUNTIME)
    yield b
    b.close()


class Served:
    """A running app: its URL, clients and the objects behind it."""

    def __init__(
        self,
        url: str,
        app: FastAPI,
        control: ControlPlane,
        balancer: Any,
        verify: Path | bool = True,
    ) -> None:
        self.url = url
        self.app = app
        self.control = control
        self.balancer = balancer
        self.auth = {"Authorization": f"Bearer {TOKEN}"}
        ctx: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(verify)) if isinstance(verify, Path) else verify
        )
        self.client = httpx.Client(base_url=url, headers=self.auth, timeout=30, verify=ctx)
        self.anon = httpx.Client(base_url=url, timeout=30, verify=ctx)

    def close(self) -> None:
        """Close the clients."""
        self.client.close()
        self.anon.close()


def _free_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


@contextmanager
def running_api(
    balancer: Any,
    state_dir: Path,
    *,
    attached: bool = True,
    open_reads: bool = True,
    token: str | None = TOKEN,
    tls: tuple[Path, Path] | None = None,
    fleet_node: Any = None,
    **kw: Any,
) -> Iterator[Served]:
    """A fresh control plane on `state_dir` served by uvicorn (in a thread, real TCP).

    `tls` = (certificate, key) serves HTTPS through uvicorn's ssl_certfile/ssl_keyfile.
    `fleet_node` (lb.fleet.node.FleetNode): the control plane's store is the fleet's etcd.
    """
    control = ControlPlane(StateDir(state_dir), balancer,
                           config=API_CONFIG if fleet_node is not None else None,
                           store=fleet_node.store_factory if fleet_node is not None else None)
    if fleet_node is not None:
        fleet_node.start(control)
    settings = ApiSettings(
        token=SecretStr(token) if token else None,
        open_reads=open_reads,
        stats_interval_s=0.2,
        stats_window_s=2.0,
        conn_count_ttl_s=0.0,
        **kw,
    )
    app = create_app(
        control=control,
        balancer=balancer,
        settings=settings,
        attachment=(lambda: (True, "generic on test0")) if attached else None,
        attach_mode=(lambda: "generic") if attached else None,
        attach_reason=(lambda: AUTO_REASON) if attached else None,
        fleet_node=fleet_node,
    )
    sock = _free_socket()
    port = sock.getsockname()[1]
    # The daemon's own uvicorn configuration (timeouts, protocol), as `lbctl serve` builds it.
    server = uvicorn.Server(
        uvicorn_config(
            app,
            settings.model_copy(
                update={
                    "log_level": "warning",
                    "ssl_certfile": tls[0] if tls else None,
                    "ssl_keyfile": tls[1] if tls else None,
                }
            ),
            lifespan="on",
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    served = Served(
        f"{scheme}://127.0.0.1:{port}", app, control, balancer, verify=tls[0] if tls else True
    )
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield served
    finally:
        served.close()
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        control.close()


@pytest.fixture
def serve(api_balancer: Any, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Factory: start a fresh API (stopped after the test, also on failure)."""
    with ExitStack() as stack:
        count = iter(range(1_000))

        def start(**kw: Any) -> Served:
            state = tmp_path / f"s{next(count)}"  # a distinct state directory per server
            return stack.enter_context(running_api(api_balancer, state, **kw))

        yield start


@pytest.fixture
def api(serve: Callable[..., Served]) -> Served:
    """One running API with the default settings (token required for changes)."""
    return serve()


def assert_problem(
    resp: httpx.Response, status: int, kind: str, field: str | None = None
) -> dict[str, Any]:
    """Assert an RFC 9457 answer of this status and kind (and field); returns the body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body: dict[str, Any] = resp.json()
    assert body["type"] == PROBLEM + kind, body
    assert body["status"] == status
    assert body["title"] and body["detail"]
    if field is not None:
        assert body.get("field") == field, body
    return body
