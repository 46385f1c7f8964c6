"""Schemas of the XDP chain: operator filters run before the balancer (docs/chain.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ChainSlotPublic(BaseModel):
    """One slot of the chain and the program it runs (prog_id null: empty)."""

    slot: int
    role: Literal["filter", "balancer"]
    prog_id: int | None = Field(description="kernel id of the program in the slot")
    name: str | None = Field(description="the program's kernel name")
    pin: str | None = Field(description="xlb's pin of the program (beside its maps)")


class ChainPublic(BaseModel):
    """The chain: whether the root program runs on the interface, and every slot."""

    enabled: bool = Field(description="the interface runs xdp_root in front of the balancer")
    slots: list[ChainSlotPublic]


class ChainFilterCreate(BaseModel):
    """A pinned XDP program to run in a filter slot (replacing what runs there)."""

    model_config = ConfigDict(extra="forbid")

    slot: int = Field(ge=0, le=255, description="filter slot (0 up to the balancer's slot)")
    pin: str = Field(min_length=1, max_length=4096,
                     description="absolute bpffs path of the pinned XDP program")
