"""Declarative state: read it all, or replace it all (with a dry run and If-Match)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from lb.control.model import validate_state
from lb.errors import PreconditionFailed
from xlb_api.deps import ControlDep, JsonBody, ReadAuth, WriteAuth
from xlb_api.problems import problem_responses
from xlb_api.schemas.state import PlanPublic, StatePublic, StatePut

router = APIRouter(prefix="/v1/state", tags=["state"], responses=problem_responses(401, 503))


def etag(generation: int) -> str:
    """The ETag of a state generation."""
    return f'"{generation}"'


def parse_if_match(value: str | None) -> int | None:
    """The generation an If-Match header requires (None: no header or `*`)."""
    if value is None or value.strip() in ("", "*"):
        return None
    tags = [t.strip().removeprefix("W/").strip('"') for t in value.split(",")]
    for t in tags:
        if t.isascii() and t.isdigit():  # int() also takes "²" (issue 14, item 18)
            return int(t)
    raise PreconditionFailed(
        f"If-Match {value!r} names no state generation (send the ETag of GET /v1/state)",
        field="If-Match",
    )


@router.get("", dependencies=[ReadAuth])
def get_state(control: ControlDep, response: Response) -> StatePublic:
    """The whole desired state; the ETag is its generation."""
    state = control.get_state()
    response.headers["ETag"] = etag(state.generation)
    return StatePublic.of(state)


@router.put(
    "",
    dependencies=[WriteAuth, JsonBody],
    responses=problem_responses(400, 409, 412, 415, 422),
)
def put_state(
    body: StatePut,
    control: ControlDep,
    response: Response,
    dry_run: Annotated[bool, Query(description="only return the plan")] = False,
    if_match: Annotated[
        str | None, Header(description="ETag of the generation this change is based on")
    ] = None,
) -> PlanPublic:
    """Replace the whole desired state; returns the plan (what moves, per VIP)."""
    state = body.to_state()
    # Preconditions count only for a request that is otherwise fine (RFC 9110 13.2.1).
    validate_state(state.vips, control.limits)
    wanted = parse_if_match(if_match)
    if dry_run:
        current = control.generation
        if wanted is not None and wanted != current:
            raise PreconditionFailed(
                f"If-Match generation {wanted} is not the current generation {current}",
                field="If-Match",
            )
        plan = control.plan(state)
        response.headers["ETag"] = etag(current)
        return PlanPublic.of(plan, dry_run=True)
    plan = control.apply_state(state, if_generation=wanted)
    gen = plan.to_generation if plan.to_generation is not None else control.generation
    response.headers["ETag"] = etag(gen)
    return PlanPublic.of(plan, dry_run=False)
