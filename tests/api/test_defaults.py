"""Documented defaults and limits as a live API answers them (issue 14, item 23)."""

from __future__ import annotations

import pytest

from tests.api.conftest import API_CONFIG, Served, assert_problem

pytestmark = pytest.mark.bpf

VIP = {"protocol": "tcp", "address": "198.18.0.10", "port": 80}
VID = "/v1/vips/tcp:198.18.0.10:80"


def test_null_vip_flags_go_back_to_their_defaults_as_documented(api: Served) -> None:
    api.client.post("/v1/vips", json={**VIP, "hash_src_only": True, "lru_bypass": True,
                                      "encap": "gue", "outer_source": "rss"}).raise_for_status()
    r = api.client.patch(VID, json={"hash_src_only": None, "lru_bypass": None, "encap": None,
                                    "outer_source": None})
    assert r.status_code == 200, r.text
    v = r.json()
    assert (v["hash_src_only"], v["lru_bypass"], v["encap"], v["outer_source"]) == (
        False, False, "ipip", None)
    schema = api.client.get("/openapi.json").json()["components"]["schemas"]["VipUpdate"]
    assert "null" in schema["properties"]["hash_src_only"]["description"]


def test_null_backend_fields_leave_them_unchanged_as_documented(api: Served) -> None:
    api.client.post("/v1/vips", json={**VIP, "backends": [{"address": "198.18.1.2",
                                                           "weight": 3}]}).raise_for_status()
    r = api.client.patch(f"{VID}/backends/198.18.1.2", json={"weight": None, "state": None})
    assert r.status_code == 200, r.text
    assert (r.json()["weight"], r.json()["state"]) == (3, "active")


def test_too_many_backends_at_weight_zero_is_409_naming_the_field(api: Served) -> None:
    n = API_CONFIG.max_reals  # one more than the usable slots
    backends = [{"address": f"198.18.{1 + i // 250}.{1 + i % 250}", "weight": 0}
                for i in range(n)]
    r = api.client.post("/v1/vips", json={**VIP, "backends": backends})
    body = assert_problem(r, 409, "limit-reached", "backends")
    assert "max_reals" in body["detail"]
