"""Liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from xlb_api.deps import ReadAuth, RuntimeDep
from xlb_api.metrics import make_registry
from xlb_api.problems import problem_responses

router = APIRouter(tags=["health"])


class HealthPublic(BaseModel):
    """The process is alive."""

    status: str = "ok"
    uptime_s: float | None = None


class ReadyPublic(BaseModel):
    """Whether the daemon is ready, and if not, why."""

    ready: bool
    reasons: list[str] = Field(description="why not ready (empty when ready)")
    attachment: str
    xdp_mode: str | None = Field(None, description="native, generic or offload; None: not attached")
    xdp_mode_reason: str | None = Field(
        None, description="why that mode, e.g. why auto fell back to generic"
    )
    generation: int | None
    store: str | None = Field(None, description="the state store: sqlite, or etcd")
    degraded: list[str] = Field(
        default_factory=list,
        description="what works less than it should while forwarding goes on (e.g. the "
        "shared store is unreachable: changes are refused)",
    )


@router.get("/healthz")
async def healthz(request: Request) -> HealthPublic:
    """The process is alive (always 200 while it answers)."""
    rt = getattr(request.app.state, "runtime", None)
    return HealthPublic(uptime_s=round(time.time() - rt.started, 3) if rt else None)


@router.get(
    "/readyz",
    responses={503: {"model": ReadyPublic, "description": "not ready, with the reasons"}},
)
async def readyz(request: Request, response: Response) -> ReadyPublic:
    """Ready when the data plane is attached and the stored state is applied to the maps."""
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        response.status_code = 503
        return ReadyPublic(
            ready=False,
            reasons=["the control plane is starting"],
            attachment="unknown",
            generation=None,
        )
    reasons: list[str] = []
    attached, where = await asyncio.to_thread(rt.attachment)
    if not attached:
        reasons.append(f"not attached: {where}")
    if not rt.control.in_sync:
        reasons.append(
            f"the maps are not in step with stored generation {rt.control.generation}: "
            f"{rt.control.last_reconcile_error} (the next change or a restart retries)"
        )
    report = rt.control.drift_report
    if report is not None and report.outstanding:
        first = report.outstanding[0]
        reasons.append(
            f"drift: {len(report.outstanding)} map entries differ from stored generation "
            f"{report.generation} (verified {time.time() - report.checked_at:.0f} s ago; "
            f"first: {first.map} {first.key}: {first.actual}, expected {first.expected}); "
            "`lbctl verify --repair` or POST /v1/verify rewrites them"
        )
    degraded: list[str] = []
    st = rt.control.store_status
    if not st.writable:
        degraded.append(
            f"{st.reason}: forwarding goes on with "
            f"generation {rt.control.generation} (revision {st.revision}); changes are refused"
        )
    if reasons:
        response.status_code = 503
    return ReadyPublic(
        ready=not reasons,
        reasons=reasons,
        attachment=where,
        xdp_mode=rt.attach_mode(),
        xdp_mode_reason=rt.attach_reason(),
        generation=rt.control.generation,
        store=st.kind,
        degraded=degraded,
    )


@router.get(
    "/metrics",
    dependencies=[ReadAuth],
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition",
        },
        **problem_responses(401, 503),
    },
)
def metrics(rt: RuntimeDep, request: Request) -> Response:
    """Every counter in Prometheus text format."""
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = request.app.state.metrics_registry = make_registry(
            rt, getattr(request.app.state, "request_seconds", None)
        )
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
