"""Drift behind the daemon's back: a ring slot overwritten through the map (by id, with its own
fd, as bpftool does) is found by the periodic verify, reported in /readyz and /metrics, and
rewritten by `lbctl verify --repair`, POST /v1/verify, or the periodic verify itself."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

import pytest

from lb.dataplane import bpf
from tests.api.conftest import Served, assert_problem
from tests.api.test_cli import lbctl

pytestmark = pytest.mark.bpf

VIP_ID = "tcp:198.18.0.10:80"
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_GET_FD_BY_ID = 14
SLOT = 7


def _vip(api: Served) -> int:
    body = {"protocol": "tcp", "address": "198.18.0.10", "port": 80,
            "backends": [{"address": "198.18.1.2"}, {"address": "198.18.1.3"}]}
    api.client.post("/v1/vips", json=body).raise_for_status()
    return api.control.vip_number(VIP_ID) * api.control.limits.ring_size + SLOT


def _ring_slot(api: Served, key: int) -> int:
    t = api.balancer.ch_rings
    return int(t[t.Key(key)].value)


def _overwrite(api: Served, key: int, value: int) -> None:
    """Write one ch_rings slot as another process would: the map opened by its id."""
    map_id = api.balancer.map_ids()["ch_rings"]
    fd = bpf.bpf(BPF_MAP_GET_FD_BY_ID, bpf.GetIdAttr(id=map_id), "opening ch_rings by id")
    try:
        k, v = ctypes.c_uint32(key), ctypes.c_uint32(value)
        attr = bpf.ElemAttr(map_fd=fd, key=ctypes.addressof(k), value=ctypes.addressof(v))
        bpf.bpf(BPF_MAP_UPDATE_ELEM, attr, "writing ch_rings")
    finally:
        os.close(fd)


def _until(cond: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.05)


def _metric(api: Served, name: str) -> float:
    for line in api.client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_ring_slot_overwritten_behind_the_daemons_back_is_reported_and_repaired(
    serve: Callable[..., Served],
) -> None:
    api = serve(verify_interval_s=0.2, verify_repair=False)
    key = _vip(api)
    good = _ring_slot(api, key)
    bad = api.control.backend_index("198.18.1.3" if good != api.control.backend_index(
        "198.18.1.3") else "198.18.1.2")
    assert api.client.get("/readyz").status_code == 200
    _overwrite(api, key, bad)

    _until(lambda: api.client.get("/readyz").status_code == 503, 15, "/readyz reports drift")
    reasons = api.client.get("/readyz").json()["reasons"]
    assert any(r.startswith("drift: 1 map entries") and "ch_rings" in r for r in reasons), reasons
    assert _metric(api, "xlb_drift_entries") == 1
    # A later change does not fix it (writes are incremental): only a repair does.
    api.client.post(f"/v1/vips/{VIP_ID}/backends", json={"address": "198.18.1.4",
                                                          "weight": 0}).raise_for_status()
    assert _ring_slot(api, key) == bad

    p = lbctl(api, "verify")
    assert p.returncode == 5, (p.stdout, p.stderr)
    assert "ch_rings" in p.stdout and VIP_ID in p.stdout and "--repair" in p.stdout
    p = lbctl(api, "verify", "--repair")
    assert p.returncode == 0 and "rewritten" in p.stdout, (p.stdout, p.stderr)
    assert _ring_slot(api, key) == good, "the ring slot was not rewritten"
    assert api.client.get("/readyz").status_code == 200
    p = lbctl(api, "verify")
    assert p.returncode == 0 and "match" in p.stdout, (p.stdout, p.stderr)
    assert _metric(api, "xlb_drift_entries") == 0
    assert _metric(api, "xlb_drift_repaired_entries_total") == 1


def test_periodic_verify_repairs_drift_by_default(serve: Callable[..., Served]) -> None:
    api = serve(verify_interval_s=0.2)
    key = _vip(api)
    good = _ring_slot(api, key)
    _overwrite(api, key, 0)  # an emptied slot: its flows would be dropped
    _until(lambda: _ring_slot(api, key) == good, 15, "the periodic verify rewrites the slot")
    assert _metric(api, "xlb_drift_repaired_entries_total") == 1
    assert api.client.get("/readyz").status_code == 200


def test_verify_over_rest_get_reports_post_repairs(api: Served) -> None:
    key = _vip(api)
    good = _ring_slot(api, key)
    r = api.client.get("/v1/verify")
    assert r.status_code == 200 and r.json()["in_sync"] and r.json()["drifts"] == [], r.text
    _overwrite(api, key, 0)
    r = api.client.get("/v1/verify")
    body = r.json()
    assert r.status_code == 200 and not body["in_sync"] and not body["repaired"], body
    assert [(d["map"], d["key"]) for d in body["drifts"]] == [("ch_rings", VIP_ID)]
    assert _ring_slot(api, key) == 0, "GET changed the maps"
    assert_problem(api.anon.post("/v1/verify"), 401, "unauthorized")
    r = api.client.post("/v1/verify")
    assert r.status_code == 200 and r.json()["repaired"] and r.json()["in_sync"], r.text
    assert _ring_slot(api, key) == good


def test_a_cleared_vip_filter_is_reported_and_repaired(api: Served) -> None:
    from lb.consts import XDP_PASS, XDP_TX
    from lb.dataplane.flowhash import Flow5
    from lb.dataplane.testrun import TestRunner
    from lb.ops.explain import build_packet

    _vip(api)
    packet = build_packet(Flow5.of("198.18.2.1", "198.18.0.10", 40000, 80, "tcp"))
    runner = TestRunner(api.balancer.prog_fd)
    assert runner.run(packet).verdict == XDP_TX
    f = api.balancer.vip_filter
    leaf = f.Leaf()
    leaf.ready = 1  # armed, but no address bit: every VIP's packets go to the stack
    f[f.Key(0)] = leaf
    assert runner.run(packet).verdict == XDP_PASS
    body = api.client.get("/v1/verify").json()
    assert [d["map"] for d in body["drifts"]] == ["vip_filter"], body
    assert "1 missing" in body["drifts"][0]["actual"]
    assert api.client.post("/v1/verify").json()["repaired"]
    assert runner.run(packet).verdict == XDP_TX, "the filter was not rewritten"
    assert api.client.get("/v1/verify").json()["in_sync"]
