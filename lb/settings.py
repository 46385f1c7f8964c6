"""Settings of a running xlb: a TOML file plus XLB_* environment variables.

Sources, highest precedence first: keyword arguments to `load_settings`, environment
variables (`XLB_INTERFACE`, nested with `__`: `XLB_DATAPLANE__RING_SIZE`,
`XLB_RUNTIME__GATEWAY_MAC`), the TOML file named by the `path` argument or `XLB_CONFIG`,
then defaults. The data-plane fields are not repeated here: `dataplane` is
lb.config.DataplaneConfig (compiled in) and `runtime` is lb.config.RuntimeConfig (lb_cfg map).

No module here touches the kernel; lb/dataplane/host.py turns settings into a running data plane.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lb.config import MIN_MTU, BgpConfig, DataplaneConfig, EtcdConfig, RuntimeConfig, min_max_frame
from lb.errors import InvalidInput

XdpMode = Literal["native", "generic", "auto"]
StoreKind = Literal["sqlite", "etcd"]

CONFIG_ENV = "XLB_CONFIG"
# The zero MAC is never a usable next hop, so it doubles as "resolve it from the route".
UNSET_MAC = "00:00:00:00:00:00"

# Which file `Settings()` reads, set by load_settings for the duration of one construction.
_config_file: ContextVar[Path | None] = ContextVar("xlb_config_file", default=None)


class Settings(BaseSettings):
    """Everything a running xlb is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="XLB_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    interface: str | None = Field(
        None, description="interface the balancer is attached to; None = load but don't attach"
    )
    netns: str | None = Field(
        None, description="named network namespace holding the interface; None = the current one"
    )
    xdp_mode: XdpMode = Field(
        "auto", description="native, generic, or auto (native, else generic, with the reason)"
    )
    replace_foreign: bool = Field(
        False, description="replace an XDP program on the interface that is not xlb's"
    )
    xdp_chain: bool = Field(
        False,
        description="attach the root program that runs operator filters before the balancer"
        " (docs/chain.md); also on while a filter is in the chain",
    )
    state_dir: Path = Field(Path("/var/lib/xlb"), description="durable control-plane state")
    pin_dir: Path = Field(
        Path("/sys/fs/bpf/xlb"), description="bpffs directory where the maps are pinned"
    )
    store: StoreKind = Field(
        "sqlite", description="sqlite: this host's own state; etcd: one state for the fleet"
    )
    etcd: EtcdConfig = Field(EtcdConfig(), description="the etcd cluster (store = etcd)")
    dataplane: DataplaneConfig = Field(
        DataplaneConfig(), description="compile-time sizes and features"
    )
    runtime: RuntimeConfig = Field(
        RuntimeConfig(), description="values of the lb_cfg map (gateway MAC, outer sources, ...)"
    )
    bgp: BgpConfig = Field(BgpConfig(), description="VIP announcement by BGP (lb/fleet/bgp.py)")

    @field_validator("interface")
    @classmethod
    def _ifname(cls, v: str | None) -> str | None:
        # IFNAMSIZ - 1; "" (an empty env var) means unset.
        if not v:
            return None
        if len(v) > 15 or "/" in v or any(c.isspace() for c in v):
            raise ValueError(f"must be an interface name (<= 15 chars, no / or space), got {v!r}")
        return v

    @field_validator("netns")
    @classmethod
    def _nsname(cls, v: str | None) -> str | None:
        # A named namespace is a file in /run/netns.
        if not v:
            return None
        if "/" in v or v in (".", "..") or len(v) > 255:
            raise ValueError(f"must be a namespace name as in /run/netns, got {v!r}")
        return v

    @field_validator("state_dir", "pin_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(v)!r}")
        return v

    @field_validator("runtime")
    @classmethod
    def _max_frame_fits(cls, runtime: RuntimeConfig) -> RuntimeConfig:
        # Below this no VIP can work: an IPv4 client behind IPIP over IPv4 (the smallest
        # encapsulation) would be told an MTU under IPv4's 68. Larger needs (IPv6 clients:
        # 1280, GUE, IPv6 backends) are checked per VIP by the control plane. Checked here,
        # not in RuntimeConfig, so packet tests can still program any size.
        frame = runtime.max_frame
        least = min_max_frame(4, 4, gue=False)
        if frame and frame < least:
            raise ValueError(
                f"max_frame {frame} leaves IPv4 clients an MTU of "
                f"{frame - least + MIN_MTU[4]} after IPIP (20 bytes), below IPv4's minimum of "
                f"{MIN_MTU[4]}: use at least {least} (1342 for IPv6 clients behind any "
                f"encapsulation), or 0 (no check) (XLB_RUNTIME__MAX_FRAME, got {frame})"
            )
        return runtime

    @property
    def gateway_mac_unset(self) -> bool:
        """True when the gateway MAC is to be resolved from the default route's neighbour."""
        return self.runtime.gateway_mac == UNSET_MAC

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then XLB_* variables, then the config file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        # load_settings passes its path here; a bare Settings() still honours $XLB_CONFIG.
        path = _config_file.get() or _config_path(None)
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def known_env_names() -> set[str]:
    """Every XLB_* variable Settings reads (nested ones as `XLB_RUNTIME__MAX_FRAME`)."""
    names = {CONFIG_ENV}

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, info in model.model_fields.items():
            env = f"{prefix}{name.upper()}"
            names.add(env)
            sub = info.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(env + "__", sub)

    walk("XLB_", Settings)
    return names


def _config_path(path: Path | str | None) -> Path | None:
    raw = path if path is not None else os.environ.get(CONFIG_ENV) or None
    if raw is None:
        return None
    p = Path(raw)
    origin = "config path" if path is not None else CONFIG_ENV
    if p.suffix.lower() not in (".toml",):
        raise InvalidInput(
            f"{origin} {str(p)!r}: the configuration file must be TOML (*.toml)", field="config"
        )
    if not p.is_file():
        raise InvalidInput(f"{origin} {str(p)!r}: no such file", field="config")
    return p


def _describe(e: ValidationError) -> tuple[str, str]:
    lines, first = [], ""
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "settings"
        first = first or loc
        msg = err["msg"].removeprefix("Value error, ")
        env = "XLB_" + "__".join(str(x).upper() for x in err["loc"])
        # Our own validators already quote the value ("..., got 4098").
        quiet = err["type"] == "missing" or "got " in msg
        got = "" if quiet else f" (got {err.get('input')!r})"
        lines.append(f"{loc}: {msg}{got} [file key {loc} or env {env}]")
    return first, "; ".join(lines)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read settings from `path` (else $XLB_CONFIG, else none), the environment and overrides.

    Invalid values raise InvalidInput naming every offending field and its rule.
    """
    p = _config_path(path)
    token = _config_file.set(p)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        field, text = _describe(e)
        where = f" in {p} / environment" if p else " in environment"
        raise InvalidInput(f"invalid configuration{where}: {text}", field=field) from e
    except ValueError as e:  # a TOML syntax error
        raise InvalidInput(f"invalid configuration file {p}: {e}", field="config") from e
    finally:
        _config_file.reset(token)
