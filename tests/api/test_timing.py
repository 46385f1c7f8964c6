"""Latency histograms in /metrics: applies by phase, ring builds, REST requests by route."""

from __future__ import annotations

import math
from urllib.parse import quote

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from lb.timing import APPLY_BUCKETS, REST_BUCKETS, RING_BUCKETS
from tests.api.conftest import Served

VIP = {"protocol": "tcp", "address": "198.18.0.10", "port": 80,
       "backends": [{"address": "198.18.1.2"}, {"address": "198.18.1.3"}]}


def _scrape(api: Served) -> dict[str, Metric]:
    r = api.anon.get("/metrics")
    assert r.status_code == 200, r.text
    return {m.name: m for m in text_string_to_metric_families(r.text)}


def _counts(fam: Metric) -> dict[tuple[tuple[str, str], ...], float]:
    """Each series' _count, keyed by its labels."""
    return {tuple(sorted(s.labels.items())): s.value
            for s in fam.samples if s.name.endswith("_count")}


def _assert_well_formed(fam: Metric, bounds: tuple[float, ...]) -> None:
    """Buckets are the named bounds, cumulative, and +Inf equals _count."""
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for s in fam.samples:
        if s.name.endswith("_bucket"):
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series.setdefault(labels, []).append((float(s.labels["le"]), s.value))
    counts = _counts(fam)
    assert series, f"{fam.name} has no series"
    for labels, buckets in series.items():
        assert [le for le, _ in buckets] == [*bounds, math.inf], f"{fam.name}: wrong bounds"
        values = [n for _, n in buckets]
        assert values == sorted(values), f"{fam.name} {labels}: buckets are not cumulative"
        assert values[-1] == counts[labels], f"{fam.name} {labels}: +Inf is not the count"


def test_an_apply_moves_the_apply_phase_and_ring_histograms(api: Served) -> None:
    before = _scrape(api)
    r = api.client.post("/v1/vips", json=VIP)
    assert r.status_code == 201, r.text
    after = _scrape(api)

    def moved(name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return _counts(after[name]).get(key, 0) - _counts(before[name]).get(key, 0)

    assert moved("xlb_apply_seconds") >= 1, "a stored change is not counted as an apply"
    for phase in ("validate", "store", "maps"):
        assert moved("xlb_apply_phase_seconds", phase=phase) >= 1, f"phase {phase} not timed"
    assert moved("xlb_ring_build_seconds") >= 1, "the new VIP's ring build is not timed"
    _assert_well_formed(after["xlb_apply_seconds"], APPLY_BUCKETS)
    _assert_well_formed(after["xlb_apply_phase_seconds"], APPLY_BUCKETS)
    _assert_well_formed(after["xlb_ring_build_seconds"], RING_BUCKETS)


def test_requests_are_timed_by_route_template_method_and_status_class(api: Served) -> None:
    r = api.client.post("/v1/vips", json=VIP)
    assert r.status_code == 201, r.text
    vid = quote(r.json()["id"], safe="")
    assert api.client.get(f"/v1/vips/{vid}").status_code == 200
    assert api.client.get(f"/v1/vips/{quote('tcp:198.18.0.99:80', safe='')}").status_code == 404
    assert api.client.get(f"/v1/vips/{vid}/backends").status_code == 200
    assert api.anon.post("/v1/vips", json=VIP).status_code == 401  # refused by the guard
    assert api.client.get("/no/such/path/198.18.0.10").status_code == 404
    assert api.client.delete("/v1/vips").status_code == 405  # the path's route, another method
    fam = _scrape(api)["xlb_api_request_seconds"]
    counts = _counts(fam)

    def count(method: str, route: str, status: str) -> float:
        return counts.get((("method", method), ("route", route), ("status", status)), 0)

    assert count("POST", "/v1/vips", "2xx") == 1
    assert count("POST", "/v1/vips", "4xx") == 1, "the guard's 401 is not under its route"
    assert count("GET", "/v1/vips/{vip_id}", "2xx") == 1
    assert count("GET", "/v1/vips/{vip_id}", "4xx") == 1
    assert count("GET", "/v1/vips/{vip_id}/backends", "2xx") == 1
    assert count("GET", "unmatched", "4xx") == 1
    assert count("DELETE", "/v1/vips", "4xx") == 1
    templates = {*api.client.get("/openapi.json").json()["paths"], "/openapi.json", "unmatched"}
    routes = {dict(k)["route"] for k in counts}
    assert routes <= templates, f"route labels that are no template: {routes - templates}"
    assert not any("198.18" in r for r in routes), "a raw path leaked into the route label"
    _assert_well_formed(fam, REST_BUCKETS)
