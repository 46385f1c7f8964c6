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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
