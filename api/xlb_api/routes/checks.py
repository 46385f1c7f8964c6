"""Health checking: the health of every checked VIP, its check, and drain progress."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status

from lb.control.model import VipUpdate
from lb.errors import NotFound
from lb.health.policy import HealthCheck
from xlb_api.deps import ControlDep, JsonBody, ReadAuth, RuntimeDep, WriteAuth
from xlb_api.problems import NotReady, problem_responses
from xlb_api.schemas.checks import FlowsPublic, HealthPublic, VipHealthPublic
from xlb_api.schemas.common import AddressPath, VipIdPath
from xlb_api.schemas.vips import VipPublic

router = APIRouter(tags=["health checks"], responses=problem_responses(401, 422, 503))


def _snapshot(rt: RuntimeDep) -> dict[str, Any]:
    hm = rt.health
    if hm is None:
        return {"vips": [], "events": [], "totals": {}, "enabled": False}
    return {**hm.snapshot(), "enabled": True}


def _events(snap: dict[str, Any]) -> list[dict[str, Any]]:
    return [e.__dict__ for e in snap["events"]]


@router.get("/v1/health", dependencies=[ReadAuth])
def get_health(rt: RuntimeDep) -> HealthPublic:
    """Health of every checked VIP's backends, recent transitions and their totals."""
    snap = _snapshot(rt)
    return HealthPublic(
        enabled=snap["enabled"], vips=snap["vips"], events=_events(snap), totals=snap["totals"],
        tunnel=snap.get("tunnel"),
    )


@router.get("/v1/vips/{vip_id}/health", dependencies=[ReadAuth],
            responses=problem_responses(404))
def get_vip_health(vip_id: VipIdPath, rt: RuntimeDep, control: ControlDep) -> VipHealthPublic:
    """Health of one VIP's backends (404 while the VIP has no check or its check has not
    run yet: a check just changed is not answered with the old one's probes)."""
    spec = control.get_vip(vip_id)
    vid = spec.id
    for v in _snapshot(rt)["vips"]:
        if v["vip_id"] == vid and v["check"] == spec.health_check:
            return VipHealthPublic(**v)
    raise NotFound(f"VIP {vid} has no health check running", field="vip_id")


@router.put(
    "/v1/vips/{vip_id}/health_check",
    dependencies=[WriteAuth, JsonBody],
    responses=problem_responses(400, 404, 415),
)
def put_health_check(vip_id: VipIdPath, body: HealthCheck, control: ControlDep) -> VipPublic:
    """Set a VIP's health check (stored with the desired state: the generation is bumped)."""
    return VipPublic.of(control.update_vip(vip_id, VipUpdate(health_check=body)))


@router.delete(
    "/v1/vips/{vip_id}/health_check",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[WriteAuth],
    responses=problem_responses(404),
)
def delete_health_check(vip_id: VipIdPath, control: ControlDep) -> Response:
    """Stop checking a VIP's backends (every backend is then in the ring as desired)."""
    control.update_vip(vip_id, VipUpdate(health_check=None))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/v1/vips/{vip_id}/backends/{address}/flows",
    dependencies=[ReadAuth],
    responses=problem_responses(404),
)
def get_flows(
    vip_id: VipIdPath, address: AddressPath, rt: RuntimeDep, control: ControlDep
) -> FlowsPublic:
    """Live flows the connection table still sends to a backend (drain completion)."""
    from lb.ops.drain import count_flows

    vip = control.get_vip(vip_id)
    b = vip.backend(address)
    if b is None:
        raise NotFound(f"VIP {vip.id} has no backend {address}", field="address")
    balancer = rt.balancer
    if balancer is None:
        raise NotReady("no data plane is loaded: flows cannot be counted")
    table = rt.stats.conn_table() if rt.stats is not None else None
    flows = count_flows(balancer, vip, control.backend_index(b.identity), table=table)
    return FlowsPublic(
        vip_id=vip.id, address=b.identity, state=b.state, flows=flows,
        drained=b.state != "active" and flows == 0,
    )
