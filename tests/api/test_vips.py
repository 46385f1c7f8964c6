"""VIP resource: every operation and its errors, against the real control plane and maps."""

from __future__ import annotations

import pytest

from tests.api.conftest import API_CONFIG, Served, assert_problem

pytestmark = pytest.mark.bpf

VIP = {"protocol": "tcp", "address": "198.18.0.10", "port": 80}


def test_create_vip_is_201_with_location(api: Served) -> None:
    r = api.client.post("/v1/vips", json=VIP)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/vips/tcp:198.18.0.10:80"
    body = r.json()
    assert body["id"] == "tcp:198.18.0.10:80"
    assert body["encap"] == "ipip" and body["effective_outer_source"] == "rss"
    assert [v.id for v in api.control.list_vips()] == ["tcp:198.18.0.10:80"]


def test_create_vip_writes_vip_map(api: Served) -> None:
    api.client.post("/v1/vips", json=VIP).raise_for_status()
    import ipaddress

    key = api.balancer.vip_key(ipaddress.ip_address("198.18.0.10"), 80, "tcp")
    assert api.balancer.vip_map[key].vip_num == api.control.vip_number("tcp:198.18.0.10:80")


def test_list_and_get_vips(api: Served) -> None:
    api.client.post("/v1/vips", json=VIP).raise_for_status()
    api.client.post(
        "/v1/vips", json={"protocol": "udp", "address": "2001:db8::10", "port": 53}
    ).raise_for_status()
    listed = api.client.get("/v1/vips").json()
    assert listed["count"] == 2
    assert [v["id"] for v in listed["data"]] == ["tcp:198.18.0.10:80", "udp:[2001:db8::10]:53"]
    # Brackets raw or percent-encoded, and any spelling of the address, name the same VIP.
    for path in (
        "/v1/vips/udp:[2001:db8::10]:53",
        "/v1/vips/udp:%5B2001:db8::10%5D:53",
        "/v1/vips/udp%3A%5B2001%3Adb8%3A%3A10%5D%3A53",
        "/v1/vips/udp:[2001:0db8:0::10]:53",
    ):
        r = api.client.get(path)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["id"] == "udp:[2001:db8::10]:53"


def test_update_vip_changes_flags_and_encap(api: Served) -> None:
    api.client.post("/v1/vips", json=VIP).raise_for_status()
    r = api.client.patch(
        "/v1/vips/tcp:198.18.0.10:80", json={"encap": "gue", "hash_src_only": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["encap"] == "gue" and body["hash_src_only"] is True
    assert body["effective_outer_source"] == "lb"
    assert body["lru_bypass"] is False  # left out: unchanged


def test_delete_vip_is_204_then_404(api: Served) -> None:
    api.client.post("/v1/vips", json=VIP).raise_for_status()
    r = api.client.delete("/v1/vips/tcp:198.18.0.10:80")
    assert r.status_code == 204 and r.content == b""
    assert_problem(api.client.get("/v1/vips/tcp:198.18.0.10:80"), 404, "not-found", "vip_id")


def test_create_vip_duplicate_is_409(api: Served) -> None:
    api.client.post("/v1/vips", json=VIP).raise_for_status()
    assert_problem(api.client.post("/v1/vips", json=VIP), 409, "conflict")


def test_get_unknown_vip_is_404(api: Served) -> None:
    assert_problem(api.client.get("/v1/vips/tcp:198.18.0.99:80"), 404, "not-found", "vip_id")


def test_delete_unknown_vip_is_404(api: Served) -> None:
    assert_problem(api.client.delete("/v1/vips/udp:198.18.0.99:53"), 404, "not-found")


@pytest.mark.parametrize(
    "vip_id",
    [
        "tcp:198.18.0.10",
        "sctp:198.18.0.10:80",
        "tcp:2001:db8::1:80",
        "tcp:198.18.0.300:80",
        "tcp:198.18.0.10:65536",
    ],
)
def test_malformed_vip_id_is_422(api: Served, vip_id: str) -> None:
    assert_problem(api.client.get(f"/v1/vips/{vip_id}"), 422, "invalid-input", "vip_id")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"address": "198.18.0.300"}, "address"),
        ({"address": "not-an-ip"}, "address"),
        ({"port": 65536}, "port"),
        ({"port": -1}, "port"),
        ({"protocol": "sctp"}, "protocol"),
        ({"encap": "vxlan"}, "encap"),
        ({"surprise": 1}, "surprise"),
    ],
    ids=["octet", "text", "port-high", "port-negative", "protocol", "encap", "extra-field"],
)
def test_create_vip_bad_field_is_422_naming_it(api: Served, change: dict, field: str) -> None:
    body = assert_problem(
        api.client.post("/v1/vips", json={**VIP, **change}), 422, "invalid-input", field
    )
    assert body["errors"][0]["field"] == field and body["rule"]


def test_create_vip_missing_field_is_422(api: Served) -> None:
    assert_problem(
        api.client.post("/v1/vips", json={"protocol": "tcp"}), 422, "invalid-input", "address"
    )


def test_ipv6_vip_with_ipv4_backend_is_422(api: Served) -> None:
    body = {
        "protocol": "tcp",
        "address": "2001:db8::10",
        "port": 80,
        "backends": [{"address": "198.18.1.2"}],
    }
    problem = assert_problem(api.client.post("/v1/vips", json=body), 422, "invalid-input")
    assert "backends" in problem["field"] and "IPv4" in problem["detail"]


def test_unspecified_vip_address_is_422(api: Served) -> None:
    assert_problem(
        api.client.post("/v1/vips", json={**VIP, "address": "0.0.0.0"}),
        422,
        "invalid-input",
        "address",
    )


def test_vip_limit_reached_is_409_naming_the_limit(api: Served) -> None:
    for i in range(API_CONFIG.max_vips):
        api.client.post("/v1/vips", json={**VIP, "port": 1000 + i}).raise_for_status()
    body = assert_problem(
        api.client.post("/v1/vips", json={**VIP, "port": 2000}), 409, "limit-reached"
    )
    assert "max_vips" in body["detail"]


def test_bad_json_is_400(api: Served) -> None:
    r = api.client.post(
        "/v1/vips", content=b'{"protocol": "tcp",', headers={"content-type": "application/json"}
    )
    assert_problem(r, 400, "malformed-request")


def test_wrong_content_type_is_415(api: Served) -> None:
    r = api.client.post(
        "/v1/vips",
        content=b"protocol=tcp",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_problem(r, 415, "unsupported-media-type", "content-type")


def test_unknown_path_is_problem_404(api: Served) -> None:
    assert_problem(api.client.get("/v1/nothing"), 404, "not-found")


def test_wrong_method_is_problem_405(api: Served) -> None:
    assert_problem(api.client.put("/v1/vips", json={}), 405, "method-not-allowed")


def test_update_vip_outer_source_null_goes_back_to_default(api: Served) -> None:
    api.client.post("/v1/vips", json={**VIP, "outer_source": "lb"}).raise_for_status()
    r = api.client.patch("/v1/vips/tcp:198.18.0.10:80", json={"outer_source": None})
    assert r.status_code == 200, r.text
    assert r.json()["outer_source"] is None and r.json()["effective_outer_source"] == "rss"
