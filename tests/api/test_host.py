"""Fleet-facing reads of one daemon: ring fingerprints, host status and drain without BGP."""

from __future__ import annotations

import pytest

from lb.control.maglev import Endpoint, build_ring
from tests.api.conftest import API_CONFIG, Served, assert_problem

pytestmark = pytest.mark.bpf

VIP = {"protocol": "tcp", "address": "198.18.0.10", "port": 80}
VID = "tcp:198.18.0.10:80"


def _backends(api: Served, *addrs: str) -> None:
    for a in addrs:
        api.client.post(f"/v1/vips/{VID}/backends", json={"address": a}).raise_for_status()


def test_ring_fingerprint_is_the_rings_and_ignores_backend_indices(api: Served) -> None:
    api.client.post("/v1/vips", json=VIP).raise_for_status()
    # Another VIP takes indices first, so this VIP's backends get other indices than a host
    # that adds them in the other order.
    api.client.post("/v1/vips", json={**VIP, "port": 81}).raise_for_status()
    api.client.post("/v1/vips/tcp:198.18.0.10:81/backends",
                    json={"address": "198.18.1.3"}).raise_for_status()
    _backends(api, "198.18.1.3", "198.18.1.2")
    fp = api.client.get(f"/v1/vips/{VID}").json()["ring_fingerprint"]
    ring = build_ring([Endpoint("198.18.1.2", 1), Endpoint("198.18.1.3", 1)],
                      API_CONFIG.ring_size)
    assert fp == ring.fingerprint(), "fingerprint is not the ring's, by identity"
    api.client.delete(f"/v1/vips/{VID}/backends/198.18.1.3").raise_for_status()
    assert api.client.get(f"/v1/vips/{VID}").json()["ring_fingerprint"] != fp
    metrics = api.client.get("/metrics").text
    want = api.client.get(f"/v1/vips/{VID}").json()["ring_fingerprint"]
    assert f'xlb_vip_ring_info{{fingerprint="{want}",vip="{VID}"}} 1.0' in metrics


def test_host_without_bgp_says_so_and_drain_is_409(api: Served) -> None:
    h = api.client.get("/v1/host").json()
    assert h["bgp_enabled"] is False and h["peers"] == [] and not h["announcing"]
    r = api.client.post("/v1/host/drain", json={})
    assert_problem(r, 409, "conflict", field="bgp.enabled")
