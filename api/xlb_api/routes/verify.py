"""Verify: compare the maps with the stored state now, and repair what drifted."""

from __future__ import annotations

from fastapi import APIRouter

from xlb_api.deps import ControlDep, ReadAuth, WriteAuth
from xlb_api.problems import problem_responses
from xlb_api.schemas.verify import VerifyPublic

router = APIRouter(prefix="/v1/verify", tags=["verify"], responses=problem_responses(401, 503))


@router.get("", dependencies=[ReadAuth])
def verify_maps(control: ControlDep) -> VerifyPublic:
    """Read the maps back and compare them with the stored state (changes nothing)."""
    return VerifyPublic.of(control.check_drift(repair=False))


@router.post("", dependencies=[WriteAuth])
def repair_maps(control: ControlDep) -> VerifyPublic:
    """Compare, and rewrite every entry that differs from the stored state."""
    return VerifyPublic.of(control.check_drift(repair=True))
