"""Dependencies of the routes: the running daemon's objects, settings, authentication.

They are `async def` on purpose: none of them blocks, and FastAPI runs a plain `def`
dependency in the thread pool, one hop per dependency per request. The routes that call the
control plane stay `def` (its calls block: SQLite commit, map writes).
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lb.control.facade import ControlPlane
from lb.dataplane.host import Host
from lb.dataplane.loader import Balancer
from lb.errors import InvalidInput
from lb.fleet.announce import Announcer
from lb.health.manager import HealthManager
from lb.ops.explain import Explainer
from lb.ops.monitor import EventHub
from lb.ops.stats import RateSampler, StatsReader
from xlb_api.problems import NotReady, Unauthorized, UnsupportedMediaType
from xlb_api.settings import ApiSettings, get_settings

if TYPE_CHECKING:
    from lb.fleet.node import FleetNode


@dataclass
class Runtime:
    """What the daemon runs: the control plane and, with a data plane, its readers."""

    control: ControlPlane
    token: str | None
    stats: StatsReader | None = None
    sampler: RateSampler | None = None
    explainer: Explainer | None = None
    #: Returns (attached?, description) of the XDP attachment, e.g. (True, "native on eth1").
    attachment: Callable[[], tuple[bool, str]] = lambda: (False, "no interface configured")
    #: Name of the XDP mode in force ("native", "generic") or None, for /metrics.
    attach_mode: Callable[[], str | None] = lambda: None
    #: Why that mode (e.g. why auto fell back to generic), or None when not attached.
    attach_reason: Callable[[], str | None] = lambda: None
    started: float = field(default_factory=time.time)
    #: The loaded balancer (None: the control plane runs on maps it was handed, or none).
    balancer: Balancer | None = None
    #: The host's data plane as `lbctl serve` opened it (pins, attachment), for shutdown.
    host: Host | None = None
    #: The health checker, when the daemon runs one.
    health: HealthManager | None = None
    #: This host's part in a fleet (store = etcd), else None.
    fleet: FleetNode | None = None
    #: The BGP announcer (lb.fleet.announce), when bgp.enabled.
    announcer: Announcer | None = None
    #: The event ring's reader and its subscribers (GET /v1/events, /v1/capture).
    events: EventHub | None = None


async def get_runtime(request: Request) -> Runtime:
    """The daemon's runtime; NotReady while the lifespan has not set it up."""
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise NotReady("the control plane is not running yet")
    assert isinstance(rt, Runtime)
    return rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_api_settings(request: Request) -> ApiSettings:
    """The app's settings (`create_app(settings=...)`, else the cached `get_settings()`)."""
    settings = getattr(request.app.state, "settings", None)
    return settings if isinstance(settings, ApiSettings) else get_settings()


SettingsDep = Annotated[ApiSettings, Depends(get_api_settings)]


async def get_control(rt: RuntimeDep) -> ControlPlane:
    """The control plane facade."""
    return rt.control


ControlDep = Annotated[ControlPlane, Depends(get_control)]


async def get_stats(rt: RuntimeDep) -> StatsReader:
    """The counter reader; NotReady without a data plane."""
    if rt.stats is None:
        raise NotReady("no data plane is loaded: statistics are unavailable")
    return rt.stats


StatsDep = Annotated[StatsReader, Depends(get_stats)]


async def get_explainer(rt: RuntimeDep) -> Explainer:
    """The flow explainer; NotReady without a data plane."""
    if rt.explainer is None:
        raise NotReady("no data plane is loaded: flows cannot be explained")
    return rt.explainer


ExplainerDep = Annotated[Explainer, Depends(get_explainer)]

_bearer = HTTPBearer(
    auto_error=False,
    description="the daemon's token (XLB_API_TOKEN or the token file); required for changes",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _is_local(request: Request) -> bool:
    client = request.client
    if client is None or not client.host:
        return True  # a unix socket: access is governed by the socket's file mode
    try:
        return ipaddress.ip_address(client.host).is_loopback
    except ValueError:
        return False


def check_token(rt: Runtime, token: str | None) -> None:
    """Unauthorized unless `token` is the daemon's (compared in constant time)."""
    if rt.token is None:
        raise Unauthorized("the daemon has no token configured: changes are refused")
    if token is None:
        raise Unauthorized("this request needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.encode(), rt.token.encode()):
        raise Unauthorized("the bearer token is not the daemon's token")


def _check(rt: Runtime, creds: HTTPAuthorizationCredentials | None) -> None:
    check_token(rt, creds.credentials if creds is not None else None)


async def require_write(rt: RuntimeDep, creds: Credentials) -> None:
    """Changes always need the bearer token (compared in constant time)."""
    _check(rt, creds)


async def require_read(
    request: Request, rt: RuntimeDep, settings: SettingsDep, creds: Credentials
) -> None:
    """Reads are open from loopback when `open_reads`; a token that is sent must be right."""
    if creds is None and settings.open_reads and _is_local(request):
        return
    _check(rt, creds)


async def require_json(request: Request) -> None:
    """A request with a body must send it as application/json (or +json)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    ctype = request.headers.get("content-type")
    length = request.headers.get("content-length")
    if ctype is None and length in (None, "0"):
        return  # no body; validation names what is missing
    media = (ctype or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise UnsupportedMediaType(
        f"the body must be application/json, got {ctype or 'no content type'!r}",
        field="content-type",
    )


def _query_names(dependant: Any) -> set[str]:
    names = {str(f.alias) for f in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """A query parameter the operation does not define is refused (`?dryrun=1` is a typo)."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    known = _query_names(dependant) if dependant is not None else set()
    for name in request.query_params:
        if name not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidInput(
                f"unknown query parameter {name!r} (this operation takes: {allowed})",
                field=name,
            )


WriteAuth = Depends(require_write)
ReadAuth = Depends(require_read)
JsonBody = Depends(require_json)
