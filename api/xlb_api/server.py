"""How the daemon's uvicorn is configured: timeouts for idle and slow clients, the warning
about plain HTTP off loopback. `lbctl serve` and the API tests build their server here, so the
tests run what operators run.

uvicorn closes a keep-alive connection idle after a response (`timeout_keep_alive`), but
never one that has not sent a complete request head: a client that connects and sends
nothing, or sends its headers a byte at a time, holds a connection for ever (issue 14, item
20: 700 held open for 30 s). `HeadTimeoutH11Protocol` gives every request head a deadline,
counted from the connection's start or from the last response.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from xlb_api.settings import ApiSettings

log = logging.getLogger("xlb.api")


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (`head_timeout_s`)."""

    head_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the connection's first head deadline."""
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_expired)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        """Feed h11; once a request head is complete, its deadline is off."""
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        """A response went out: the next request head gets a fresh deadline."""
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plain_http_warning(settings: ApiSettings) -> str | None:
    """The warning for a TCP listener off loopback without TLS (None: nothing to warn)."""
    if settings.uds is not None or settings.ssl_certfile is not None:
        return None
    if _is_loopback(settings.host):
        return None
    return (
        f"the API listens on {settings.host}:{settings.port} over plain HTTP: the bearer token "
        "and every change cross the network unencrypted; give --ssl-certfile/--ssl-keyfile "
        "(XLB_API_SSL_CERTFILE/_KEYFILE), or listen on loopback or a unix socket"
    )


def uvicorn_config(app: Any, settings: ApiSettings, **kw: Any) -> uvicorn.Config:
    """The uvicorn configuration of the daemon (`kw`: more uvicorn options)."""
    protocol = type(
        "XlbH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout_s": settings.head_timeout_s}
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        timeout_keep_alive=settings.idle_timeout_s,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_level=settings.log_level,
        access_log=False,
        **kw,
    )
