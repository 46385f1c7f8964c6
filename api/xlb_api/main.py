"""The FastAPI app: routers, problem handlers, and the daemon's lifespan.

`create_app()` builds the daemon: its lifespan loads the data plane (reusing pinned maps),
brings the maps to the stored state, attaches (lb.dataplane.host.open_host +
lb.control.facade.ControlPlane), and on shutdown stops serving and leaves the program
forwarding unless `detach_on_exit`.

`create_app(control=..., balancer=...)` wraps an already-built control plane instead (tests,
embedding): the lifespan then only runs the statistics sampler and closes nothing it did not
open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI

from lb.control.facade import ControlPlane
from lb.control.model import validate_vip
from lb.dataplane.loader import Balancer
from lb.errors import XlbError
from lb.health.manager import HEALTH_FILE, HealthManager, restored_overlay
from lb.ops.explain import Explainer
from lb.ops.monitor import EventHub
from lb.ops.stats import RateSampler, StatsReader
from xlb_api.deps import Runtime, reject_unknown_query
from xlb_api.guard import RequestGuard
from xlb_api.problems import install_problem_handlers, problem_only_openapi
from xlb_api.routes import (
    backends,
    chain,
    checks,
    events,
    explain,
    fleet,
    health,
    host,
    state,
    stats,
    verify,
    vips,
)
from xlb_api.settings import ApiSettings, get_settings
from xlb_api.timing_metrics import RequestTimer, request_histogram

if TYPE_CHECKING:
    from lb.fleet.node import FleetNode

log = logging.getLogger("xlb.api")

DESCRIPTION = """\
REST API of xlb, an XDP L4 load balancer.

Changes need `Authorization: Bearer <token>`; reads are open from loopback unless the daemon
runs with `XLB_API_OPEN_READS=false`. Every error is `application/problem+json` (RFC 9457).
VIP ids look like `tcp:198.18.0.10:80` or `udp:[2001:db8::10]:53` (URL-encode the brackets
if your client needs to).
"""


def build_runtime(
    control: ControlPlane,
    settings: ApiSettings,
    balancer: Balancer | None,
    *,
    attachment: Callable[[], tuple[bool, str]] | None = None,
    attach_mode: Callable[[], str | None] | None = None,
    attach_reason: Callable[[], str | None] | None = None,
) -> Runtime:
    """Assemble the objects the routes use around a control plane (and its data plane)."""
    rt = Runtime(control=control, token=settings.expected_token())
    if balancer is not None:
        rt.balancer = balancer
        rt.stats = StatsReader(balancer, conn_count_ttl=settings.conn_count_ttl_s)
        rt.sampler = RateSampler(
            rt.stats, interval=settings.stats_interval_s, window=settings.stats_window_s
        )
        rt.explainer = Explainer(balancer, rt.stats)
        rt.events = EventHub(balancer)
    if attachment is not None:
        rt.attachment = attachment
    if attach_mode is not None:
        rt.attach_mode = attach_mode
    if attach_reason is not None:
        rt.attach_reason = attach_reason
    return rt


async def _verify_forever(control: ControlPlane, interval: float, repair: bool) -> None:
    # Drift behind the daemon's back (bpftool, a raw map write) survives incremental writes:
    # only reading the maps back finds it.
    while True:
        await asyncio.sleep(interval)
        try:
            report = await asyncio.to_thread(control.check_drift, repair=repair)
        except Exception as e:  # a failed read must not stop the checks
            log.warning("verifying the maps failed: %s", e)
            continue
        if report.drifts:
            what = "; ".join(f"{d.map} {d.key}: {d.actual} (expected {d.expected})"
                             for d in report.drifts[:5])  # fmt: skip
            log.warning("%d map entries differed from generation %d%s: %s",
                        len(report.drifts), report.generation,
                        ", rewritten" if report.repaired else "", what)  # fmt: skip


#: How often the daemon looks for second-chance windows that ended (docs/second-chance.md).
SECOND_WINDOW_CHECK_S = 1.0


async def _close_windows_forever(control: ControlPlane) -> None:
    # A window ends by time (or when its drain does): storing the VIP without it takes the
    # second hops out of the rings, on every host of a fleet alike.
    while True:
        await asyncio.sleep(SECOND_WINDOW_CHECK_S)
        try:
            closed = await asyncio.to_thread(control.close_second_windows)
        except Exception as e:  # a failed write must not stop the checks
            log.warning("closing second-chance windows failed: %s", e)
            continue
        if closed:
            log.info("second-chance windows closed: %s", ", ".join(closed))


async def _sample_forever(sampler: RateSampler) -> None:
    while True:
        try:
            await asyncio.to_thread(sampler.sample)
        except Exception as e:  # a failed read must not stop the sampler
            log.warning("statistics sample failed: %s", e)
        await asyncio.sleep(sampler.interval)


def open_daemon(
    stack: ExitStack, settings: ApiSettings, lb_settings: Any, *, repin: bool = False
) -> Runtime:
    """Open the data plane the daemon's way (load, pin, reconcile, attach) onto `stack`.

    Blocking (BCC, netlink): call it from a worker thread. `repin` drops the old pins first.
    """
    return _host_runtime(stack, settings, lb_settings, repin=repin)


def _host_runtime(
    stack: ExitStack, settings: ApiSettings, lb_settings: Any, *, repin: bool = False
) -> Runtime:
    """Open the data plane the daemon's way: load, pin, reconcile, attach."""
    from lb.dataplane.hcencap import tunnel_factory
    from lb.dataplane.host import open_host

    # Load (reusing the pins) and bring the maps to the stored state first, then attach, so
    # the first packet the program sees already meets the stored state.
    if lb_settings is None:
        from lb.settings import load_settings

        lb_settings = load_settings()
    if lb_settings.bgp.enabled:
        from lb.fleet.bgp import require_capabilities

        # Before anything loads: without it BIRD would start and every session stay down.
        require_capabilities()
    host = stack.enter_context(open_host(lb_settings, attach=False, repin=repin))
    balancer = host.balancer
    node = None
    if lb_settings.store == "etcd":
        from lb.fleet.node import FleetNode

        # Closed after the control plane (an ExitStack unwinds in reverse).
        node = FleetNode(lb_settings.state_dir, lb_settings.etcd)
        stack.callback(node.close)
    # Backends health had taken out stay out from the first map write on (lb.health.manager).
    health_file = Path(lb_settings.state_dir) / HEALTH_FILE
    control = ControlPlane(lb_settings, balancer, runtime=host.runtime,
                           overlay=restored_overlay(health_file),
                           store=node.store_factory if node is not None else None)  # fmt: skip
    stack.callback(control.close)
    if node is not None:
        node.start(control)
    r, s = host.runtime, lb_settings
    for v in (4, 6):
        src = getattr(r, f"src_v{v}")
        if src.is_unspecified:
            log.info("outer_source lb: no IPv%d source (runtime.src_v%d unset, none on %s): "
                     "VIPs that need one are refused", v, v, s.interface or "no interface")
        elif getattr(s.runtime, f"src_v{v}").is_unspecified:
            log.info("outer_source lb: IPv%d source %s, taken from %s (runtime.src_v%d unset)",
                     v, src, s.interface, v)
    for vip in control.list_vips():
        try:
            validate_vip(vip, control.limits)
        except XlbError as e:
            log.warning("stored VIP %s: %s", vip.id, e.detail)
    s = lb_settings
    if s.interface:
        # host.attach also tells the program the interface's MAC (lb_cfg.lb_mac).
        info = host.attach()
        assert info is not None
        log.info("attached to %s in %s mode (%s)", s.interface, info.mode, info.reason)

    def attachment() -> tuple[bool, str]:
        # Asked from the kernel each time, so a detach or a foreign replacement behind the
        # daemon's back shows. Blocking (netlink): call it from a worker thread.
        info = host.attach_info
        if info is None:
            if s.interface:
                return False, f"detached from {s.interface}"
            return False, "no interface configured (XLB_INTERFACE)"
        try:
            now = host.xdp_state()
        except XlbError as e:
            return False, f"cannot query {info.interface}: {e.detail}"
        if now is None or now.prog_id != info.prog_id:
            what = f"{now.prog_name} (id {now.prog_id})" if now and now.prog_id else "nothing"
            return False, f"{info.interface} no longer runs our program (it runs {what})"
        return True, f"{info.mode} on {info.interface}"

    def mode() -> str | None:
        info = getattr(host, "attach_info", None)
        return None if info is None else str(info.mode)

    def mode_reason() -> str | None:
        info = getattr(host, "attach_info", None)
        return None if info is None else str(info.reason)

    rt = build_runtime(control, settings, balancer, attachment=attachment, attach_mode=mode,
                       attach_reason=mode_reason)  # fmt: skip
    rt.host = host
    rt.fleet = node
    # Tunnelled probes need a tc program on the interface, compiled on first use only.
    rt.health = HealthManager(control, tunnel=tunnel_factory(lb_settings, stack),
                              state_file=health_file,
                              view=node.health if node is not None else None)
    if s.bgp.enabled:
        from lb.fleet.announce import Announcer

        # Announced once attached and in sync; the speaker outlives the daemon (no close).
        rt.announcer = Announcer(s.bgp, s.state_dir, control, lambda: attachment()[0])
        rt.announcer.sync()
        if node is not None:
            node.bgp = rt.announcer.summary  # the BGP column of GET /v1/fleet
    return rt


async def _announce_forever(announcer: Any) -> None:
    # Polled: a VIP change, a detach behind the daemon's back or a drain reaches the router
    # within one interval. sync() never raises an XlbError (it records it).
    while True:
        try:
            await asyncio.to_thread(announcer.sync)
        except Exception as e:
            log.warning("BGP sync failed: %s", e)
        await asyncio.sleep(announcer.cfg.sync_interval_s)


def create_app(
    *,
    control: ControlPlane | None = None,
    balancer: Balancer | None = None,
    settings: ApiSettings | None = None,
    lb_settings: Any = None,
    attachment: Callable[[], tuple[bool, str]] | None = None,
    attach_mode: Callable[[], str | None] | None = None,
    attach_reason: Callable[[], str | None] | None = None,
    health_manager: HealthManager | None = None,
    opened: tuple[Runtime, ExitStack] | None = None,
    fleet_node: FleetNode | None = None,
) -> FastAPI:
    """Build the app; with `control` it wraps that control plane instead of opening one.

    The daemon runs the health checker; a wrapped control plane runs the one given in
    `health_manager` (none by default: probes would leave the test's namespace). `opened`
    is a daemon runtime already opened by `open_daemon` (`lbctl serve` opens it before
    serving, so a failing start is one line, not a traceback): the app closes its stack.
    """
    api_settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Netlink (pyroute2) and BCC calls are blocking and pyroute2 runs its own event loop:
        # opening and closing the data plane happen in a worker thread, never in this loop.
        stack = ExitStack()
        try:
            if control is not None:
                app.state.runtime = build_runtime(
                    control,
                    api_settings,
                    balancer,
                    attachment=attachment,
                    attach_mode=attach_mode,
                    attach_reason=attach_reason,
                )
                if health_manager is not None:
                    app.state.runtime.health = health_manager
                app.state.runtime.fleet = fleet_node
            else:
                if opened is not None:
                    stack.enter_context(opened[1])
                    app.state.runtime = opened[0]
                else:
                    app.state.runtime = await asyncio.to_thread(
                        _host_runtime, stack, api_settings, lb_settings
                    )
                if api_settings.detach_on_exit:
                    stack.callback(_detach, app.state.runtime.host, app.state.runtime.announcer)
            rt: Runtime = app.state.runtime
            task = asyncio.create_task(_sample_forever(rt.sampler)) if rt.sampler else None
            hm: HealthManager | None = rt.health
            htask = asyncio.create_task(hm.run(), name="xlb-health") if hm else None
            vtask = None
            if rt.balancer is not None and api_settings.verify_interval_s > 0:
                vtask = asyncio.create_task(_verify_forever(
                    rt.control, api_settings.verify_interval_s, api_settings.verify_repair),
                    name="xlb-verify")  # fmt: skip
            btask = (asyncio.create_task(_announce_forever(rt.announcer), name="xlb-bgp")
                     if rt.announcer else None)
            wtask = asyncio.create_task(_close_windows_forever(rt.control), name="xlb-second")
            try:
                yield
            finally:
                for t in (task, htask, vtask, btask, wtask):
                    if t is not None:
                        t.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await t
                if rt.explainer is not None:
                    rt.explainer.close()
                if rt.events is not None:
                    await asyncio.to_thread(rt.events.close)
                app.state.runtime = None
        finally:
            await asyncio.to_thread(stack.close)

    app = FastAPI(
        title="xlb",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.runtime = None
    app.state.settings = api_settings
    install_problem_handlers(app)
    app.add_middleware(RequestGuard, max_body_bytes=api_settings.max_body_bytes)
    # Outermost (added last): the guard's refusals are timed and counted too.
    app.state.request_seconds = request_histogram()
    app.add_middleware(RequestTimer, histogram=app.state.request_seconds)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_only_openapi(FastAPI.openapi(app))
            if api_settings.open_reads:
                _reads_need_no_token(app.openapi_schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    for module in (vips, backends, state, stats, explain, health, checks, verify, fleet, host,
                   chain, events):
        app.include_router(module.router)
    return app


def _reads_need_no_token(schema: dict[str, Any]) -> None:
    # Reads are open from loopback: document their token as optional (OpenAPI's `{}`).
    for item in schema.get("paths", {}).values():
        op = item.get("get")
        if op is not None and op.get("security"):
            op["security"] = [{}, *op["security"]]


def _detach(host: Any, announcer: Any = None) -> None:
    if announcer is not None:
        # Routes first: the router must stop sending before the program goes.
        with contextlib.suppress(XlbError):
            announcer.withdraw_all()
    detach = getattr(host, "detach", None)
    if detach is not None:
        detach()
        log.info("detached the XDP program (detach_on_exit)")
