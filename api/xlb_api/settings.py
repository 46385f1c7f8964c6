"""Configuration of the API daemon: one pydantic-settings class, read from XLB_API_* variables.

The data plane's own settings (interface, pins, sizes, store) live in `lb.settings`; this
class holds only what the HTTP side needs: where to listen, TLS, the token, the statistics
sampler. `lbctl serve` flags override the environment.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TOKEN_FILE = Path("/etc/xlb/token")


class ApiSettings(BaseSettings):
    """Where and how the REST API listens, and who may change things."""

    model_config = SettingsConfigDict(env_prefix="XLB_API_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on (loopback by default)")
    port: int = Field(9780, ge=0, le=65535, description="TCP port (0 = any free port)")
    uds: Path | None = Field(None, description="listen on this unix socket instead of TCP")
    uds_mode: int = Field(0o660, ge=0, le=0o777, description="permissions of the unix socket")
    ssl_certfile: Path | None = Field(None, description="TLS certificate (PEM), enables HTTPS")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM)")
    token: SecretStr | None = Field(None, description="bearer token required for changes")
    token_file: Path | None = Field(
        None,
        description="file holding the bearer token (first line); created with a random "
        "token, mode 0600, by `lbctl serve` when neither token nor file exists",
    )
    open_reads: bool = Field(
        True, description="allow reads (GET) without a token from loopback or the unix socket"
    )
    detach_on_exit: bool = Field(
        False, description="detach the XDP program on shutdown (default: keep forwarding)"
    )
    stats_interval_s: float = Field(1.0, gt=0, le=60, description="statistics sampling period")
    stats_window_s: float = Field(10.0, gt=0, le=3600, description="window of the rates")
    conn_count_ttl_s: float = Field(
        2.0, ge=0, le=3600, description="how long a connection-table count is reused"
    )
    verify_interval_s: float = Field(
        300.0, ge=0, le=86400,
        description="compare the maps with the stored state this often (0 = only on demand: "
        "GET/POST /v1/verify, lbctl verify); drift shows in /readyz and /metrics",
    )
    verify_repair: bool = Field(
        True, description="rewrite drift the periodic verify finds (false: only report it)"
    )
    log_level: str = Field("info", description="uvicorn log level")
    max_body_bytes: int = Field(
        16 << 20, ge=1024, le=1 << 30,
        description="largest request body accepted (413 above); checked after the token",
    )
    head_timeout_s: float = Field(
        10.0, gt=0, le=3600,
        description="a connection must send a complete request head within this time of "
        "opening or of its last response, else it is closed",
    )
    idle_timeout_s: int = Field(
        5, ge=1, le=3600, description="an idle keep-alive connection is closed after this"
    )

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v:
            raise ValueError("host must not be empty")
        return v

    def expected_token(self) -> str | None:
        """The token writes must present, from `token` or else `token_file` (None: none set)."""
        if self.token is not None and self.token.get_secret_value():
            return self.token.get_secret_value()
        if self.token_file is not None and self.token_file.is_file():
            first = self.token_file.read_text().splitlines()
            return first[0].strip() if first and first[0].strip() else None
        return None


def ensure_token_file(path: Path) -> bool:
    """Create `path` with a random token (mode 0600) unless it exists; True if created."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return True


@lru_cache
def get_settings() -> ApiSettings:
    """The process's API settings (cached; `create_app(settings=...)` overrides it)."""
    return ApiSettings()
