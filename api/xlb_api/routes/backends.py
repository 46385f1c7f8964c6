"""Backends of a VIP: list, add, read, update (weight, state), remove, replace the list."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from lb.control.model import BackendSpec
from lb.control.model import BackendUpdate as ModelBackendUpdate
from lb.errors import NotFound
from xlb_api.deps import ControlDep, JsonBody, ReadAuth, WriteAuth
from xlb_api.problems import problem_responses
from xlb_api.schemas.backends import (
    BackendCreate,
    BackendPublic,
    BackendsPublic,
    BackendsReplace,
    BackendUpdate,
)
from xlb_api.schemas.common import AddressPath, VipIdPath

router = APIRouter(
    prefix="/v1/vips/{vip_id}/backends",
    tags=["backends"],
    responses=problem_responses(401, 404, 422, 503),
)


def _public(vip_id: str, backends: list[BackendSpec]) -> BackendsPublic:
    return BackendsPublic(
        vip_id=vip_id, data=[BackendPublic.of(b) for b in backends], count=len(backends)
    )


@router.get("", dependencies=[ReadAuth])
def list_backends(vip_id: VipIdPath, control: ControlDep) -> BackendsPublic:
    """List a VIP's backends."""
    vip = control.get_vip(vip_id)
    return _public(vip.id, list(vip.backends))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[WriteAuth, JsonBody],
    responses=problem_responses(400, 409, 415),
)
def add_backend(
    vip_id: VipIdPath, body: BackendCreate, control: ControlDep, response: Response
) -> BackendPublic:
    """Add a backend to a VIP (it takes new flows at once unless draining or disabled)."""
    b = control.add_backend(vip_id, body.to_spec())
    response.headers["Location"] = f"/v1/vips/{vip_id}/backends/{b.identity}"
    return BackendPublic.of(b)


@router.put(
    "",
    dependencies=[WriteAuth, JsonBody],
    responses=problem_responses(400, 409, 415),
)
def replace_backends(
    vip_id: VipIdPath, body: BackendsReplace, control: ControlDep
) -> BackendsPublic:
    """Replace a VIP's whole backend list in one change."""
    backends = control.replace_backends(vip_id, [b.to_spec() for b in body.backends])
    return _public(control.get_vip(vip_id).id, backends)


@router.get("/{address}", dependencies=[ReadAuth])
def get_backend(vip_id: VipIdPath, address: AddressPath, control: ControlDep) -> BackendPublic:
    """Read one backend of a VIP."""
    vip = control.get_vip(vip_id)
    b = vip.backend(address)
    if b is None:
        raise NotFound(f"VIP {vip.id} has no backend {address}", field="address")
    return BackendPublic.of(b)


@router.patch(
    "/{address}",
    dependencies=[WriteAuth, JsonBody],
    responses=problem_responses(400, 409, 415),
)
def update_backend(
    vip_id: VipIdPath, address: AddressPath, body: BackendUpdate, control: ControlDep
) -> BackendPublic:
    """Change a backend's weight or state (draining: no new flows, tracked flows go on)."""
    changes = ModelBackendUpdate(**body.model_dump(exclude_unset=True, exclude_none=True))
    return BackendPublic.of(control.update_backend(vip_id, address, changes))


@router.delete("/{address}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAuth])
def remove_backend(vip_id: VipIdPath, address: AddressPath, control: ControlDep) -> None:
    """Remove a backend from a VIP (its tracked flows are re-hashed)."""
    control.remove_backend(vip_id, address)
