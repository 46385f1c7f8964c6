"""The request guard: authentication and the body-size cap, before anyone reads the body.

FastAPI reads and parses a request's body before it runs the route's dependencies, so a
bearer-token dependency alone lets an anonymous client make the daemon read (and hold) any
body it sends (issue 14, item 20: 500 MB raised the RSS by 1.5 GB before the 401). This ASGI
middleware runs first:

- a change (any method but GET, HEAD, OPTIONS) without the right token is answered 401 from
  the headers alone, and the connection is closed, so the body is never read;
- a body larger than `max_body_bytes` is answered 413 naming the limit: at once when
  Content-Length says so, else (chunked) as soon as the bytes read pass the limit.

Reads keep their own check (`xlb_api.deps.require_read`: open from loopback).
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lb.errors import XlbError
from xlb_api.deps import Runtime, check_token
from xlb_api.problems import NotReady, problem_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class PayloadTooLarge(XlbError):
    """The request body is larger than the daemon accepts."""

    status = 413
    kind = "payload-too-large"


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v).decode("latin-1")
    return None


def _bearer(value: str | None) -> str | None:
    # As fastapi.security.HTTPBearer: the scheme is case-insensitive, anything else is none.
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class RequestGuard:
    """ASGI middleware: the token and the body size, checked before the body is read."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than {self.max_body} bytes, the daemon's limit "
            "(max_body_bytes; raise it with XLB_API_MAX_BODY_BYTES)",
            field="body",
        )

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, e: XlbError) -> None:
        headers = {"connection": "close"}  # the body stays unread: end the connection
        if e.status == 401:
            headers["www-authenticate"] = 'Bearer realm="xlb"'
        resp = problem_response(e.status, e.kind, e.detail, instance=scope.get("path"),
                                field=e.field, headers=headers)
        await resp(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check one request, then hand it on (its body untouched, or replayed if chunked)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if scope["method"] not in SAFE_METHODS:
                app: Any = scope.get("app")
                rt = getattr(getattr(app, "state", None), "runtime", None)
                if not isinstance(rt, Runtime):
                    raise NotReady("the control plane is not running yet")
                check_token(rt, _bearer(_header(scope, b"authorization")))
            length = _header(scope, b"content-length")
            digits = length.strip() if length is not None else ""
            if digits.isascii() and digits.isdigit() and int(digits) > self.max_body:
                raise self._too_large()
        except XlbError as e:
            await self._refuse(scope, receive, send, e)
            return
        if length is not None or _header(scope, b"transfer-encoding") is None:
            await self.app(scope, receive, send)  # Content-Length bounds it (h11 holds to it)
            return
        # Chunked: read up to the limit here, then replay it as one message.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._refuse(scope, receive, send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
