"""Where the daemon is and the token, and the API client lbctl talks to it with.

First found wins: the flags `--url` / `--token` / `--token-file`, the environment `XLB_URL` /
`XLB_TOKEN` / `XLB_TOKEN_FILE`, the file `~/.config/xlb/lbctl.toml` (keys `url`, `token`,
`token_file`; `XLB_LBCTL_CONFIG` names another), then `http://127.0.0.1:9780` and the daemon's
default token file `/etc/xlb/token` when it is readable.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lb.client import ApiClient, ApiError, BadUrl, Unreachable
from lbctl.base import EXIT_UNREACHABLE, EXIT_USAGE, CliError

DEFAULT_URL = "http://127.0.0.1:9780"
DEFAULT_TOKEN_FILE = Path("/etc/xlb/token")
CONFIG_PATH = Path.home() / ".config" / "xlb" / "lbctl.toml"


class Client(ApiClient):
    """lb.client.ApiClient whose failures are CliErrors (the problem detail, exit 1 or 3)."""

    def __init__(
        self, url: str, token: str | None, *, cacert: str | None = None, timeout: float = 30.0
    ) -> None:
        try:
            super().__init__(url, token, cacert=cacert, timeout=timeout)
        except BadUrl as e:
            raise CliError(str(e), EXIT_USAGE) from None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """Send one request; returns (status, headers, decoded body). CliError on failure."""
        try:
            return super().request(method, path, body, query=query, headers=headers)
        except ApiError as e:
            raise CliError(problem_text(e.status, e.body)) from None
        except Unreachable as e:
            raise CliError(str(e), EXIT_UNREACHABLE) from None


    def stream(self, path: str, *, query: dict[str, Any] | None = None,
               accept: str = "*/*") -> Iterator[bytes]:
        """lb.client.ApiClient.stream, its failures CliErrors."""
        try:
            yield from super().stream(path, query=query, accept=accept)
        except ApiError as e:
            raise CliError(problem_text(e.status, e.body)) from None
        except Unreachable as e:
            raise CliError(str(e), EXIT_UNREACHABLE) from None


def problem_text(status: int, body: Any) -> str:
    """An API error as one line: the detail, the field, [status type]."""
    if isinstance(body, dict) and "detail" in body:
        text = str(body["detail"])
        if body.get("field") and str(body["field"]) not in text:
            text += f" (field: {body['field']})"
        kind = str(body.get("type", "")).rsplit(":", 1)[-1]
        return f"{text} [{status} {kind}]" if kind else f"{text} [{status}]"
    return f"HTTP {status}: {str(body)[:500]}"


def _config_file() -> dict[str, Any]:
    path = Path(os.environ.get("XLB_LBCTL_CONFIG") or CONFIG_PATH)
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CliError(f"cannot read {path}: {e}", EXIT_USAGE) from None


def _read_token(path: str | Path) -> str | None:
    try:
        first = Path(path).read_text().splitlines()
    except OSError:
        return None
    return first[0].strip() if first and first[0].strip() else None


#: The environment variables client_from reads.
CLIENT_ENV = frozenset({"XLB_URL", "XLB_TOKEN", "XLB_TOKEN_FILE", "XLB_CACERT",
                        "XLB_LBCTL_CONFIG"})


def client_from(args: argparse.Namespace) -> Client:
    """The API client the flags, environment and config file describe."""
    cfg = _config_file()
    url = args.url or os.environ.get("XLB_URL") or cfg.get("url") or DEFAULT_URL
    token = args.token or os.environ.get("XLB_TOKEN") or None
    token_file = args.token_file or os.environ.get("XLB_TOKEN_FILE")
    if token is None and token_file:
        token = _read_token(token_file)
        if token is None:
            raise CliError(f"cannot read a token from {token_file}", EXIT_USAGE)
    if token is None:
        token = cfg.get("token") or None
    if token is None and cfg.get("token_file"):
        token = _read_token(str(cfg["token_file"]))
    if token is None and os.access(DEFAULT_TOKEN_FILE, os.R_OK):
        token = _read_token(DEFAULT_TOKEN_FILE)
    cacert = args.cacert or os.environ.get("XLB_CACERT") or cfg.get("cacert")
    return Client(str(url), token, cacert=cacert)
