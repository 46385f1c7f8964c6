"""Schemas of the declarative state and of the plan that applying it makes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lb.control.model import BackendSpec, Plan, State, VipSpec
from xlb_api.schemas.backends import BackendCreate
from xlb_api.schemas.vips import VipCreate


class StateVip(VipCreate):
    """One VIP of the declarative state (the same fields as creating it)."""

    @classmethod
    def of(cls, spec: VipSpec) -> StateVip:
        """Render a model VIP in its declarative form."""
        return cls(
            protocol=spec.protocol,
            address=spec.address,
            port=spec.port,
            hash_src_only=spec.hash_src_only,
            lru_bypass=spec.lru_bypass,
            encap=spec.encap,
            outer_source=spec.outer_source,
            backends=[_backend(b) for b in spec.backends],
            health_check=spec.health_check,
            second_chance=spec.second_chance,
            second_chance_window_s=spec.second_chance_window_s,
            allow=list(spec.allow),
            deny=list(spec.deny),
        )


def _backend(b: BackendSpec) -> BackendCreate:
    return BackendCreate(address=b.address, weight=b.weight, state=b.state)


class StatePut(BaseModel):
    """The whole desired state. `generation` is informational: send If-Match to guard."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "vips": [
                        {
                            "protocol": "tcp",
                            "address": "198.18.0.10",
                            "port": 80,
                            "backends": [{"address": "198.18.1.2"}, {"address": "198.18.1.3"}],
                        }
                    ]
                }
            ]
        },
    )

    vips: list[StateVip] = Field(default_factory=list)
    generation: int | None = Field(None, ge=0, description="ignored; use If-Match")

    def to_state(self) -> State:
        """The model's state (generation 0: the store assigns the next one)."""
        return State(vips=[v.to_spec() for v in self.vips])


class StatePublic(BaseModel):
    """The whole desired state and its generation (also the ETag)."""

    generation: int
    vips: list[StateVip]

    @classmethod
    def of(cls, state: State) -> StatePublic:
        """Render the model's state."""
        return cls(generation=state.generation, vips=[StateVip.of(v) for v in state.vips])


class PlanPublic(Plan):
    """What a whole-state change does (dry run) or did: per VIP, the ring slots that move."""

    dry_run: bool = Field(description="true: nothing was changed")

    @classmethod
    def of(cls, plan: Plan, *, dry_run: bool) -> PlanPublic:
        """Render the model's plan."""
        return cls(**plan.model_dump(), dry_run=dry_run)
