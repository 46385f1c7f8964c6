"""Desired state of the balancer: VIPs and their backends, and the rules they must follow.

Pure data (pydantic) and pure checks: nothing here touches the kernel or the disk.

- Field-level constraints (port range, weight range, literals) are pydantic constraints, so
  an API body that breaks them is refused by pydantic before it reaches the control plane.
- Rules across fields and against the configuration (address families, duplicates, limits)
  are checked by `validate_vip` / `validate_state`, which raise `lb.errors.InvalidInput` or
  `LimitReached` with `field` naming the offending field (``backends[3].address``).
- `Plan` and `Drift` are what the control plane reports for a whole-state change and for a
  difference between the maps and the desired state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Any, Literal, NamedTuple, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
)

from lb.config import (
    MIN_MTU,
    DataplaneConfig,
    encap_overhead,
    min_max_frame,
    unusable_reason,
)
from lb.consts import (
    F_ENCAP_GUE,
    F_HASH_SRC_ONLY,
    F_LRU_BYPASS,
    F_SRC_ALLOW,
    F_SRC_LB,
    F_SRC_RANGES,
)
from lb.errors import InvalidInput, LimitReached
from lb.health.policy import HealthCheck

Protocol = Literal["tcp", "udp"]
Encap = Literal["ipip", "gue"]
OuterSource = Literal["rss", "lb"]
BackendState = Literal["active", "draining", "disabled"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Highest backend weight (the same bound as lb.control.maglev.MAX_WEIGHT; test_model checks it).
MAX_WEIGHT = 1000
#: Outer source used when a VIP does not name one: IPIP spreads over the backend's RX
#: queues (RSS-friendly source), GUE already varies its UDP source port, so it uses the LB's
#: own address, which clouds and ISPs do not drop as spoofed (katran#116).
DEFAULT_OUTER_SOURCE: dict[str, OuterSource] = {"ipip": "rss", "gue": "lb"}

_PROTOCOLS: tuple[str, ...] = ("tcp", "udp")


_TEXT: dict[tuple[int, int], str] = {}


def _text(addr: IPAddress) -> str:
    # str() of an address costs microseconds (and so does hashing one: ipaddress hashes
    # hex text); identities are taken very often, so cache them by (version, integer).
    key = (addr.version, int(addr))
    text = _TEXT.get(key)
    if text is None:
        if len(_TEXT) >= 1 << 17:
            _TEXT.clear()
        text = _TEXT[key] = str(addr)
    return text


def zone_error(text: str, what: str) -> str:
    """Why an address with an IPv6 zone id (``%eth0``) is refused, for `what` (a message)."""
    host, _, zone = text.partition("%")
    return (
        f"{what} {text!r} has an IPv6 zone id (%{zone}): the data plane matches addresses "
        f"without one, so it would alias {host}; write the address without %{zone}"
    )


def _refuse_zone(v: object, what: str) -> object:
    # ipaddress keeps a zone id (scope_id) in equality and text but not in int(): two specs
    # would differ while the data plane keys them the same (issue 14, item 16).
    text = v if isinstance(v, str) else str(v) if isinstance(v, ipaddress.IPv6Address) else None
    if text is not None and "%" in text:
        raise ValueError(zone_error(text, what))
    if isinstance(v, str) and not v.isascii():
        raise ValueError(f"{what} {v!r} has characters that are not ASCII")
    return v


def _prefix_list(v: object) -> object:
    # Text prefixes with host bits set are refused by IPvAnyNetwork ("198.51.100.1/24"); a
    # bare address is its own /32 or /128. Zone ids and non-ASCII are refused as for addresses.
    if not isinstance(v, list):
        return v
    for item in v:
        _refuse_zone(item, "source prefix")
    return v


def parse_address(text: str, *, field: str, what: str = "address") -> IPAddress:
    """An address given as text (ASCII, no zone id); InvalidInput naming `field`."""
    stripped = text.strip()
    if "%" in stripped:
        raise InvalidInput(f"{field}: " + zone_error(stripped, what), field=field)
    try:
        if not stripped.isascii():
            raise ValueError
        return ipaddress.ip_address(stripped)
    except ValueError:
        raise InvalidInput(
            f"{field}: {text!r} is not an IPv4 or IPv6 address", field=field
        ) from None


class BackendSpec(BaseModel):
    """One backend of a VIP; its identity is its address in canonical text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: IPvAnyAddress = Field(description="backend address (IPv4 or IPv6)")
    weight: int = Field(1, ge=0, le=MAX_WEIGHT, description="relative share of new flows")
    state: BackendState = Field(
        "active",
        description="active: in the ring; draining: tracked flows only; disabled: out",
    )

    @field_validator("address", mode="before")
    @classmethod
    def _address(cls, v: object) -> object:
        return _refuse_zone(v, "backend address")

    @cached_property
    def identity(self) -> str:
        """Canonical text of the address (the backend's identity across VIPs).

        Computed once per spec: a change reads it about ten times per backend of the VIPs
        it touches (store refcounts, validation, ring key, image).
        """
        return _text(self.address)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False,
                   ) -> Self:
        """A copy with `update` applied (unvalidated, as pydantic's); identity follows it."""
        copy = super().model_copy(update=update, deep=deep)
        if update and "address" in update:
            copy.__dict__.pop("identity", None)  # cached from the old address
        return copy

    @property
    def in_ring(self) -> bool:
        """True when the backend takes new flows (active with a weight above 0)."""
        return self.state == "active" and self.weight > 0

    @property
    def in_reals(self) -> bool:
        """True when the data plane must still know the backend (tracked flows go on)."""
        return self.state != "disabled"


#: Default second-chance window (docs/second-chance.md): how long after a ring change the
#: slots that moved keep their previous backend as a second hop.
SECOND_CHANCE_WINDOW_S = 300.0
#: Longest window one may configure (a day).
MAX_SECOND_CHANCE_WINDOW_S = 86400.0

RingMembers = tuple[tuple[str, int], ...]


class SecondChanceWindow(BaseModel):
    """An open second-chance window (docs/second-chance.md): the ring's backends before the
    VIP's last ring change; every slot that moved since carries its previous backend as a
    second hop until `until`, and after it while a backend that left the ring is draining.
    Set and closed by the control plane; part of the stored state, so every LB host of a
    fleet builds the same second hops."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backends: list[tuple[str, int]] = Field(
        description="(address, weight) of the backends in the ring before the change")
    opened: float = Field(description="when the window opened (Unix time)")
    until: float = Field(description="when it closes (Unix time), drains permitting")

    def members(self) -> RingMembers:
        """The previous ring's (identity, weight) pairs, sorted like a ring key."""
        return tuple(sorted((a, w) for a, w in self.backends))


class VipSpec(BaseModel):
    """One VIP (protocol, address, port) with its flags, encapsulation and backends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Protocol = Field(description="tcp or udp")
    address: IPvAnyAddress = Field(description="VIP address (IPv4 or IPv6)")
    port: int = Field(ge=0, le=65535, description="destination port; 0 = every port")
    hash_src_only: bool = Field(False, description="hash on the client address only")
    lru_bypass: bool = Field(False, description="never use the connection table")
    encap: Encap = Field("ipip", description="ipip (IP-in-IP / IPv6) or gue (IP in UDP)")
    outer_source: OuterSource | None = Field(
        None, description="rss (flow-derived) or lb (own address); default rss/ipip, lb/gue"
    )
    backends: list[BackendSpec] = Field(default_factory=list)
    health_check: HealthCheck | None = Field(
        None, description="how the backends are probed (lb/health/policy.py); null: not checked"
    )
    second_chance: bool | None = Field(
        None, description="second chance (docs/second-chance.md): after a ring change, flows "
        "the connection table does not know get the slot's previous backend as a second hop; "
        "null: on for GUE VIPs (IPIP cannot carry a hop)")
    second_chance_window_s: float = Field(
        SECOND_CHANCE_WINDOW_S, ge=0, le=MAX_SECOND_CHANCE_WINDOW_S,
        description="how long a second-chance window stays open after a ring change "
        "(longer while a backend that left the ring drains); 0: no window")
    second_window: SecondChanceWindow | None = Field(
        None, description="the open second-chance window (set by the control plane)")
    allow: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="source prefixes let in; when any, every other source is dropped",
    )
    deny: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="source prefixes dropped (the longest matching prefix of both lists wins)",
    )

    @field_validator("address", mode="before")
    @classmethod
    def _address(cls, v: object) -> object:
        return _refuse_zone(v, "VIP address")

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _prefixes(cls, v: object) -> object:
        return _prefix_list(v)

    @property
    def second_chance_on(self) -> bool:
        """True when ring changes open a second-chance window (a GUE VIP, not switched off)."""
        return self.encap == "gue" and self.second_chance is not False

    def ring_members(self) -> RingMembers:
        """The backends that take new flows, as (identity, weight), sorted: the ring's key."""
        return tuple(sorted((b.identity, b.weight) for b in self.backends if b.in_ring))

    def window_open(self, now: float) -> bool:
        """True while the second-chance window is open: before `until`, or while a backend
        of the previous ring that left this one is draining."""
        w = self.second_window
        if w is None or not self.second_chance_on:
            return False
        if now < w.until:
            return True
        before = {a for a, _ in w.backends}
        return any(b.state == "draining" and b.identity in before for b in self.backends)

    @property
    def id(self) -> str:
        """The VIP's id: ``tcp:198.18.0.10:80``, ``udp:[2001:db8::10]:53``."""
        return vip_id(self.protocol, self.address, self.port)

    @property
    def effective_outer_source(self) -> OuterSource:
        """The outer source in force (the encapsulation's default when none is set)."""
        return self.outer_source or DEFAULT_OUTER_SOURCE[self.encap]

    @property
    def flags(self) -> int:
        """The data plane's F_* flags for this VIP (struct vip_meta.flags)."""
        f = 0
        if self.hash_src_only:
            f |= F_HASH_SRC_ONLY
        if self.lru_bypass:
            f |= F_LRU_BYPASS
        if self.encap == "gue":
            f |= F_ENCAP_GUE
        if self.effective_outer_source == "lb":
            f |= F_SRC_LB
        if self.allow or self.deny:
            f |= F_SRC_RANGES
        if self.allow:
            f |= F_SRC_ALLOW
        return f

    def backend(self, address: str) -> BackendSpec | None:
        """The backend with this address (any spelling), or None."""
        key = canonical_address(address, field="address")
        for b in self.backends:
            if b.identity == key:
                return b
        return None


class VipUpdate(BaseModel):
    """Changes to a VIP's flags and encapsulation; unset fields stay as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hash_src_only: bool | None = None
    lru_bypass: bool | None = None
    encap: Encap | None = None
    #: Explicitly set to None to go back to the encapsulation's default.
    outer_source: OuterSource | None = None
    #: Explicitly set to None to stop checking the VIP's backends.
    health_check: HealthCheck | None = None
    #: Explicitly set to None to go back to the default (on for GUE).
    second_chance: bool | None = None
    second_chance_window_s: float | None = Field(None, ge=0, le=MAX_SECOND_CHANCE_WINDOW_S)
    #: Replace the allow / deny list ([] or None empties it).
    allow: list[IPvAnyNetwork] | None = None
    deny: list[IPvAnyNetwork] | None = None

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _prefixes(cls, v: object) -> object:
        return None if v is None else _prefix_list(v)


class BackendUpdate(BaseModel):
    """Changes to a backend's weight and state; unset fields stay as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: int | None = Field(None, ge=0, le=MAX_WEIGHT)
    state: BackendState | None = None


class State(BaseModel):
    """The whole desired state and the generation it was stored at."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vips: list[VipSpec] = Field(default_factory=list)
    generation: int = Field(0, ge=0, description="bumped by every applied change")


class VipKey(NamedTuple):
    """The parts of a VIP id."""

    protocol: Protocol
    address: IPAddress
    port: int


class Limits(NamedTuple):
    """Capacity of the data plane as compiled (from lb.config.DataplaneConfig), and what of
    its configuration a VIP is checked against."""

    max_vips: int
    #: Usable backend slots: max_reals - 1, since index 0 means "no backend".
    max_backends: int
    #: Slots per ring; a VIP needs 100 per backend in its ring for 1% balance.
    ring_size: int
    #: Accept loopback backends (127.0.0.0/8, ::1): only for a one-host test bed of the health
    #: checker, whose probes reach them; the data plane can never deliver to one.
    loopback_backends: bool = False
    #: The LB's own outer source of each family (runtime.src_v4 / src_v6, or the interface's
    #: address), which `outer_source: lb` sends from: "" when it has none; None when it is
    #: not known here (a control plane without a data plane), so not checked.
    lb_source_v4: str | None = None
    lb_source_v6: str | None = None
    #: runtime.max_frame in force (0: no size check); None: not known here (not checked).
    max_frame: int | None = None
    #: Source-range entries each family's trie holds over all VIPs (None: not checked).
    max_src_ranges: int | None = None

    @classmethod
    def from_config(cls, config: DataplaneConfig) -> Limits:
        """Limits of a compiled data plane."""
        return cls(config.max_vips, config.max_reals - 1, config.ring_size,
                   max_src_ranges=config.max_src_ranges)


class BackendChange(BaseModel):
    """A backend whose weight or state differs between two states."""

    model_config = ConfigDict(frozen=True)

    address: str
    before: BackendSpec
    after: BackendSpec


class VipPlan(BaseModel):
    """What a whole-state change does to one VIP that exists before and after."""

    model_config = ConfigDict(frozen=True)

    vip_id: str
    flags_changed: bool = False
    #: The allow or deny list differs.
    ranges_changed: bool = False
    added_backends: list[str] = Field(default_factory=list)
    removed_backends: list[str] = Field(default_factory=list)
    changed_backends: list[BackendChange] = Field(default_factory=list)
    #: Fraction of ring slots that point to a different backend afterwards (0..1).
    moved_fraction: float = 0.0
    #: Slots that would carry a second hop (their previous backend) afterwards.
    second_hop_slots: int = 0


class Plan(BaseModel):
    """What applying a desired state would change (or did change)."""

    model_config = ConfigDict(frozen=True)

    from_generation: int
    added_vips: list[str] = Field(default_factory=list)
    removed_vips: list[str] = Field(default_factory=list)
    changed_vips: list[VipPlan] = Field(default_factory=list)
    #: Generation after the change was applied (None for a dry run or no change).
    to_generation: int | None = None

    @property
    def empty(self) -> bool:
        """True when the state would not change."""
        return not (self.added_vips or self.removed_vips or self.changed_vips)


DriftKind = Literal["vip_map", "vip_addrs", "vip_filter", "reals", "ch_rings", "src_ranges"]


class Drift(BaseModel):
    """One difference between what the maps hold and what the desired state says."""

    model_config = ConfigDict(frozen=True)

    map: DriftKind
    key: str = Field(description="the entry: VIP id, address, backend index, ring of a VIP")
    expected: str | None = Field(description="what the state says (None: no entry)")
    actual: str | None = Field(description="what the map holds (None: no entry)")


def vip_id(protocol: str, address: IPAddress, port: int) -> str:
    """Compose a VIP id; IPv6 addresses go in brackets."""
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{protocol}:{host}:{port}"


def canonical_address(text: str, *, field: str) -> str:
    """Canonical text of an address given in any spelling; InvalidInput naming `field`."""
    return str(parse_address(text, field=field))


def parse_vip_id(text: str) -> VipKey:
    """Split ``tcp:198.18.0.10:80`` / ``udp:[2001:db8::10]:53``; InvalidInput otherwise."""
    proto, sep, rest = text.partition(":")
    bad = InvalidInput(
        f"vip_id: {text!r} is not protocol:address:port "
        "(tcp:198.18.0.10:80, udp:[2001:db8::10]:53)",
        field="vip_id",
    )
    if not sep or proto.lower() not in _PROTOCOLS:
        raise bad
    host, sep, port_text = rest.rpartition(":")
    # ASCII only: str.isdigit() and int() also take '²' and Arabic-Indic digits, which
    # would alias another VIP's port (issue 14, item 18).
    if not sep or not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise bad
    if not host.isascii():
        raise bad
    if "%" in host:
        raise InvalidInput(f"vip_id: {zone_error(host.strip('[]'), 'VIP address')}",
                           field="vip_id")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise bad
    elif ":" in host:
        # IPv6 without brackets is ambiguous with the port separator.
        raise bad
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise bad from None
    port = int(port_text)
    if port > 65535:
        raise bad
    protocol: Protocol = "tcp" if proto.lower() == "tcp" else "udp"
    return VipKey(protocol, addr, port)


def invalid_from_validation(exc: ValidationError, *, prefix: str = "") -> InvalidInput:
    """Turn pydantic's first error into InvalidInput naming the field."""
    err = exc.errors()[0]
    parts: list[str] = []
    for p in err["loc"]:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    field = prefix + "".join(parts)
    return InvalidInput(f"{field or 'body'}: {err['msg']}", field=field or None)


def _check_address(addr: IPAddress, field: str, what: str, *, loopback: bool = False) -> None:
    why = unusable_reason(addr)
    if why is not None and not (loopback and addr.is_loopback):
        raise InvalidInput(f"{field}: {what} {addr} cannot work: it is {why}", field=field)


def validate_backend(
    vip: VipSpec, backend: BackendSpec, field: str, limits: Limits | None = None
) -> None:
    """Rules one backend must follow within its VIP; InvalidInput naming `field`."""
    _check_address(backend.address, f"{field}.address", "backend address",
                   loopback=limits is not None and limits.loopback_backends)
    if not 0 <= backend.weight <= MAX_WEIGHT:
        raise InvalidInput(
            f"{field}.weight: must be in 0..{MAX_WEIGHT}, got {backend.weight}",
            field=f"{field}.weight",
        )
    if vip.address.version == 6 and backend.address.version == 4:
        # The data plane encapsulates v4-in-v4, v6-in-v6 and v4-in-v6 only (as Katran).
        raise InvalidInput(
            f"{field}.address: an IPv6 VIP cannot have an IPv4 backend ({backend.address}); "
            "supported are IPv4 VIP -> IPv4/IPv6 backend and IPv6 VIP -> IPv6 backend",
            field=f"{field}.address",
        )


def _check_lb_source(vip: VipSpec, limits: Limits) -> None:
    # An unset source would put 0.0.0.0 / :: on the wire (issue 14, item 7).
    sources = {4: limits.lb_source_v4, 6: limits.lb_source_v6}
    why = "outer_source lb" if vip.outer_source else f"outer_source lb, the default for {vip.encap}"
    fix = "or use outer_source rss"
    if all(s == "" for s in sources.values()):
        raise InvalidInput(
            f"outer_source: VIP {vip.id} sends from the LB's own address ({why}), but neither "
            "runtime.src_v4 nor runtime.src_v6 is set and the interface has no address to take "
            f"them from: set XLB_RUNTIME__SRC_V4 / XLB_RUNTIME__SRC_V6 ([runtime] src_v4, src_v6) "
            f"{fix}",
            field="outer_source",
        )
    for b in vip.backends:
        if sources[b.address.version] == "":
            v = b.address.version
            raise InvalidInput(
                f"outer_source: VIP {vip.id} sends from the LB's own address ({why}) to IPv{v} "
                f"backend {b.identity}, but runtime.src_v{v} is not set and the interface has "
                f"no IPv{v} address to take it from: set XLB_RUNTIME__SRC_V{v} ([runtime] "
                f"src_v{v}) {fix}",
                field="outer_source",
            )


def _check_max_frame(vip: VipSpec, max_frame: int) -> None:
    # The too-big replies advertise max_frame - 14 - the encapsulation: below the family's
    # minimum MTU, clients ignore them (RFC 8201) and the VIP's large packets are lost.
    client = vip.address.version
    gue = vip.encap == "gue"
    for i, b in enumerate(vip.backends):
        outer = b.address.version
        need = min_max_frame(client, outer, gue)
        if max_frame < need:
            enc = f"{'GUE' if gue else 'IP'} over IPv{outer} ({encap_overhead(outer, gue)} bytes)"
            raise InvalidInput(
                f"backends[{i}].address: runtime.max_frame {max_frame} leaves IPv{client} "
                f"clients of {vip.id} an MTU of {max_frame - need + MIN_MTU[client]} after "
                f"{enc} to {b.identity}, below IPv{client}'s minimum of {MIN_MTU[client]}: "
                f"raise max_frame to at least {need} (XLB_RUNTIME__MAX_FRAME), or 0 (no check)",
                field=f"backends[{i}].address",
            )


def _check_src_ranges(vip: VipSpec, limits: Limits | None) -> None:
    # A VIP's ranges are of its own family (the trie it is looked up in), each listed once
    # over both lists, and fit the compiled trie.
    seen: dict[IPNetwork, str] = {}
    for name in ("allow", "deny"):
        for i, net in enumerate(getattr(vip, name)):
            field = f"{name}[{i}]"
            if net.version != vip.address.version:
                raise InvalidInput(
                    f"{field}: {net} is an IPv{net.version} prefix, but VIP {vip.id} is "
                    f"IPv{vip.address.version}: its clients' sources are IPv{vip.address.version}",
                    field=field,
                )
            if net in seen:
                raise InvalidInput(f"{field}: {net} is listed twice (also {seen[net]})",
                                   field=field)
            seen[net] = field
    most = limits.max_src_ranges if limits is not None else None
    if most is not None and len(seen) > most:
        field = "deny" if vip.deny else "allow"
        raise InvalidInput(
            f"{field}: {len(seen)} source prefixes exceed the compiled limit of {most} "
            "(dataplane.max_src_ranges)",
            field=field,
        )


def src_range_count(vips: Iterable[VipSpec]) -> dict[int, int]:
    """Source-range entries these VIPs need in each family's trie (4, 6)."""
    out = {4: 0, 6: 0}
    for v in vips:
        out[v.address.version] += len(v.allow) + len(v.deny)
    return out


def check_src_total(vips: Iterable[VipSpec], limits: Limits | None, field: str = "allow") -> None:
    """The ranges of all these VIPs fit each family's trie; InvalidInput naming `field`."""
    most = limits.max_src_ranges if limits is not None else None
    if most is None:
        return
    for family, n in src_range_count(vips).items():
        if n > most:
            raise InvalidInput(
                f"{field}: the VIPs would hold {n} IPv{family} source prefixes, over the "
                f"compiled limit of {most} (dataplane.max_src_ranges)",
                field=field,
            )


def validate_vip(vip: VipSpec, limits: Limits | None = None) -> None:
    """Rules a VIP must follow on its own; InvalidInput / LimitReached naming the field."""
    _check_address(vip.address, "address", "VIP address")
    _check_src_ranges(vip, limits)
    if vip.protocol not in _PROTOCOLS:
        raise InvalidInput(f"protocol: must be tcp or udp, got {vip.protocol!r}",
                           field="protocol")
    if not 0 <= vip.port <= 65535:
        raise InvalidInput(f"port: must be in 0..65535, got {vip.port}", field="port")
    if vip.health_check is not None and vip.health_check.port is None and vip.port == 0:
        raise InvalidInput(
            "health_check.port: a VIP on every port (port 0) needs a port to probe",
            field="health_check.port",
        )
    seen: dict[str, int] = {}
    for i, b in enumerate(vip.backends):
        field = f"backends[{i}]"
        validate_backend(vip, b, field, limits)
        if b.identity in seen:
            raise InvalidInput(
                f"{field}.address: backend {b.identity} is listed twice "
                f"(also backends[{seen[b.identity]}])",
                field=f"{field}.address",
            )
        seen[b.identity] = i
    if vip.second_chance and vip.encap != "gue":
        raise InvalidInput(
            "second_chance: only a GUE VIP can carry a second hop (encap: gue); IPIP has no "
            "room for it", field="second_chance")
    if limits is not None and vip.effective_outer_source == "lb":
        _check_lb_source(vip, limits)
    if limits is not None and limits.max_frame:
        _check_max_frame(vip, limits.max_frame)
    if limits is not None:
        in_ring = sum(1 for b in vip.backends if b.in_ring)
        most = limits.ring_size // 100
        if in_ring > most:
            raise LimitReached(
                f"backends: {in_ring} backends in the ring, but a ring of "
                f"{limits.ring_size} slots balances at most {most} (100 slots each)",
                field="backends",
            )


def with_second_window(old: VipSpec | None, new: VipSpec, now: float) -> VipSpec:
    """`new` as it is stored after replacing `old`: a change of the ring's backends opens a
    second-chance window on the ring `old` had (the last change wins: one previous ring);
    switching second chance off, or a window of 0, closes any window."""
    if not new.second_chance_on or new.second_chance_window_s == 0:
        if new.second_window is None:
            return new
        return new.model_copy(update={"second_window": None})
    if old is None:
        return new
    before = old.ring_members()
    if before == new.ring_members() or not before:
        return new
    window = SecondChanceWindow(backends=list(before),
                                opened=now, until=now + new.second_chance_window_s)
    return new.model_copy(update={"second_window": window})


def distinct_backends(vips: Iterable[VipSpec]) -> set[str]:
    """Identities of every backend of these VIPs (a shared backend counts once)."""
    return {b.identity for v in vips for b in v.backends}


def validate_state(vips: list[VipSpec], limits: Limits | None = None) -> None:
    """Rules for a whole set of VIPs: each VIP's rules, unique ids and the limits."""
    ids: dict[str, int] = {}
    for i, v in enumerate(vips):
        try:
            validate_vip(v, limits)
        except (InvalidInput, LimitReached) as e:
            field = f"vips[{i}].{e.field}" if e.field else f"vips[{i}]"
            raise type(e)(f"vips[{i}] ({v.id}): {e.detail}", field=field) from None
        if v.id in ids:
            raise InvalidInput(
                f"vips[{i}]: VIP {v.id} is listed twice (also vips[{ids[v.id]}])",
                field=f"vips[{i}]",
            )
        ids[v.id] = i
    if limits is None:
        return
    check_src_total(vips, limits, field="vips")
    if len(vips) > limits.max_vips:
        raise LimitReached(
            f"vips: {len(vips)} VIPs exceed the limit of {limits.max_vips} (max_vips)",
            field="vips",
        )
    n = len(distinct_backends(vips))
    if n > limits.max_backends:
        raise LimitReached(
            f"backends: {n} distinct backends exceed the limit of {limits.max_backends} "
            "(max_reals - 1; index 0 means no backend)",
            field="backends",
        )
