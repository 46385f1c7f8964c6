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
from typing import Any

from fastapi import Depends, FastAPI

from lb.control.facade import ControlPlane
from lb.dataplane.loader import Balancer
from lb.errors import XlbError
from lb.health.manager import HealthManager
from lb.ops.explain import Explainer
from lb.ops.stats import RateSampler, StatsReader
from xlb_api.deps import Runtime, reject_unknown_query
from xlb_api.problems import install_problem_handlers, problem_only_openapi
from xlb_api.routes import backends, checks, explain, health, host, state, stats, vips
from xlb_api.settings import ApiSettings, get_settings

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
    if attachment is not None:
        rt.attachment = attachment
    if attach_mode is not None:
        rt.attach_mode = attach_mode
    if attach_reason is not None:
        rt.attach_reason = attach_reason
    return rt


async def _sample_forever(sampler: RateSampler) -> None:
    while True:
        try:
            await asyncio.to_thread(sampler.sample)
        except Exception as e:  # a failed read must not stop the sampler
            log.warning("statistics sample failed: %s", e)
        await asyncio.sleep(sampler.interval)


def _host_runtime(stack: ExitStack, settings: ApiSettings, lb_settings: Any) -> Runtime:
    """Open the data plane the daemon's way: load, pin, reconcile, attach."""
    from lb.dataplane import attach as xdp
    from lb.dataplane.hcencap import tunnel_factory
    from lb.dataplane.host import open_host

    # Load (reusing the pins) and bring the maps to the stored state first, then attach, so
    # the first packet the program sees already meets the stored state.
    if lb_settings is None:
        from lb.settings import load_settings

        lb_settings = load_settings()
    host = stack.enter_context(open_host(lb_settings, attach=False))
    balancer = host.balancer
    control = ControlPlane(lb_settings, balancer)
    stack.callback(control.close)
    s = lb_settings
    if s.interface:
        host.attach_info = xdp.attach(
            balancer.prog_fd,
            s.interface,
            mode=s.xdp_mode,
            netns=s.netns,
            replace_foreign=s.replace_foreign,
        )
        info = host.attach_info
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
    # Tunnelled probes need a tc program on the interface, compiled on first use only.
    rt.health = HealthManager(control, tunnel=tunnel_factory(lb_settings, stack))
    if s.bgp.enabled:
        from lb.fleet.announce import Announcer

        # Announced once attached and in sync; the speaker outlives the daemon (no close).
        rt.announcer = Announcer(s.bgp, s.state_dir, control, lambda: attachment()[0])
        rt.announcer.sync()
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
) -> FastAPI:
    """Build the app; with `control` it wraps that control plane instead of opening one.

    The daemon runs the health checker; a wrapped control plane runs the one given in
    `health_manager` (none by default: probes would leave the test's namespace).
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
            btask = (asyncio.create_task(_announce_forever(rt.announcer), name="xlb-bgp")
                     if rt.announcer else None)
            try:
                yield
            finally:
                for t in (task, htask, btask):
                    if t is not None:
                        t.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await t
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

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_only_openapi(FastAPI.openapi(app))
            if api_settings.open_reads:
                _reads_need_no_token(app.openapi_schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    for module in (vips, backends, state, stats, explain, health, checks, host):
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
