"""Typed configuration of the data plane.

`DataplaneConfig` holds what is compiled into the program (sizes, feature switches) and turns
into the -D cflags that override xdp/common/consts.h. `RuntimeConfig` holds what the program reads
from its `lb_cfg` map at run time (gateway MAC, outer sources, GUE port, size limit), so it can
change without recompiling.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    SecretStr,
    field_validator,
    model_validator,
)

from lb.consts import CONN_WAYS, GUARD_WINDOW_SHIFT

MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

#: Bytes of Ethernet header max_frame counts (like MTU + 14).
ETH_HLEN = 14
#: Smallest MTU each IP version must be able to use (RFC 791: 68, RFC 8200: 1280).
MIN_MTU = {4: 68, 6: 1280}


def encap_overhead(outer_version: int, gue: bool) -> int:
    """Bytes the encapsulation adds: the outer IP header, and GUE's UDP header."""
    return (20 if outer_version == 4 else 40) + (8 if gue else 0)


def min_max_frame(client_version: int, outer_version: int, gue: bool) -> int:
    """Smallest max_frame that leaves clients of `client_version` their minimum MTU."""
    return ETH_HLEN + encap_overhead(outer_version, gue) + MIN_MTU[client_version]


#: Ranges no VIP or backend can be in, with the reason (RFC 6890 special-purpose blocks that
#: are never routed between hosts). Checked in order; the first match names the reason.
_UNUSABLE: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "in 0.0.0.0/8 ('this network', RFC 1122), never a "
     "destination"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "a loopback address (127.0.0.0/8): it never "
     "leaves the host"),
    (ipaddress.IPv6Network("::1/128"), "the loopback address (::1): it never leaves the host"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local (169.254.0.0/16): it is not routed "
     "beyond one link"),
    (ipaddress.IPv6Network("fe80::/10"), "link-local (fe80::/10): it is not routed beyond one "
     "link"),
    (ipaddress.IPv4Network("255.255.255.255/32"), "the broadcast address"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "in 240.0.0.0/4 (reserved, RFC 1112): hosts and "
     "routers drop it"),
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped IPv6 (::ffff:0:0/96): it is an IPv4 "
     "address in a socket API and never appears on the wire; write the IPv4 address"),
)


def unusable_reason(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `addr` cannot be a VIP or a backend (None: it can)."""
    if addr.is_unspecified:
        return "the unspecified address"
    if addr.is_multicast:
        return "a multicast address"
    for net, why in _UNUSABLE:
        if addr.version == net.version and addr in net:
            return why
    return None




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
    #: Counters per VIP-backend pair (pair_cache, pair_stats): one per-CPU array slot per
    #: packet (a per-CPU hash lookup for a pair whose slot another pair holds).
    pair_stats: bool = True


class DataplaneConfig(BaseModel):
    """Build-time constants of the balancer program; `cflags()` renders them for BCC."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ring_size: int = Field(65537, description="Maglev ring slots per VIP (a prime)")
    max_vips: int = Field(512, ge=1, le=65536)
    # At most 2^16: a ch_rings word packs a backend index and its second hop in 16 bits each.
    max_reals: int = Field(4096, ge=2, le=1 << 16, description="backend slots; 0 is reserved")
    conn_table_size: int = Field(
        4_194_304, ge=1024, le=1 << 28,
        description="connection-table slots (16 bytes each), rounded up to a power of two;"
        " sets of 8, so hold about a quarter as many flows before sets fill",
    )
    max_vip_backends: int = Field(
        16384, ge=1, le=1 << 22,
        description="VIP-backend pairs with their own counters (pair_stats entries,"
        " 24 bytes per possible CPU each, behind pair_cache: as many slots rounded up to a"
        " power of two, at most 16384, 32 bytes per possible CPU each)",
    )
    max_src_ranges: int = Field(
        16384, ge=1, le=1 << 24,
        description="source-range entries per address family over all VIPs (src_v4, src_v6)",
    )
    features: Features = Features()

    @field_validator("ring_size")
    @classmethod
    def _ring_is_prime(cls, v: int) -> int:
        # At least 101: a ring balances ring_size // 100 backends, so below that no VIP
        # could have a backend in its ring.
        if v < 101 or v > (1 << 24) or not is_prime(v):
            raise ValueError(f"ring_size must be a prime between 101 and 16777216, got {v}")
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

    @property
    def pair_slots_log2(self) -> int:
        """log2 of pair_cache's slots: the power of two at or above max_vip_backends, from
        2^4 to 2^14 (pairs past it, or whose slot another pair holds, count in pair_stats)."""
        return min(max((self.max_vip_backends - 1).bit_length(), 4), 14)

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
            f"-DPAIR_SLOTS_LOG2={self.pair_slots_log2}",
            f"-DFEAT_PAIR_STATS={int(f.pair_stats)}",
            f"-DMAX_SRC_RANGES={self.max_src_ranges}",
        ]


GuardMode = Literal["off", "auto", "always"]


class ProtectConfig(BaseModel):
    """The SYN-flood guard and the rate limits of the replies the LB sends (guard_cfg map,
    docs/protection.md). Rates are per CPU, as the buckets are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    syn_guard: GuardMode = Field(
        "auto",
        description="off: every SYN inserts; auto: flood mode above syn_flood_rate; always:"
        " SYNs never insert (flows are tracked from their second packet)",
    )
    syn_flood_rate: int = Field(
        50_000, ge=1, le=100_000_000,
        description="SYNs per second per CPU above which a CPU is in flood mode (auto)",
    )
    echo_rate: int = Field(
        1000, ge=0, le=100_000_000, description="ICMP echo replies per second per CPU; 0 = no limit"
    )
    echo_burst: int = Field(50, ge=1, le=1_000_000, description="echo replies sent back to back")
    too_big_rate: int = Field(
        1000, ge=0, le=100_000_000, description="too-big replies per second per CPU; 0 = no limit"
    )
    too_big_burst: int = Field(50, ge=1, le=1_000_000, description="too-big replies back to back")

    @property
    def syn_per_window(self) -> int:
        """syn_flood_rate in SYNs per guard window (2**GUARD_WINDOW_SHIFT ns)."""
        return max(1, self.syn_flood_rate * (1 << GUARD_WINDOW_SHIFT) // 1_000_000_000)


class RuntimeConfig(BaseModel):
    """Values of the `lb_cfg` map, read by the program on every packet (and, in `protect`,
    of guard_cfg)."""

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
    protect: ProtectConfig = Field(
        ProtectConfig(), description="SYN-flood guard and reply rate limits (guard_cfg)"
    )

    @field_validator("gateway_mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        if not MAC_RE.match(v):
            raise ValueError(f"gateway_mac must look like 02:00:00:00:00:01, got {v!r}")
        return v.lower()

    @field_validator("gateway_mac")
    @classmethod
    def _unicast_mac(cls, v: str) -> str:
        # A group address (first octet's low bit) floods every frame to the whole segment.
        if int(v[:2], 16) & 1:
            raise ValueError(f"gateway_mac {v} is a multicast/broadcast MAC: give the next "
                             "hop's own (unicast) MAC, or leave it unset to resolve it")
        return v

    @field_validator("src_v4", "src_v6")
    @classmethod
    def _source(cls, v: ipaddress.IPv4Address | ipaddress.IPv6Address,
                ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        # Unspecified means "not set" (taken from the interface); anything else is sent.
        why = None if v.is_unspecified else unusable_reason(v)
        if why is not None:
            raise ValueError(f"{v} cannot be an outer source address: it is {why}")
        return v

    @field_validator("rss_v4")
    @classmethod
    def _v4_16(cls, v: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        if v.prefixlen != 16:
            raise ValueError(f"rss_v4 must be a /16, got /{v.prefixlen}")
        return _rss_usable(v)

    @field_validator("rss_v6")
    @classmethod
    def _v6_64(cls, v: ipaddress.IPv6Network) -> ipaddress.IPv6Network:
        if v.prefixlen != 64:
            raise ValueError(f"rss_v6 must be a /64, got /{v.prefixlen}")
        return _rss_usable(v)


_Net = TypeVar("_Net", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _rss_usable(net: _Net) -> _Net:
    # Every address of the prefix is sent as an outer source: none may be unusable.
    for addr in (net.network_address, net.broadcast_address):
        why = unusable_reason(addr)
        if why is not None:
            raise ValueError(f"{net} cannot hold outer source addresses: {addr} is {why}")
    return net


class EtcdConfig(BaseModel):
    """Where the fleet's shared desired state lives when `store = "etcd"` (lb/fleet/state.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: list[str] = Field(
        ["127.0.0.1:2379"], description="etcd members as host:port (IPv6 as [addr]:port)"
    )
    prefix: str = Field("/xlb/", description="key prefix of this fleet's state in etcd")
    host_name: str = Field(
        default_factory=socket.gethostname,
        description="this LB host's name in the fleet (fleet status, health opinions)",
    )
    ca_file: Path | None = Field(None, description="CA bundle: connect with TLS")
    cert_file: Path | None = Field(None, description="client certificate (TLS), with key_file")
    key_file: Path | None = Field(None, description="client key (TLS), with cert_file")
    username: str | None = Field(None, description="etcd user (with password)")
    password: SecretStr | None = Field(None, description="etcd password (with username)")
    timeout_s: float = Field(2.0, gt=0, le=60, description="time one etcd call may take")
    lease_ttl_s: int = Field(
        5, ge=2, le=300, description="life of a host's health opinions when it stops"
    )

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("endpoints must name at least one etcd member (host:port), got []")
        out = []
        for e in v:
            host, sep, port = e.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(
                    f"each endpoint must be host:port with a port 1-65535, got {e!r}"
                )
            if host.startswith("[") != host.endswith("]"):
                raise ValueError(f"an IPv6 endpoint must look like [2001:db8::1]:2379, got {e!r}")
            out.append(f"{host}:{int(port)}")
        return out

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or any(c.isspace() for c in v) or len(v) > 200:
            raise ValueError(f"prefix must start with / and hold no spaces (<= 200), got {v!r}")
        return v if v.endswith("/") else v + "/"

    @field_validator("host_name")
    @classmethod
    def _host_name(cls, v: str) -> str:
        if not v or len(v) > 64 or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(
                f"host_name must be 1-64 letters, digits, '.', '_' or '-', got {v!r}"
            )
        return v

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"no such file: {str(v)!r}")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> EtcdConfig:
        # "got ..." keeps the settings loader from echoing the input (a password).
        if (self.cert_file is None) != (self.key_file is None):
            only = "cert_file" if self.key_file is None else "key_file"
            raise ValueError(f"cert_file and key_file go together, got only {only}")
        if (self.username is None) != (self.password is None):
            only = "username" if self.password is None else "password"
            raise ValueError(f"username and password go together, got only {only}")
        return self


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
