"""This LB host in the fleet: BGP announcement state, drain and undrain."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from lb.errors import Conflict
from lb.fleet.announce import Announcer, status_dict
from xlb_api.deps import ReadAuth, RuntimeDep, WriteAuth
from xlb_api.problems import problem_responses
from xlb_api.schemas.host import HostPublic

router = APIRouter(prefix="/v1/host", tags=["host"], responses=problem_responses(401, 422, 503))


def _vip_packets(rt: RuntimeDep) -> int | None:
    if rt.stats is None:
        return None
    snap = rt.stats.snapshot()
    return sum(sum(c.get("packets", ())) for c in snap.vips.values())


def _status(rt: RuntimeDep) -> HostPublic:
    st = rt.announcer.status() if rt.announcer is not None else None
    return HostPublic.model_validate(status_dict(st, _vip_packets(rt)))


@router.get("", dependencies=[ReadAuth])
async def get_host(rt: RuntimeDep) -> HostPublic:
    """Drain flag, BGP sessions and announced routes of this host."""
    return await asyncio.to_thread(_status, rt)


def _announcer(rt: RuntimeDep) -> Announcer:
    if rt.announcer is None:
        raise Conflict("BGP is off on this host (bgp.enabled = false): nothing to drain",
                       field="bgp.enabled")
    return rt.announcer


@router.post("/drain", dependencies=[WriteAuth], responses=problem_responses(409))
async def drain_host(rt: RuntimeDep) -> HostPublic:
    """Withdraw this host's VIP routes and keep them withdrawn (persisted) until undrain."""
    await asyncio.to_thread(_announcer(rt).drain)
    return await asyncio.to_thread(_status, rt)


@router.post("/undrain", dependencies=[WriteAuth], responses=problem_responses(409))
async def undrain_host(rt: RuntimeDep) -> HostPublic:
    """Announce this host's VIPs again."""
    await asyncio.to_thread(_announcer(rt).undrain)
    return await asyncio.to_thread(_status, rt)
