"""Schemas of a VIP's backends."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lb.control.model import MAX_WEIGHT, BackendSpec, BackendState
from xlb_api.schemas.common import Address


class BackendCreate(BaseModel):
    """A backend to add to a VIP."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"address": "198.18.1.2", "weight": 3}]},
    )

    address: Address
    weight: int = Field(1, ge=0, le=MAX_WEIGHT, description="relative share of new flows")
    state: BackendState = Field(
        "active", description="active: in the ring; draining: tracked flows only; disabled: out"
    )

    def to_spec(self) -> BackendSpec:
        """The model's backend."""
        return BackendSpec(address=self.address, weight=self.weight, state=self.state)


class BackendUpdate(BaseModel):
    """Changes to a backend; fields left out (or null) stay as they are."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"state": "draining"}, {"weight": 5}]},
    )

    weight: int | None = Field(
        None, ge=0, le=MAX_WEIGHT, description="new weight (null: unchanged)"
    )
    state: BackendState | None = Field(None, description="new state (null: unchanged)")


class BackendsReplace(BaseModel):
    """The whole new backend list of a VIP."""

    model_config = ConfigDict(extra="forbid", strict=True)

    backends: list[BackendCreate]


class BackendPublic(BaseModel):
    """A backend as the API shows it."""

    address: str = Field(description="canonical address text (the backend's identity)")
    weight: int
    state: BackendState
    in_ring: bool = Field(description="takes new flows (active with weight > 0)")

    @classmethod
    def of(cls, spec: BackendSpec) -> BackendPublic:
        """Render a model backend."""
        return cls(
            address=spec.identity, weight=spec.weight, state=spec.state, in_ring=spec.in_ring
        )


class BackendsPublic(BaseModel):
    """A VIP's backends."""

    vip_id: str
    data: list[BackendPublic]
    count: int
