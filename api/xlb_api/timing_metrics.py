"""Latency histograms in /metrics: control-plane applies, REST requests, probes, ring builds.

The observations are kept by lb.timing histograms where the work happens (the control plane,
the health manager, `RequestTimer` below); this module names the metric families and turns
them into Prometheus histograms at scrape time. Every label comes from a bounded set: a REST
request is labelled by its route's template (`/v1/vips/{vip}`), never its raw path.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lb.timing import REST_BUCKETS, Histogram
from xlb_api.deps import Runtime

#: Methods a request is labelled with as they are; any other is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The route label of a request no route matches (a 404 on an unknown path).
UNMATCHED = "unmatched"


def request_histogram() -> Histogram:
    """The REST request histogram: method, route template, status class ("2xx")."""
    return Histogram(REST_BUCKETS, ("method", "route", "status"))


def _templates(app: Any) -> list[tuple[re.Pattern[str], str, frozenset[str]]]:
    # Every documented path template with its methods (FastAPI's schema has them whole,
    # prefixes included, whatever the router's internals).
    out = []
    for template, ops in app.openapi().get("paths", {}).items():
        regex, _, _ = compile_path(template)
        out.append((regex, template, frozenset(m.upper() for m in ops)))
    return out


class RequestTimer:
    """ASGI middleware: each HTTP request's time, received to answered, by route template."""

    def __init__(self, app: ASGIApp, *, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram
        self._templates: list[tuple[re.Pattern[str], str, frozenset[str]]] | None = None

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")  # set by the router once it matched
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        # Answered before routing (the guard's 401 and 413): match the templates here.
        if self._templates is None:
            app: Any = scope.get("app")
            self._templates = _templates(app) if hasattr(app, "openapi") else []
        found = UNMATCHED
        for regex, template, methods in self._templates:
            if regex.match(scope.get("path", "")):
                if scope.get("method") in methods:
                    return template
                if found == UNMATCHED:
                    found = template  # the path matched, the method did not (405)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request, then count it under its method, route and status class."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers when the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope.get("method", "")
            self.histogram.observe(
                time.perf_counter() - start,
                method if method in METHODS else "other",
                self._route(scope),
                f"{status // 100}xx",
            )


def _family(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=list(hist.labels))
    for values, series in sorted(hist.snapshot().items()):
        buckets = [("+Inf" if le == math.inf else repr(le), n)
                   for le, n in series.cumulative(hist.bounds)]
        fam.add_metric(list(values), buckets, sum_value=series.sum)
    return fam


class TimingCollector(Collector):
    """The latency histograms of the control plane, the API and the health checker."""

    def __init__(self, runtime: Runtime, requests: Histogram | None) -> None:
        self._rt = runtime
        self._requests = requests

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """Yield every histogram family (the probes' only when health checks run)."""
        control = self._rt.control
        yield _family(
            "xlb_apply_seconds",
            "one group of changes, from validation to the maps written",
            control.apply_seconds,
        )
        yield _family(
            "xlb_apply_phase_seconds",
            "one phase of an apply: validate, store (the durable write), maps (every map "
            "write: a group's, a health change's, another host's)",
            control.apply_phase_seconds,
        )
        yield _family(
            "xlb_ring_build_seconds", "one Maglev ring built", control.ring_build_seconds
        )
        if self._requests is not None:
            yield _family(
                "xlb_api_request_seconds",
                "one REST request, received to answered, by route template and status class",
                self._requests,
            )
        if self._rt.health is not None:
            yield _family(
                "xlb_health_probe_seconds",
                "one health probe's round trip, by check type and result",
                self._rt.health.probe_seconds,
            )
