"""Schemas of this LB host in the fleet: its BGP announcement and drain flag."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PeerPublic(BaseModel):
    """One BGP session of the host's speaker."""

    name: str = Field(description="BIRD protocol name")
    address: str
    asn: int
    up: bool = Field(description="the session is established")
    state: str = Field(description="BGP state: Established, Active, Connect, Idle, ...")
    info: str = Field(description="BIRD's note (e.g. the last error)")
    since: float | None = Field(description="when the state last changed (epoch s)")
    routes_exported: int = Field(description="VIP routes announced to this peer")


class SpeakerPublic(BaseModel):
    """The BGP speaker process (BIRD 2) of this host."""

    running: bool
    pid: int | None
    routes: list[str] = Field(description="addresses its configuration announces")
    error: str | None


class HostPublic(BaseModel):
    """This LB host: whether it announces its VIPs, to whom, and why."""

    bgp_enabled: bool
    drained: bool = Field(description="drained by the operator (persisted until undrain)")
    drained_since: float | None
    announcing: bool = Field(description="the speaker announces at least one route")
    reason: str = Field(description="why the host announces what it does")
    desired_routes: list[str] = Field(description="addresses to announce now")
    speaker: SpeakerPublic | None
    peers: list[PeerPublic]
    last_error: str | None
    vip_packets: int | None = Field(
        description="packets to this host's VIPs so far (a drain is done when it stops moving)"
    )
