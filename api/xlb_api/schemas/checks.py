"""Schemas of health checking: per-pair health, VIP decisions, transitions, drain flows."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from lb.health.policy import HealthCheck


class PairHealthPublic(BaseModel):
    """The health of one backend of a checked VIP."""

    address: str
    status: Literal["up", "down"] = Field(description="what the probes say")
    in_ring: bool = Field(description="health leaves it in the ring (desired state aside)")
    ring: Literal["serving", "draining"] = Field(
        description="serving: in the ring; draining: out of the ring, tracked flows go on "
        "(drained or weight 0 in the desired state, or taken out by health)"
    )
    held_by_floor: bool = Field(description="down, but kept in by the safety floor")
    suppressed: bool = Field(description="flapping: held down until the penalty decays")
    penalty: float = Field(description="flap penalty now (+1 per failure, decays)")
    ramp: float | None = Field(description="slow-start share of the weight (null: full)")
    successes: int = Field(description="good probes in a row")
    failures: int = Field(description="failed probes in a row")
    probes: int
    last_ok: bool | None
    last_error: str | None
    last_probe_age_s: float | None
    latency_s: float | None
    since_s: float = Field(description="time in the current status")
    transitions: dict[str, int] = Field(description="transitions to up and to down")
    probe_address: str = Field(description="where probes go (the VIP in tunnel mode)")
    probe_port: int
    mark: int | None = Field(description="SO_MARK of tunnelled probes")


class VipHealthPublic(BaseModel):
    """Health of one checked VIP."""

    vip_id: str
    check: HealthCheck
    all_down: bool = Field(description="every backend fails: the last healthy set stays")
    out: list[str] = Field(description="backends health took out of the ring")
    held: list[str] = Field(description="down backends the safety floor keeps in")
    floor_events: dict[str, int]
    backends: list[PairHealthPublic]


class HealthEventPublic(BaseModel):
    """One transition."""

    time: float = Field(description="Unix time")
    vip_id: str
    backend: str | None
    kind: str = Field(description="down, up, floor_held, all_down, all_down_cleared")
    detail: str


class TunnelPublic(BaseModel):
    """The program that encapsulates tunnel-mode probes (loaded on first use)."""

    state: Literal["unused", "loading", "ready", "failed", "unavailable"] = Field(
        description="unused: no tunnel-mode check yet; failed: the last load failed and is "
        "retried; unavailable: no interface to encapsulate on"
    )
    error: str | None = Field(description="why the last load failed")
    failed_attempts: int = Field(description="failed loads since the last success")
    retry_in_s: float | None = Field(description="failed: time to the next attempt")


class HealthPublic(BaseModel):
    """Every checked VIP, the recent transitions and their totals."""

    enabled: bool = Field(description="the daemon runs the health checker")
    vips: list[VipHealthPublic]
    events: list[HealthEventPublic]
    totals: dict[str, int]
    tunnel: TunnelPublic | None = Field(None, description="tunnel-mode probes (null: off)")


class FlowsPublic(BaseModel):
    """Live flows the connection table sends to one backend of a VIP (drain progress)."""

    vip_id: str
    address: str
    state: str = Field(description="the backend's desired state")
    flows: int = Field(description="open or recently closing TCP, UDP within its timeout")
    drained: bool = Field(description="draining and no live flow left")
