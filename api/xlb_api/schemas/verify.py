"""Schemas of verify: the maps compared with the stored state, and what a repair rewrote."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from lb.control.facade import DriftReport


class DriftPublic(BaseModel):
    """One map entry that differs from what the stored state says."""

    map: Literal["vip_map", "vip_addrs", "vip_filter", "reals", "ch_rings"]
    key: str = Field(description="the entry: VIP id, address, backend index, ring of a VIP")
    expected: str | None = Field(description="what the state says (null: no entry)")
    actual: str | None = Field(description="what the map holds (null: no entry)")


class VerifyPublic(BaseModel):
    """The outcome of one comparison of the maps with the stored state."""

    in_sync: bool = Field(description="the maps match the stored state now")
    generation: int = Field(description="the stored generation compared with")
    checked_at: float = Field(description="Unix time of the comparison")
    drifts: list[DriftPublic] = Field(description="the entries that differed")
    repaired: bool = Field(description="the entries that differed were rewritten")

    @classmethod
    def of(cls, report: DriftReport) -> VerifyPublic:
        """Render a control-plane drift report."""
        return cls(
            in_sync=not report.outstanding,
            generation=report.generation,
            checked_at=report.checked_at,
            drifts=[DriftPublic(**d.model_dump()) for d in report.drifts],
            repaired=report.repaired,
        )
