"""Authentication: a bearer token for every change; reads open on loopback when configured."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.api.conftest import Served, assert_problem

pytestmark = pytest.mark.bpf

VIP = {"protocol": "tcp", "address": "198.18.0.10", "port": 80}


def test_write_without_token_is_401(api: Served) -> None:
    r = api.anon.post("/v1/vips", json=VIP)
    assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert api.control.list_vips() == []


def test_write_with_wrong_token_is_401(api: Served) -> None:
    r = api.anon.post("/v1/vips", json=VIP, headers={"Authorization": "Bearer nope"})
    assert_problem(r, 401, "unauthorized")
    r = api.anon.delete("/v1/vips/tcp:198.18.0.10:80", headers={"Authorization": "Basic eDp5"})
    assert_problem(r, 401, "unauthorized")


def test_every_change_needs_the_token(api: Served) -> None:
    api.client.post("/v1/vips", json=VIP).raise_for_status()
    base = "/v1/vips/tcp:198.18.0.10:80"
    for method, path, body in [
        ("PATCH", base, {"lru_bypass": True}),
        ("DELETE", base, None),
        ("POST", base + "/backends", {"address": "198.18.1.2"}),
        ("PUT", base + "/backends", {"backends": []}),
        ("PATCH", base + "/backends/198.18.1.2", {"weight": 2}),
        ("DELETE", base + "/backends/198.18.1.2", None),
        ("PUT", "/v1/state", {"vips": []}),
    ]:
        r = api.anon.request(method, path, json=body)
        assert_problem(r, 401, "unauthorized")


def test_reads_are_open_on_loopback(api: Served) -> None:
    assert api.anon.get("/v1/vips").status_code == 200
    assert api.anon.get("/v1/state").status_code == 200
    assert api.anon.get("/metrics").status_code == 200


def test_a_wrong_token_on_a_read_is_401(api: Served) -> None:
    r = api.anon.get("/v1/vips", headers={"Authorization": "Bearer nope"})
    assert_problem(r, 401, "unauthorized")


def test_reads_need_token_when_not_open(serve: Callable[..., Served]) -> None:
    api = serve(open_reads=False)
    assert_problem(api.anon.get("/v1/vips"), 401, "unauthorized")
    assert_problem(api.anon.get("/metrics"), 401, "unauthorized")
    assert api.client.get("/v1/vips").status_code == 200
    assert api.anon.get("/healthz").status_code == 200  # probes stay open


def test_no_token_configured_refuses_changes(serve: Callable[..., Served]) -> None:
    api = serve(token=None)
    assert_problem(api.client.post("/v1/vips", json=VIP), 401, "unauthorized")
