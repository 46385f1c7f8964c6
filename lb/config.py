"""Typed configuration of the data plane.

`DataplaneConfig` holds what is compiled into the program (sizes, feature switches) and turns
into the -D cflags that override xdp/common/consts.h. `RuntimeConfig` holds what the program reads
from its `lb_cfg` map at run time (gateway MAC, outer sources, GUE port, size limit), so it can
change without recompiling.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    field_validator,
    model_validator,
)

from lb.consts import CONN_WAYS

MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def is_prime(n: int) -> bool:
    """Deterministic primality for ring sizes (trial division is plenty below 2**31)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


class Features(BaseModel):
    """Compile-time feature switches (FEAT_* in xdp/common/consts.h)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    icmp_echo: bool = True
    icmp_fwd: bool = True
    too_big: bool = True
    gue: bool = True
    #: Counters per VIP-backend pair (pair_stats): one per-CPU hash lookup per packet.
    pair_stats: bool = True


class DataplaneConfig(BaseModel):
    """Build-time constants of the balancer program; `cflags()` renders them for BCC."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ring_size: int = Field(65537, description="Maglev ring slots per VIP (a prime)")
    max_vips: int = Field(512, ge=1, le=65536)
    max_reals: int = Field(4096, ge=2, le=1 << 20, description="backend slots; 0 is reserved")
    conn_table_size: int = Field(
        4_194_304, ge=1024, le=1 << 28,
        description="connection-table slots (16 bytes each), rounded up to a power of two;"
        " sets of 8, so hold about a quarter as many flows before sets fill",
    )
    max_vip_backends: int = Field(
        16384, ge=1, le=1 << 22,
        description="VIP-backend pairs with their own counters (pair_stats entries,"
        " 24 bytes per possible CPU each)",
    )
    features: Features = Features()

    @field_validator("ring_size")
    @classmethod
    def _ring_is_prime(cls, v: int) -> int:
        if v < 3 or v > (1 << 24) or not is_prime(v):
            raise ValueError(f"ring_size must be a prime between 3 and 16777216, got {v}")
        return v

    @model_validator(mode="after")
    def _ring_fits(self) -> DataplaneConfig:
        # ch_rings is one flat array indexed by a u32.
        if self.max_vips * self.ring_size >= 1 << 32:
            raise ValueError(
                f"max_vips * ring_size = {self.max_vips * self.ring_size} exceeds 2**32 slots"
            )
        return self

    @property
    def conn_sets(self) -> int:
        """Sets of the connection table: a power of two, CONN_WAYS slots each."""
        need = -(-self.conn_table_size // CONN_WAYS)
        return 1 << (need - 1).bit_length()

    @property
    def conn_capacity(self) -> int:
        """Slots the connection table really has (conn_table_size rounded up)."""
        return self.conn_sets * CONN_WAYS

    def cflags(self) -> list[str]:
        """The -D flags that override xdp/common/consts.h defaults."""
        f = self.features
        return [
            f"-DRING_SIZE={self.ring_size}",
            f"-DMAX_VIPS={self.max_vips}",
            f"-DMAX_REALS={self.max_reals}",
            f"-DCONN_SETS={self.conn_sets}",
            f"-DFEAT_ICMP_ECHO={int(f.icmp_echo)}",
            f"-DFEAT_ICMP_FWD={int(f.icmp_fwd)}",
            f"-DFEAT_TOO_BIG={int(f.too_big)}",
            f"-DFEAT_GUE={int(f.gue)}",
            f"-DMAX_PAIRS={self.max_vip_backends}",
            f"-DFEAT_PAIR_STATS={int(f.pair_stats)}",
        ]


class RuntimeConfig(BaseModel):
    """Values of the `lb_cfg` map, read by the program on every packet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gateway_mac: str = Field("00:00:00:00:00:00", description="next hop of encapsulated frames")
    gue_port: int = Field(6080, ge=1, le=65535, description="GUE destination UDP port")
    src_v4: ipaddress.IPv4Address = Field(
        ipaddress.IPv4Address("0.0.0.0"), description="LB's own outer IPv4 source"
    )
    src_v6: ipaddress.IPv6Address = Field(
        ipaddress.IPv6Address("::"), description="LB's own outer IPv6 source"
    )
    rss_v4: ipaddress.IPv4Network = Field(
        ipaddress.IPv4Network("198.19.0.0/16"),
        description="RSS-friendly outer IPv4 source prefix (a /16)",
    )
    rss_v6: ipaddress.IPv6Network = Field(
        ipaddress.IPv6Network("2001:db8:ffff:ffff::/64"),
        description="RSS-friendly outer IPv6 source prefix (a /64)",
    )
    max_frame: int = Field(
        1514, ge=0, le=65535, description="largest frame sent, Ethernet header included; 0 = off"
    )
    udp_timeout_s: float = Field(30.0, gt=0, le=86400, description="UDP flow idle timeout")
    # IPVS's default for established TCP: a client that vanished without FIN stops counting
    # as live (and its slot becomes reusable) after this long without a packet.
    tcp_timeout_s: float = Field(
        900.0, ge=0, le=86400, description="TCP flow idle timeout (0 = never)"
    )

    @field_validator("gateway_mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        if not MAC_RE.match(v):
            raise ValueError(f"gateway_mac must look like 02:00:00:00:00:01, got {v!r}")
        return v.lower()

    @field_validator("rss_v4")
    @classmethod
    def _v4_16(cls, v: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        if v.prefixlen != 16:
            raise ValueError(f"rss_v4 must be a /16, got /{v.prefixlen}")
        return v

    @field_validator("rss_v6")
    @classmethod
    def _v6_64(cls, v: ipaddress.IPv6Network) -> ipaddress.IPv6Network:
        if v.prefixlen != 64:
            raise ValueError(f"rss_v6 must be a /64, got /{v.prefixlen}")
        return v


def xdp_source_dir() -> Path:
    """Directory holding the data plane's C sources.

    An installed wheel carries them as lb/dataplane/xdp/ (pyproject.toml maps the checkout's
    top-level xdp/ there); a checkout or an editable install uses xdp/ next to lb/.
    """
    here = Path(__file__).resolve().parent
    packaged = here / "dataplane" / "xdp"
    return packaged if packaged.is_dir() else here.parent / "xdp"


# BGP (lb/fleet/bgp.py drives a BIRD 2 speaker from these settings).

_COMMUNITY_RE = re.compile(r"^\d{1,10}:\d{1,10}(:\d{1,10})?$")
_BIRD_TEXT_RE = re.compile(r'^[^"\\\n\r]*$')
ASN_MAX = 4_294_967_295


class BgpPeer(BaseModel):
    """One BGP neighbour (the ToR router); it carries the VIPs of its own address family."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: IPvAnyAddress = Field(
        description="the router's address on a directly connected link"
    )
    asn: int = Field(ge=1, le=ASN_MAX, description="the router's AS number")
    port: int = Field(179, ge=1, le=65535, description="the router's BGP port")
    password: str | None = Field(
        None, min_length=1, max_length=80, description="TCP MD5 password (RFC 2385)"
    )

    @field_validator("password")
    @classmethod
    def _password(cls, v: str | None) -> str | None:
        if v is not None and not _BIRD_TEXT_RE.match(v):
            raise ValueError("password must not contain quotes, backslashes or newlines")
        return v


class BgpConfig(BaseModel):
    """How this LB host announces its VIP addresses (/32, /128) to its routers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="announce the VIPs by BGP")
    asn: int | None = Field(None, ge=1, le=ASN_MAX, description="this host's AS number")
    router_id: ipaddress.IPv4Address | None = Field(
        None, description="BGP router id; None = BIRD picks the lowest IPv4 address"
    )
    peers: list[BgpPeer] = Field(default_factory=list, max_length=64)
    # RFC 4271: 0 (no keepalives) or at least 3 s. A dead host is dropped after hold_time.
    hold_time: int = Field(3, ge=3, le=65535, description="BGP hold time (s)")
    keepalive_time: int | None = Field(
        None, ge=1, le=21845, description="keepalive interval (s); None = hold_time / 3"
    )
    connect_retry_s: int = Field(1, ge=1, le=3600, description="reconnect interval (s)")
    communities: list[str] = Field(
        default_factory=list, max_length=32,
        description="communities on every VIP route: 'ASN:VALUE' or large 'ASN:A:B'",
    )
    bird: str = Field("bird", description="the BIRD 2 daemon binary")
    birdc: str = Field("birdc", description="BIRD's control client binary")
    sync_interval_s: float = Field(
        0.5, gt=0, le=60, description="how often the daemon compares routes with its state"
    )

    @field_validator("communities")
    @classmethod
    def _communities(cls, v: list[str]) -> list[str]:
        for i, c in enumerate(v):
            parts = c.split(":")
            if not _COMMUNITY_RE.match(c):
                raise ValueError(f"communities[{i}] must be 'ASN:VALUE' or 'ASN:A:B', got {c!r}")
            nums = [int(p) for p in parts]
            limit = 65535 if len(nums) == 2 else ASN_MAX
            if any(n > limit for n in nums):
                raise ValueError(
                    f"communities[{i}]: each part of {c!r} must be <= {limit}"
                    f" ({'standard' if len(nums) == 2 else 'large'} community), got {c!r}"
                )
        return v

    @model_validator(mode="after")
    def _complete(self) -> BgpConfig:
        if self.keepalive_time is not None and self.keepalive_time >= self.hold_time:
            raise ValueError(
                f"keepalive_time must be below hold_time ({self.hold_time}),"
                f" got {self.keepalive_time}"
            )
        if not self.enabled:
            return self
        if self.asn is None:
            raise ValueError("bgp.asn is required when bgp.enabled, got none")
        if not self.peers:
            raise ValueError("bgp.peers needs at least one peer when bgp.enabled, got none")
        seen = set()
        for i, p in enumerate(self.peers):
            if p.address in seen:
                raise ValueError(f"peers[{i}].address {p.address} is listed twice, got a duplicate")
            seen.add(p.address)
        return self

    @property
    def keepalive(self) -> int:
        """The keepalive interval in force."""
        return self.keepalive_time or max(1, self.hold_time // 3)
