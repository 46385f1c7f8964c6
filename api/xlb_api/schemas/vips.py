"""Schemas of the VIP resource."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lb.control.model import (
    MAX_SECOND_CHANCE_WINDOW_S,
    SECOND_CHANCE_WINDOW_S,
    Encap,
    OuterSource,
    Protocol,
    SecondChanceWindow,
    VipSpec,
)
from lb.health.policy import HealthCheck
from xlb_api.schemas.backends import BackendCreate, BackendPublic
from xlb_api.schemas.common import Address, Prefix


class VipCreate(BaseModel):
    """A VIP to create, optionally with its first backends."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"protocol": "tcp", "address": "198.18.0.10", "port": 80},
                {"protocol": "udp", "address": "2001:db8::10", "port": 53, "encap": "gue"},
            ]
        },
    )

    protocol: Protocol = Field(description="tcp or udp")
    address: Address
    port: int = Field(ge=0, le=65535, description="destination port; 0 = every port")
    hash_src_only: bool = Field(False, description="hash on the client address only")
    lru_bypass: bool = Field(False, description="never use the connection table")
    encap: Encap = Field("ipip", description="ipip (IP-in-IP / IPv6-in-IPv6) or gue")
    outer_source: OuterSource | None = Field(
        None, description="rss (flow-derived) or lb (own address); default rss for ipip, lb for gue"
    )
    backends: list[BackendCreate] = Field(default_factory=list)
    health_check: HealthCheck | None = Field(
        None, description="probe the backends and take failing ones out of the ring"
    )
    second_chance: bool | None = Field(
        None, description="second chance after ring changes (docs/second-chance.md); "
        "null: on for GUE VIPs; IPIP VIPs cannot have it"
    )
    second_chance_window_s: float = Field(
        SECOND_CHANCE_WINDOW_S, ge=0, le=MAX_SECOND_CHANCE_WINDOW_S,
        description="how long slots that moved keep their previous backend as a second hop",
    )
    allow: list[Prefix] = Field(
        default_factory=list,
        description="source prefixes let in; when any, every other source is dropped",
    )
    deny: list[Prefix] = Field(
        default_factory=list,
        description="source prefixes dropped; the longest matching prefix of both lists wins",
    )

    def to_spec(self) -> VipSpec:
        """The model's VIP."""
        return VipSpec(
            protocol=self.protocol,
            address=self.address,
            port=self.port,
            hash_src_only=self.hash_src_only,
            lru_bypass=self.lru_bypass,
            encap=self.encap,
            outer_source=self.outer_source,
            backends=[b.to_spec() for b in self.backends],
            health_check=self.health_check,
            second_chance=self.second_chance,
            second_chance_window_s=self.second_chance_window_s,
            allow=self.allow,
            deny=self.deny,
        )


class VipUpdate(BaseModel):
    """Changes to a VIP's flags and encapsulation; fields left out stay as they are.

    null goes back to the default: `hash_src_only`/`lru_bypass` false, `encap` ipip,
    `outer_source` the encapsulation's default, `health_check` none, `allow`/`deny` empty.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"encap": "gue", "hash_src_only": True}]},
    )

    hash_src_only: bool | None = Field(None, description="null: back to false")
    lru_bypass: bool | None = Field(None, description="null: back to false")
    encap: Encap | None = Field(None, description="null: back to ipip")
    outer_source: OuterSource | None = Field(
        None, description="null: back to the encapsulation's default"
    )
    health_check: HealthCheck | None = Field(None, description="null removes the check")
    second_chance: bool | None = Field(None, description="null: back to the default (on for GUE)")
    second_chance_window_s: float | None = Field(
        None, ge=0, le=MAX_SECOND_CHANCE_WINDOW_S, description="null: back to the default"
    )
    allow: list[Prefix] | None = Field(None, description="the new allow list; null/[] empties")
    deny: list[Prefix] | None = Field(None, description="the new deny list; null/[] empties")


class VipPublic(BaseModel):
    """A VIP as the API shows it."""

    id: str = Field(description="protocol:address:port, IPv6 in brackets")
    protocol: Protocol
    address: str
    port: int
    hash_src_only: bool
    lru_bypass: bool
    encap: Encap
    outer_source: OuterSource | None = Field(description="as configured (null: the default)")
    effective_outer_source: OuterSource
    backends: list[BackendPublic]
    health_check: HealthCheck | None = Field(None, description="the check (null: none)")
    allow: list[str] = Field(default_factory=list, description="source prefixes let in")
    deny: list[str] = Field(default_factory=list, description="source prefixes dropped")
    ring_fingerprint: str | None = Field(
        None, description="hash of the ring's slots by backend (GET of one VIP; compare hosts)"
    )
    second_chance: bool | None = Field(None, description="as configured (null: the default)")
    second_chance_on: bool = Field(False, description="in force: ring changes open a window")
    second_chance_window_s: float = SECOND_CHANCE_WINDOW_S
    second_window: SecondChanceWindow | None = Field(
        None, description="the open second-chance window: the previous ring's backends and "
        "when it closes"
    )

    @classmethod
    def of(cls, spec: VipSpec) -> VipPublic:
        """Render a model VIP."""
        return cls(
            id=spec.id,
            protocol=spec.protocol,
            address=str(spec.address),
            port=spec.port,
            hash_src_only=spec.hash_src_only,
            lru_bypass=spec.lru_bypass,
            encap=spec.encap,
            outer_source=spec.outer_source,
            effective_outer_source=spec.effective_outer_source,
            backends=[BackendPublic.of(b) for b in spec.backends],
            health_check=spec.health_check,
            second_chance=spec.second_chance,
            second_chance_on=spec.second_chance_on,
            second_chance_window_s=spec.second_chance_window_s,
            second_window=spec.second_window,
            allow=[str(n) for n in spec.allow],
            deny=[str(n) for n in spec.deny],
        )


class VipsPublic(BaseModel):
    """Every VIP."""

    data: list[VipPublic]
    count: int
