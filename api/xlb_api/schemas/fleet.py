"""Schemas of the fleet: every LB host's applied state, lag and ring fingerprints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class LagPublic(BaseModel):
    """How far a host is behind the latest shared state."""

    generations: int = Field(description="generations behind the newest host")
    revisions: int = Field(description="etcd revisions behind the latest state change")


class FleetBgpPublic(BaseModel):
    """A host's BGP announcement as it last published it (lb.fleet.announce.Announcer.summary)."""

    state: Literal["announcing", "drained", "withdrawn", "error"]
    reason: str = Field(description="why it announces what it does, or what failed")
    routes: int = Field(description="VIP addresses the speaker announces")
    peers_up: int = Field(description="BGP sessions established")
    peers: int = Field(description="BGP sessions configured")


class FleetHostPublic(BaseModel):
    """One LB host as it last published itself (its entry expires with its lease)."""

    host: str
    revision: int = Field(description="etcd revision of the state this host applied")
    state_revision: int = Field(description="etcd revision of that state's last change")
    generation: int
    in_sync: bool = Field(description="its maps carry its applied state")
    write_turns: int = Field(
        0, description="times since its start this host took the write turn after losing 4 etcd"
        " races in a row (docs/fleet-state.md): a sign of write contention; 0 from a build"
        " before turns"
    )
    fingerprints: dict[str, str] = Field(
        description="VIP id -> SHA-256 of the ring slots its maps carry (health applied)"
    )
    lag: LagPublic
    bgp: FleetBgpPublic | None = Field(None, description="null when BGP is off on that host")


class DivergencePublic(BaseModel):
    """A VIP whose ring differs between hosts at the same generation."""

    vip_id: str
    hosts_by_fingerprint: dict[str, list[str]]


class FleetPublic(BaseModel):
    """Every live host of the fleet, and what differs between them."""

    store: str = Field(description="where the shared state lives")
    this_host: str
    state_revision: int = Field(description="etcd revision of the latest state change")
    generation: int = Field(description="the newest generation any host applied")
    hosts: list[FleetHostPublic]
    lagging: list[str] = Field(description="hosts behind the newest generation")
    divergent: list[DivergencePublic] = Field(description="VIPs whose rings differ")
    health_hosts: list[str] = Field(description="hosts whose health opinions are live")
