"""Declarative state: GET with ETag, PUT replacing everything, dry runs, If-Match."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Served, assert_problem

pytestmark = pytest.mark.bpf


def _state(n_backends: int, port: int = 80) -> dict[str, Any]:
    return {
        "vips": [
            {
                "protocol": "tcp",
                "address": "198.18.0.10",
                "port": port,
                "backends": [{"address": f"198.18.1.{i}"} for i in range(1, n_backends + 1)],
            }
        ]
    }


def test_get_state_has_etag_generation(api: Served) -> None:
    r = api.client.get("/v1/state")
    assert r.status_code == 200
    assert r.headers["etag"] == f'"{r.json()["generation"]}"'


def test_put_state_replaces_everything(api: Served) -> None:
    api.client.post("/v1/vips", json={"protocol": "udp", "address": "198.18.0.20", "port": 53})
    r = api.client.put("/v1/state", json=_state(4))
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["dry_run"] is False
    assert plan["added_vips"] == ["tcp:198.18.0.10:80"]
    assert plan["removed_vips"] == ["udp:198.18.0.20:53"]
    assert r.headers["etag"] == f'"{plan["to_generation"]}"'
    got = api.client.get("/v1/state").json()
    assert [v["port"] for v in got["vips"]] == [80] and len(got["vips"][0]["backends"]) == 4
    assert api.control.verify() == []


def test_get_state_round_trips_through_put(api: Served) -> None:
    api.client.put("/v1/state", json=_state(3)).raise_for_status()
    state = api.client.get("/v1/state").json()
    r = api.client.put("/v1/state", json=state)
    assert r.status_code == 200, r.text
    assert r.json()["added_vips"] == [] and r.json()["changed_vips"] == []


def test_dry_run_returns_plan_and_changes_nothing(api: Served) -> None:
    api.client.put("/v1/state", json=_state(10)).raise_for_status()
    gen = api.control.generation
    r = api.client.put("/v1/state", params={"dry_run": "true"}, json=_state(9))
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["dry_run"] is True and plan["to_generation"] is None
    (vip,) = plan["changed_vips"]
    assert vip["removed_backends"] == ["198.18.1.10"]
    # Removing one of ten backends moves about a tenth of the ring.
    assert 0.07 < vip["moved_fraction"] < 0.13
    assert api.control.generation == gen
    assert len(api.control.get_vip("tcp:198.18.0.10:80").backends) == 10


def test_put_state_if_match_current_generation_applies(api: Served) -> None:
    etag = api.client.get("/v1/state").headers["etag"]
    r = api.client.put("/v1/state", json=_state(2), headers={"If-Match": etag})
    assert r.status_code == 200, r.text


def test_put_state_if_match_mismatch_is_412(api: Served) -> None:
    etag = api.client.get("/v1/state").headers["etag"]
    api.client.post("/v1/vips", json={"protocol": "udp", "address": "198.18.0.20", "port": 53})
    r = api.client.put("/v1/state", json=_state(2), headers={"If-Match": etag})
    assert_problem(r, 412, "precondition-failed")
    assert [v.id for v in api.control.list_vips()] == ["udp:198.18.0.20:53"]


def test_dry_run_if_match_mismatch_is_412(api: Served) -> None:
    r = api.client.put(
        "/v1/state", params={"dry_run": "true"}, json=_state(2), headers={"If-Match": '"999"'}
    )
    assert_problem(r, 412, "precondition-failed", "If-Match")


def test_if_match_garbage_is_412(api: Served) -> None:
    r = api.client.put("/v1/state", json=_state(2), headers={"If-Match": "yesterday"})
    assert_problem(r, 412, "precondition-failed")


def test_put_state_duplicate_vip_is_422(api: Served) -> None:
    two = {"vips": _state(1)["vips"] * 2}
    body = assert_problem(api.client.put("/v1/state", json=two), 422, "invalid-input")
    assert "twice" in body["detail"]


def test_put_state_too_many_backends_is_409_limit(api: Served) -> None:
    # 4099 slots balance at most 40 backends per ring (100 slots each).
    body = assert_problem(api.client.put("/v1/state", json=_state(41)), 409, "limit-reached")
    assert "backends" in body["field"]
