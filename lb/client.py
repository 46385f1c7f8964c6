"""A small JSON client of xlb's REST API, standard library only (lbctl and the lab use it).

    ApiClient("http://127.0.0.1:9780", token)        TCP
    ApiClient("https://lb1:9780", token, cacert=...)  TLS
    ApiClient("unix:///run/xlb/api.sock", token)      a unix socket

A 4xx/5xx answer raises `ApiError` (the status and the decoded problem detail); a daemon that
cannot be reached raises `Unreachable` (an OSError). It never imports the server, so a client
starts in milliseconds.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit


class ApiError(Exception):
    """The daemon answered with an error status; `body` is its (problem) document."""

    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("detail", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.body = body


class Unreachable(OSError):
    """The daemon could not be reached (refused, timed out, no such socket)."""


class BadUrl(ValueError):
    """A URL the client cannot talk to."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def vip_path(vip_id: str) -> str:
    """URL path of a VIP id such as `tcp:[2001:db8::10]:80` (reserved characters encoded)."""
    return "/v1/vips/" + quote(vip_id, safe=":")


def backend_path(vip_id: str, address: str) -> str:
    """URL path of one backend of a VIP."""
    return vip_path(vip_id) + "/backends/" + quote(address, safe=":")


class ApiClient:
    """Requests to one daemon; the token is given, or read from `token_file` per request."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        token_file: Path | None = None,
        cacert: str | None = None,
        timeout: float = 30.0,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.token_file = token_file
        self.timeout = timeout
        self.echo = echo
        parts = urlsplit(url)
        self._scheme = parts.scheme
        if parts.scheme == "unix":
            self._target = parts.path
        elif parts.scheme in ("http", "https"):
            if not parts.hostname:
                raise BadUrl(f"--url {url!r} has no host")
            self._target = parts.netloc
        else:
            raise BadUrl(f"--url {url!r}: use http://HOST:PORT, https://HOST:PORT or unix:///PATH")
        self._base = parts.path.rstrip("/") if parts.scheme != "unix" else ""
        self._cacert = cacert

    def _connection(self) -> http.client.HTTPConnection:
        if self._scheme == "unix":
            return _UnixConnection(self._target, self.timeout)
        if self._scheme == "https":
            ctx = ssl.create_default_context(cafile=self._cacert)
            return http.client.HTTPSConnection(self._target, timeout=self.timeout, context=ctx)
        return http.client.HTTPConnection(self._target, timeout=self.timeout)

    def _bearer(self) -> str | None:
        if self.token is not None or self.token_file is None:
            return self.token
        # Read per request: a daemon that is still starting writes it a moment later.
        try:
            lines = self.token_file.read_text().split()
        except OSError:
            return None
        return lines[0] if lines else None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """Send one request; returns (status, lower-cased headers, decoded body)."""
        if self.echo is not None:
            self.echo(f"{method} {path}" + (f" {json.dumps(body)}" if body is not None else ""))
        url = self._base + path + (f"?{urlencode(query)}" if query else "")
        hdrs = {"Accept": "application/json, application/problem+json", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        token = self._bearer()
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        conn = self._connection()
        try:
            conn.request(method, url, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            rheaders = {k.lower(): v for k, v in resp.getheaders()}
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"cannot reach the xlb daemon at {self.url}: {e}") from None
        finally:
            conn.close()
        decoded: Any = raw.decode(errors="replace")
        if "json" in rheaders.get("content-type", "") and raw:
            decoded = json.loads(raw)
        if self.echo is not None:
            self.echo(f"  -> {resp.status}")
        if resp.status >= 400:
            raise ApiError(resp.status, decoded)
        return resp.status, rheaders, decoded

    def stream(self, path: str, *, query: dict[str, Any] | None = None,
               accept: str = "*/*") -> Iterator[bytes]:
        """GET a streamed body (Server-Sent Events, pcap): its lines as they come, each with
        its newline. ApiError or Unreachable as `request`; the stream may stay quiet up to
        the daemon's keep-alive interval, well within the timeout."""
        url = self._base + path + (f"?{urlencode(query, doseq=True)}" if query else "")
        hdrs = {"Accept": f"{accept}, application/problem+json"}
        token = self._bearer()
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        conn = self._connection()
        try:
            try:
                conn.request("GET", url, headers=hdrs)
                resp = conn.getresponse()
                if resp.status >= 400:
                    raw = resp.read()
                    body: Any = raw.decode(errors="replace")
                    if "json" in (resp.getheader("content-type") or "") and raw:
                        body = json.loads(raw)
                    raise ApiError(resp.status, body)
                while chunk := resp.readline(1 << 16):
                    yield chunk
            except (OSError, http.client.HTTPException) as e:
                raise Unreachable(f"cannot reach the xlb daemon at {self.url}: {e}") from None
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Any:
        """GET and return the decoded body."""
        return self.request("GET", path, **kw)[2]

    def post(self, path: str, body: Any) -> Any:
        """POST and return the decoded body."""
        return self.request("POST", path, body)[2]

    def patch(self, path: str, body: Any) -> Any:
        """PATCH and return the decoded body."""
        return self.request("PATCH", path, body)[2]

    def delete(self, path: str) -> None:
        """DELETE."""
        self.request("DELETE", path)
