"""Backends of a VIP: add, list, read, update, drain, remove, replace; errors; the maps follow."""

from __future__ import annotations

import pytest

from lb.control.model import MAX_WEIGHT
from tests.api.conftest import Served, assert_problem

pytestmark = pytest.mark.bpf

VIP_ID = "tcp:198.18.0.10:80"
BASE = f"/v1/vips/{VIP_ID}/backends"


@pytest.fixture
def vip(api: Served) -> Served:
    """The API with one VIP and no backend."""
    api.client.post(
        "/v1/vips", json={"protocol": "tcp", "address": "198.18.0.10", "port": 80}
    ).raise_for_status()
    return api


def _ring_backends(api: Served) -> set[str]:
    """Backend addresses that own at least one slot of the VIP's ring in ch_rings."""
    from lb.dataplane.mapio import MapIO

    io = MapIO(api.balancer)
    slots = set(io.read_ring(api.control.vip_number(VIP_ID)))
    names = {
        api.control.backend_index(b.identity): b.identity
        for b in api.control.get_vip(VIP_ID).backends
    }
    return {names[s] for s in slots if s in names}


def test_add_backend_is_201_and_enters_the_ring(vip: Served) -> None:
    r = vip.client.post(BASE, json={"address": "198.18.1.2", "weight": 3})
    assert r.status_code == 201, r.text
    assert r.json() == {"address": "198.18.1.2", "weight": 3, "state": "active", "in_ring": True}
    assert r.headers["location"] == f"{BASE}/198.18.1.2"
    assert _ring_backends(vip) == {"198.18.1.2"}


def test_list_and_get_backends(vip: Served) -> None:
    for a in ("198.18.1.2", "2001:db8::2"):
        vip.client.post(BASE, json={"address": a}).raise_for_status()
    listed = vip.client.get(BASE).json()
    assert listed["vip_id"] == VIP_ID and listed["count"] == 2
    assert vip.client.get(f"{BASE}/2001:db8:0::2").json()["address"] == "2001:db8::2"


def test_update_backend_weight(vip: Served) -> None:
    vip.client.post(BASE, json={"address": "198.18.1.2"}).raise_for_status()
    r = vip.client.patch(f"{BASE}/198.18.1.2", json={"weight": 7})
    assert r.status_code == 200 and r.json()["weight"] == 7 and r.json()["state"] == "active"


def test_drain_takes_backend_out_of_ring_but_keeps_it_in_reals(vip: Served) -> None:
    for a in ("198.18.1.2", "198.18.1.3"):
        vip.client.post(BASE, json={"address": a}).raise_for_status()
    r = vip.client.patch(f"{BASE}/198.18.1.3", json={"state": "draining"})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "draining" and r.json()["in_ring"] is False
    assert _ring_backends(vip) == {"198.18.1.2"}
    from lb.ops.stats import StatsReader

    assert "198.18.1.3" in StatsReader(vip.balancer).real_indices()  # tracked flows go on


def test_remove_backend_is_204(vip: Served) -> None:
    vip.client.post(BASE, json={"address": "198.18.1.2"}).raise_for_status()
    assert vip.client.delete(f"{BASE}/198.18.1.2").status_code == 204
    assert vip.client.get(BASE).json()["count"] == 0


def test_replace_backends(vip: Served) -> None:
    vip.client.post(BASE, json={"address": "198.18.1.2"}).raise_for_status()
    new = [{"address": "198.18.1.5", "weight": 2}, {"address": "198.18.1.6"}]
    r = vip.client.put(BASE, json={"backends": new})
    assert r.status_code == 200, r.text
    assert [b["address"] for b in r.json()["data"]] == ["198.18.1.5", "198.18.1.6"]
    assert _ring_backends(vip) == {"198.18.1.5", "198.18.1.6"}


def test_add_backend_duplicate_is_409(vip: Served) -> None:
    vip.client.post(BASE, json={"address": "198.18.1.2"}).raise_for_status()
    assert_problem(vip.client.post(BASE, json={"address": "198.18.1.2"}), 409, "conflict")


def test_add_backend_to_unknown_vip_is_404(api: Served) -> None:
    r = api.client.post("/v1/vips/tcp:198.18.0.99:80/backends", json={"address": "198.18.1.2"})
    assert_problem(r, 404, "not-found", "vip_id")


def test_unknown_backend_is_404(vip: Served) -> None:
    assert_problem(vip.client.get(f"{BASE}/198.18.1.9"), 404, "not-found", "address")
    assert_problem(vip.client.patch(f"{BASE}/198.18.1.9", json={"weight": 2}), 404, "not-found")
    assert_problem(vip.client.delete(f"{BASE}/198.18.1.9"), 404, "not-found")


@pytest.mark.parametrize("weight", [-1, MAX_WEIGHT + 1])
def test_weight_out_of_range_is_422(vip: Served, weight: int) -> None:
    r = vip.client.post(BASE, json={"address": "198.18.1.2", "weight": weight})
    body = assert_problem(r, 422, "invalid-input", "weight")
    assert str(MAX_WEIGHT) in body["detail"] or "0" in body["detail"]


def test_bad_backend_address_is_422(vip: Served) -> None:
    assert_problem(
        vip.client.post(BASE, json={"address": "198.18.1"}), 422, "invalid-input", "address"
    )


def test_ipv4_backend_on_ipv6_vip_is_422(api: Served) -> None:
    api.client.post("/v1/vips", json={"protocol": "udp", "address": "2001:db8::10", "port": 53})
    r = api.client.post("/v1/vips/udp:[2001:db8::10]:53/backends", json={"address": "198.18.1.2"})
    body = assert_problem(r, 422, "invalid-input")
    assert body["field"].endswith("address") and "IPv6 VIP" in body["detail"]


def test_bad_backend_state_is_422(vip: Served) -> None:
    vip.client.post(BASE, json={"address": "198.18.1.2"}).raise_for_status()
    assert_problem(
        vip.client.patch(f"{BASE}/198.18.1.2", json={"state": "asleep"}),
        422,
        "invalid-input",
        "state",
    )


def test_replace_with_duplicates_is_422(vip: Served) -> None:
    dup = [{"address": "198.18.1.5"}, {"address": "198.18.1.5"}]
    body = assert_problem(vip.client.put(BASE, json={"backends": dup}), 422, "invalid-input")
    assert "twice" in body["detail"]
