"""VIPs: list, create, read, update (flags, encapsulation, hash mode), delete."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from lb.control.model import VipUpdate as ModelVipUpdate
from xlb_api.deps import ControlDep, JsonBody, ReadAuth, WriteAuth
from xlb_api.problems import problem_responses
from xlb_api.schemas.common import VipIdPath
from xlb_api.schemas.vips import VipCreate, VipPublic, VipsPublic, VipUpdate

router = APIRouter(prefix="/v1/vips", tags=["vips"], responses=problem_responses(401, 422, 503))


@router.get("", dependencies=[ReadAuth])
def list_vips(control: ControlDep) -> VipsPublic:
    """List every VIP with its backends."""
    vips = control.list_vips()
    return VipsPublic(data=[VipPublic.of(v) for v in vips], count=len(vips))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[WriteAuth, JsonBody],
    responses=problem_responses(400, 409, 415),
)
def create_vip(body: VipCreate, control: ControlDep, response: Response) -> VipPublic:
    """Create a VIP, optionally with its backends."""
    vip = control.create_vip(body.to_spec())
    response.headers["Location"] = f"/v1/vips/{vip.id}"
    return VipPublic.of(vip)


@router.get("/{vip_id}", dependencies=[ReadAuth], responses=problem_responses(404))
def get_vip(vip_id: VipIdPath, control: ControlDep) -> VipPublic:
    """Read one VIP, e.g. tcp:198.18.0.10:80 or udp:[2001:db8::10]:53."""
    vip = VipPublic.of(control.get_vip(vip_id))
    vip.ring_fingerprint = control.ring_fingerprint(vip_id)
    return vip


@router.patch(
    "/{vip_id}",
    dependencies=[WriteAuth, JsonBody],
    responses=problem_responses(400, 404, 415),
)
def update_vip(vip_id: VipIdPath, body: VipUpdate, control: ControlDep) -> VipPublic:
    """Change a VIP's flags, encapsulation or outer source; fields left out stay."""
    changes = ModelVipUpdate(**body.model_dump(exclude_unset=True))
    return VipPublic.of(control.update_vip(vip_id, changes))


@router.delete(
    "/{vip_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[WriteAuth],
    responses=problem_responses(404),
)
def delete_vip(vip_id: VipIdPath, control: ControlDep) -> None:
    """Delete a VIP and its backends (its tracked flows stop at once)."""
    control.delete_vip(vip_id)
