"""Health checks: their configuration and the pure state machine behind them.

Nothing here does I/O: lb/health/manager.py runs the probes and feeds results in; this module
decides what they mean.

- `HealthCheck` is the configuration a VIP carries (`VipSpec.health_check`), stored with the
  desired state. Every backend of the VIP is probed on its own (a VIP-backend pair), either
  directly at the backend's address or through the tunnel, with the VIP as the inner
  destination (``mode="tunnel"``: "healthy" then means "the VIP answers through the tunnel").
- `Target` is one VIP-backend pair: consecutive successes and failures against `rise` and
  `fall`; flap damping (each up->down transition adds 1 to a penalty that halves every
  `flap_half_life_s`; at `flap_threshold` the backend is held down until the penalty has
  decayed to half the threshold, BGP route-flap-damping style); and slow start (a returning
  backend's weight ramps up over `slow_start_s`).
- `decide` turns the targets of one VIP into a `VipDecision`: which backends leave the ring,
  bounded by the safety floor (at most `max_down_fraction` of the VIP's in-ring weight out
  at once, earliest failures first), and, when every backend fails, the last healthy set
  kept (the VIP is flagged `all_down`) so a broken checker cannot black-hole a VIP.

A health decision never changes the stored desired state and never bumps its generation:
the control plane applies it as an overlay (a backend taken out is programmed as draining:
out of the ring, its tracked flows go on).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CheckType = Literal["tcp", "http", "https", "udp"]
CheckMode = Literal["direct", "tunnel"]
Status = Literal["up", "down"]

#: Slow-start weights move in steps of this fraction (each step rebuilds the VIP's ring).
RAMP_STEPS = 10
#: Highest weight a ramp may scale to (lb.control.model.MAX_WEIGHT; test_health checks it).
MAX_WEIGHT = 1000
#: Ring weights scale by this while a backend ramps, so weight-1 pools can ramp too (Maglev
#: rings depend only on weight ratios: scaling every weight leaves the ring unchanged).
RAMP_SCALE = RAMP_STEPS


class HealthCheck(BaseModel):
    """How the backends of one VIP are probed and how results are judged."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {"type": "http", "port": 80, "path": "/", "interval_s": 1, "fall": 2},
                {"type": "udp", "port": 53, "mode": "tunnel"},
            ]
        },
    )

    type: CheckType = Field("tcp", description="tcp connect, http/https GET, or udp request")
    mode: CheckMode = Field(
        "direct",
        description="direct: to the backend's address; tunnel: to the VIP, encapsulated "
        "towards the backend like client traffic",
    )
    port: int | None = Field(
        None, ge=1, le=65535, description="port to probe (default: the VIP's port)"
    )
    interval_s: float = Field(2.0, ge=0.05, le=3600, description="time between probes")
    timeout_s: float = Field(1.0, gt=0, le=600, description="a probe slower than this fails")
    rise: int = Field(2, ge=1, le=100, description="successes in a row to come back up")
    fall: int = Field(3, ge=1, le=100, description="failures in a row to go down")
    jitter: float = Field(
        0.1, ge=0, le=0.5, description="each interval varies by up to this fraction"
    )
    path: str = Field("/", min_length=1, max_length=1024, description="http(s): request path")
    host: str | None = Field(
        None, max_length=255, description="http(s): Host header (default: the probed address)"
    )
    expect_status: list[int] = Field(
        default_factory=lambda: [200],
        min_length=1,
        max_length=32,
        description="http(s): status codes that count as healthy",
    )
    udp_payload_hex: str | None = Field(
        None,
        max_length=2048,
        description="udp: request bytes in hex (default: a DNS query for '.' NS, whose "
        "answer must carry the same query id)",
    )
    udp_expect_hex: str | None = Field(
        None, max_length=2048, description="udp: the answer must start with these bytes (hex)"
    )
    max_down_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="safety floor: most of the VIP's in-ring weight health may take out",
    )
    slow_start_s: float = Field(
        0, ge=0, le=3600, description="a returning backend's weight ramps up over this time"
    )
    flap_threshold: float = Field(
        3,
        ge=0,
        le=100,
        description="damping: held down at this penalty (+1 per failure, 0 = no damping)",
    )
    flap_half_life_s: float = Field(
        60, gt=0, le=86400, description="damping: the penalty halves in this time"
    )

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        for s in v:
            if not 100 <= s <= 599:
                raise ValueError(f"HTTP status codes are 100..599, got {s}")
        return v

    @field_validator("udp_payload_hex", "udp_expect_hex")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raise ValueError("must be hexadecimal bytes, e.g. '0a0b'") from None
        if not raw:
            raise ValueError("must hold at least one byte")
        return v

    @model_validator(mode="after")
    def _timeout_fits(self) -> HealthCheck:
        # A probe still running when the next is due would overlap it and blur rise/fall.
        if self.timeout_s > self.interval_s:
            raise ValueError(
                f"timeout_s ({self.timeout_s}) must not exceed interval_s ({self.interval_s})"
            )
        return self


@dataclass
class Target:
    """Health of one VIP-backend pair, fed one probe result at a time."""

    check: HealthCheck
    #: Probes start from "up": a daemon restart must not take a healthy pool out.
    status: Status = "up"
    successes: int = 0
    failures: int = 0
    #: When the status last changed (monotonic seconds).
    changed_at: float = 0.0
    #: When the backend came back, while it ramps up (slow start); None otherwise.
    up_since: float | None = None
    penalty: float = 0.0
    penalty_at: float = 0.0
    suppressed: bool = False
    last_ok: bool | None = None
    last_error: str | None = None
    last_probe_at: float | None = None
    last_latency_s: float | None = None
    probes: int = 0
    transitions: Counter[str] = field(default_factory=Counter)

    def penalty_now(self, now: float) -> float:
        """The flap penalty decayed to `now`."""
        dt = max(0.0, now - self.penalty_at)
        return self.penalty * math.pow(0.5, dt / self.check.flap_half_life_s)

    def record(
        self, ok: bool, now: float, *, error: str | None = None, latency_s: float | None = None
    ) -> Status | None:
        """Count one probe result; returns the new status when it changed, else None."""
        self.probes += 1
        self.last_ok = ok
        self.last_error = None if ok else (error or "failed")
        self.last_probe_at = now
        self.last_latency_s = latency_s
        if ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        return self.tick(now)

    def tick(self, now: float) -> Status | None:
        """Re-evaluate at `now` (damping decays with time); the new status if it changed."""
        c = self.check
        if self.status == "up":
            if self.failures >= c.fall:
                self.penalty = self.penalty_now(now) + 1
                self.penalty_at = now
                if c.flap_threshold and self.penalty >= c.flap_threshold:
                    self.suppressed = True
                return self._set("down", now)
            return None
        if self.suppressed and self.penalty_now(now) <= c.flap_threshold / 2:
            self.suppressed = False
        if self.successes >= c.rise and not self.suppressed:
            self.up_since = now if c.slow_start_s > 0 else None
            return self._set("up", now)
        return None

    def _set(self, status: Status, now: float) -> Status:
        self.status = status
        self.changed_at = now
        self.transitions[status] += 1
        if status == "down":
            self.up_since = None
        return status

    def ramp(self, now: float) -> float | None:
        """Slow-start share of the weight in (0, 1), in RAMP_STEPS steps; None when done."""
        if self.up_since is None or self.status != "up":
            return None
        span = self.check.slow_start_s
        if span <= 0 or now - self.up_since >= span:
            self.up_since = None
            return None
        step = math.floor((now - self.up_since) / span * RAMP_STEPS) + 1
        return step / RAMP_STEPS if step < RAMP_STEPS else None

    @property
    def wants_out(self) -> bool:
        """True when the probes say the backend should take no new flows."""
        return self.status == "down"


@dataclass(frozen=True)
class VipDecision:
    """What health does to one VIP's ring."""

    #: Backends health takes out of the ring (programmed as draining).
    out: frozenset[str] = frozenset()
    #: Backends that are down but stay in the ring because of the safety floor.
    held: frozenset[str] = frozenset()
    #: Ring weights while a backend ramps up (every in-ring backend, scaled); empty otherwise.
    weights: tuple[tuple[str, int], ...] = ()
    #: Every in-ring backend is down: the last healthy set was kept.
    all_down: bool = False

    @property
    def changes_ring(self) -> bool:
        """True when the effective ring differs from the desired one."""
        return bool(self.out or self.weights)


@dataclass(frozen=True)
class Member:
    """One backend of a VIP as `decide` sees it."""

    identity: str
    weight: int
    #: In the ring by the desired state (active, weight > 0).
    in_ring: bool
    #: Down since (monotonic seconds), None when healthy.
    down_since: float | None = None
    #: Slow-start share of the weight, None when not ramping.
    ramp: float | None = None


def decide(
    members: Iterable[Member], max_down_fraction: float, prev: VipDecision | None = None
) -> VipDecision:
    """The ring change health makes for one VIP, within the safety floor."""
    eligible = [m for m in members if m.in_ring]
    down = [m for m in eligible if m.down_since is not None]
    prev_out = prev.out if prev is not None else frozenset()
    if eligible and len(down) == len(eligible):
        # Every backend fails: most likely the checker or its path is broken, not the pool.
        out = frozenset(m.identity for m in down if m.identity in prev_out)
        return VipDecision(
            out=out,
            held=frozenset(m.identity for m in down) - out,
            weights=_ramp_weights(eligible, out),
            all_down=True,
        )
    budget = max_down_fraction * sum(m.weight for m in eligible)
    # Already out first (no churn), then by how long they have been down, then by name.
    order = sorted(
        down, key=lambda m: (m.identity not in prev_out, m.down_since or 0.0, m.identity)
    )
    out_w = 0
    chosen: set[str] = set()
    for m in order:
        if out_w + m.weight <= budget + 1e-9:
            chosen.add(m.identity)
            out_w += m.weight
    out = frozenset(chosen)
    return VipDecision(
        out=out,
        held=frozenset(m.identity for m in down) - out,
        weights=_ramp_weights(eligible, out),
    )


def _ramp_weights(eligible: list[Member], out: frozenset[str]) -> tuple[tuple[str, int], ...]:
    staying = [m for m in eligible if m.identity not in out]
    if not any(m.ramp is not None for m in staying):
        return ()
    top = max(m.weight for m in staying)
    scale = max(1, min(RAMP_SCALE, MAX_WEIGHT // max(top, 1)))
    return tuple(
        sorted(
            (
                m.identity,
                m.weight * scale
                if m.ramp is None
                else max(1, round(m.weight * scale * m.ramp)),
            )
            for m in staying
        )
    )


def summary(targets: Mapping[str, Target]) -> dict[str, int]:
    """Counts of targets by status."""
    out = {"up": 0, "down": 0}
    for t in targets.values():
        out[t.status] += 1
    return out
