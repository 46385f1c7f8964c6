"""RFC 9457 problem details: the one place that turns errors into HTTP answers.

Every error the API returns is `application/problem+json` with `type`, `title`, `status`,
`detail` and, where one input is at fault, `field` (its dotted path in the request) and
`rule`. Routes raise `lb.errors.XlbError` (or let FastAPI raise a validation error); the
handlers installed by `install_problem_handlers` render them. Problem types are URNs:
`urn:xlb:problem:<kind>` with `kind` taken from the error class.

API-only errors (authentication, media type, malformed JSON) extend the same hierarchy:

    XlbError
     ├── BadRequest (400)            malformed JSON, unreadable body
     ├── Unauthorized (401)          missing or wrong bearer token
     ├── UnsupportedMediaType (415)  a body that is not application/json
     └── NotReady (503)              the data plane is not attached or not in step
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from lb.errors import XlbError

log = logging.getLogger("xlb.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:xlb:problem:"


class BadRequest(XlbError):
    """The request body cannot be read (malformed JSON)."""

    status = 400
    kind = "malformed-request"


class Unauthorized(XlbError):
    """No bearer token, or not the right one."""

    status = 401
    kind = "unauthorized"


class UnsupportedMediaType(XlbError):
    """A request body that is not JSON."""

    status = 415
    kind = "unsupported-media-type"


class NotReady(XlbError):
    """The daemon is up but cannot serve this yet (data plane not attached)."""

    status = 503
    kind = "not-ready"


class FieldError(BaseModel):
    """One broken rule of one input field."""

    field: str = Field(description="dotted path of the input, e.g. backends.0.weight")
    rule: str = Field(description="the rule the value breaks, in words")
    type: str = Field(description="machine name of the rule (pydantic error type)")


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error answer."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="URN naming the kind of problem: urn:xlb:problem:<kind>")
    title: str = Field(description="short summary of the kind of problem")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what went wrong with this request")
    instance: str | None = Field(None, description="the request path")
    field: str | None = Field(None, description="the input at fault, when there is one")
    rule: str | None = Field(None, description="the rule it breaks, when known")
    errors: list[FieldError] | None = Field(None, description="every broken rule (validation)")


def problem_type(kind: str) -> str:
    """The `type` URI of a kind of problem."""
    return TYPE_PREFIX + kind


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_response(
    status: int,
    kind: str,
    detail: str,
    *,
    instance: str | None = None,
    field: str | None = None,
    rule: str | None = None,
    errors: Sequence[FieldError] = (),
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Render one problem as an application/problem+json response."""
    body: dict[str, Any] = {
        "type": problem_type(kind),
        "title": _title(status),
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    if field is not None:
        body["field"] = field
    if rule is not None:
        body["rule"] = rule
    if errors:
        body["errors"] = [e.model_dump() for e in errors]
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _loc_to_field(loc: Sequence[int | str]) -> str:
    # Drop the "body"/"query"/"path" source, keep the path inside it.
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def _field_errors(raw: Sequence[Any]) -> list[FieldError]:
    out: list[FieldError] = []
    for err in raw:
        msg = str(err.get("msg", "invalid value"))
        out.append(
            FieldError(
                field=_loc_to_field(err.get("loc", ())),
                rule=msg,
                type=str(err.get("type", "value_error")),
            )
        )
    return out


def _xlb_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, XlbError)
    headers = {"WWW-Authenticate": 'Bearer realm="xlb"'} if exc.status == 401 else None
    if exc.status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc.detail)
    return problem_response(
        exc.status,
        exc.kind,
        exc.detail,
        instance=request.url.path,
        field=exc.field,
        rule=getattr(exc, "rule", None),
        headers=headers,
    )


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    raw = exc.errors()
    if any(e.get("type") == "json_invalid" for e in raw):
        err = next(e for e in raw if e.get("type") == "json_invalid")
        ctx = err.get("ctx") or {}
        where = f" at character {err['loc'][-1]}" if len(err.get("loc", ())) > 1 else ""
        return problem_response(
            400,
            BadRequest.kind,
            f"the body is not valid JSON{where}: {ctx.get('error', 'decode error')}",
            instance=request.url.path,
        )
    errors = _field_errors(raw)
    first = errors[0] if errors else FieldError(field="", rule="invalid input", type="value")
    detail = "; ".join(f"{e.field or 'body'}: {e.rule}" for e in errors) or "invalid input"
    return problem_response(
        422,
        "invalid-input",
        detail,
        instance=request.url.path,
        field=first.field or None,
        rule=first.rule,
        errors=errors,
    )


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kinds = {404: "not-found", 405: "method-not-allowed", 401: "unauthorized"}
    detail = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no such resource: {request.url.path}"
    if exc.status_code == 405:
        # Every route of this path, not only the first one the router tried (RFC 9110 15.5.6).
        allowed = _allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        detail = f"{request.method} is not allowed on {request.url.path}; use {headers['Allow']}"
    return problem_response(
        exc.status_code,
        kinds.get(exc.status_code, "http-" + str(exc.status_code)),
        detail,
        instance=request.url.path,
        headers=headers or None,
    )


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500, "internal", "internal error; see the daemon's log", instance=request.url.path
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Render every error of `app` as application/problem+json."""
    app.add_exception_handler(XlbError, _xlb_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def problem_only_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Document error answers as application/problem+json only (not also application/json)."""
    for item in schema.get("paths", {}).values():
        for op in item.values():
            for resp in op.get("responses", {}).values() if isinstance(op, dict) else ():
                content = resp.get("content", {})
                if PROBLEM_JSON in content:
                    content.pop("application/json", None)
    return schema


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting problem answers for these statuses."""
    return {
        s: {
            "model": Problem,
            "description": _title(s),
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for s in statuses
    }
