"""The fleet: every LB host sharing this host's etcd state, with lags and divergence."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from lb.errors import NotFound
from xlb_api.deps import ReadAuth, RuntimeDep
from xlb_api.problems import problem_responses
from xlb_api.schemas.fleet import FleetPublic

router = APIRouter(prefix="/v1/fleet", tags=["fleet"], responses=problem_responses(401, 503))


@router.get("", dependencies=[ReadAuth], responses=problem_responses(404))
async def get_fleet(rt: RuntimeDep) -> FleetPublic:
    """Each host's applied revision, lag and per-VIP ring fingerprints; divergence named."""
    node = rt.fleet
    if node is None:
        raise NotFound(
            "this host keeps its own state (store = sqlite): it is in no fleet; "
            "set store = \"etcd\" to share one state between hosts",
            field="store",
        )
    # Two etcd reads: in a worker thread, never in the event loop.
    return FleetPublic.model_validate(await asyncio.to_thread(node.status))
