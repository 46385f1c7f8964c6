"""The XDP chain: the operator's filters in front of the balancer (docs/chain.md)."""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, status

from lb.dataplane.chain import ChainSlot
from lb.dataplane.host import Host
from lb.errors import Conflict
from xlb_api.deps import JsonBody, ReadAuth, RuntimeDep, WriteAuth
from xlb_api.problems import problem_responses
from xlb_api.schemas.chain import ChainFilterCreate, ChainPublic, ChainSlotPublic

router = APIRouter(prefix="/v1/chain", tags=["chain"],
                   responses=problem_responses(401, 409, 503))

# One chain change at a time (turning the chain on is several steps).
_lock = threading.Lock()


def _host(rt: RuntimeDep) -> Host:
    if rt.host is None:
        raise Conflict("this daemon runs no data plane of its own: no XDP chain",
                       field="interface")
    return rt.host


def _slot(s: ChainSlot) -> ChainSlotPublic:
    return ChainSlotPublic.model_validate(asdict(s))


def _chain(host: Host) -> ChainPublic:
    return ChainPublic(enabled=host.root is not None,
                       slots=[_slot(s) for s in host.chain_slots()])


@router.get("", dependencies=[ReadAuth])
def get_chain(rt: RuntimeDep) -> ChainPublic:
    """The chain's slots and what runs in each (empty when the chain was never on)."""
    return _chain(_host(rt))


@router.post("", dependencies=[WriteAuth, JsonBody], responses=problem_responses(400, 415, 422))
def add_filter(body: ChainFilterCreate, rt: RuntimeDep) -> ChainPublic:
    """Run a pinned XDP program in a filter slot: added, or atomically replacing the slot's
    program (a hitless upgrade); the chain is turned on first when it is off."""
    host = _host(rt)
    with _lock:
        host.chain_add(body.slot, Path(body.pin))
        return _chain(host)


@router.delete("/{slot}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAuth],
               responses=problem_responses(404, 422))  # fmt: skip
def remove_filter(slot: int, rt: RuntimeDep) -> None:
    """Empty a filter slot; after the last filter (and xdp_chain off) the balancer runs on
    the interface by itself again."""
    host = _host(rt)
    with _lock:
        host.chain_remove(slot)
