"""Addresses and ids a live API refuses (issue 14, items 16-19), over real HTTP to uvicorn.

An IPv6 zone id names the same data-plane key as the address without it, non-ASCII digits
alias real ports, and some ranges can never work: each is refused with 422 naming the field,
never aliased, never a 500.
"""

from __future__ import annotations

import pytest

from tests.api.conftest import Served, assert_problem

pytestmark = pytest.mark.bpf

V6 = {"protocol": "tcp", "address": "2001:db8::10", "port": 80}
V4 = {"protocol": "tcp", "address": "198.18.0.10", "port": 80}


def test_a_zone_id_vip_next_to_the_real_one_is_422_and_aliases_nothing(api: Served) -> None:
    api.client.post("/v1/vips", json={**V6, "backends": [{"address": "2001:db8:11::8"}]}
                    ).raise_for_status()
    r = api.client.post("/v1/vips", json={**V6, "address": "2001:db8::10%x",
                                           "backends": [{"address": "2001:db8:11::9"}]})
    body = assert_problem(r, 422, "invalid-input", "address")
    assert "zone id" in body["detail"]
    assert [v.id for v in api.control.list_vips()] == ["tcp:[2001:db8::10]:80"]
    # Neither the raw nor the percent-encoded id reaches (or deletes) the real VIP.
    for path in ("/v1/vips/tcp:[2001:db8::10%25x]:80", "/v1/vips/tcp:%5B2001:db8::10%25x%5D:80"):
        assert_problem(api.client.delete(path), 422, "invalid-input", "vip_id")
    assert api.client.get("/v1/vips/tcp:[2001:db8::10]:80").status_code == 200


def test_a_zone_id_backend_is_422_everywhere(api: Served) -> None:
    api.client.post("/v1/vips", json={**V6, "backends": [{"address": "2001:db8:11::8"}]}
                    ).raise_for_status()
    other = {**V6, "port": 81}
    r = api.client.post("/v1/vips", json={**other,
                                           "backends": [{"address": "2001:db8:11::8%zz"}]})
    assert_problem(r, 422, "invalid-input", "backends.0.address")
    api.client.post("/v1/vips", json=other).raise_for_status()
    vid = "/v1/vips/tcp:[2001:db8::10]:81/backends"
    assert_problem(api.client.post(vid, json={"address": "2001:db8:11::8%zz"}),
                   422, "invalid-input", "address")
    assert_problem(api.client.put(vid, json={"backends": [{"address": "2001:db8:11::8%zz"}]}),
                   422, "invalid-input", "backends.0.address")
    assert_problem(api.client.delete("/v1/vips/tcp:[2001:db8::10]:80/backends/2001:db8:11::8%25zz"),
                   422, "invalid-input", "address")
    state = {"vips": [{**V6, "backends": [{"address": "2001:db8:11::8%zz"}]}]}
    assert_problem(api.client.put("/v1/state", json=state), 422, "invalid-input",
                   "vips.0.backends.0.address")


def test_explain_refuses_a_zone_id(api: Served) -> None:
    q = {"protocol": "tcp", "src": "2001:db8:2::1", "sport": 1000, "dst": "2001:db8::10%x",
         "dport": 80}
    body = assert_problem(api.client.get("/v1/explain", params=q), 422, "invalid-input", "dst")
    assert "zone id" in body["detail"]


@pytest.mark.parametrize(
    "vid",
    ["tcp:198.18.0.10:\u00b2", "tcp:198.18.0.10:\u0668\u0660", "tcp:198.18.0.10:\uff18\uff10"],
    ids=["superscript-two", "arabic-indic-80", "fullwidth-80"],
)
def test_non_ascii_digits_in_a_vip_id_are_422_and_never_alias(api: Served, vid: str) -> None:
    api.client.post("/v1/vips", json=V4).raise_for_status()
    for method in ("GET", "DELETE"):
        assert_problem(api.client.request(method, f"/v1/vips/{vid}"), 422, "invalid-input",
                       "vip_id")
    assert [v.id for v in api.control.list_vips()] == ["tcp:198.18.0.10:80"]


def test_non_ascii_digits_in_addresses_are_422(api: Served) -> None:
    r = api.client.post("/v1/vips", json={**V4, "address": "198.18.0.1\u0660"})
    assert_problem(r, 422, "invalid-input", "address")
    q = {"protocol": "tcp", "src": "198.18.2.1", "sport": "\u0668\u0660", "dst": "198.18.0.10",
         "dport": 80}
    assert_problem(api.client.get("/v1/explain", params=q), 422, "invalid-input", "sport")


@pytest.mark.parametrize(
    ("address", "reason"),
    [("127.0.0.1", "loopback"), ("::1", "loopback"), ("169.254.0.9", "link-local"),
     ("fe80::9", "link-local"), ("0.1.2.3", "0.0.0.0/8"), ("240.0.0.1", "240.0.0.0/4"),
     ("::ffff:198.18.0.10", "IPv4-mapped"), ("224.1.1.1", "multicast")],
)
def test_unusable_vip_and_backend_addresses_are_422_with_the_reason(
    api: Served, address: str, reason: str
) -> None:
    r = api.client.post("/v1/vips", json={**V4, "address": address})
    assert reason in assert_problem(r, 422, "invalid-input", "address")["detail"]
    vip = V6 if ":" in address else V4
    api.client.post("/v1/vips", json=vip).raise_for_status()
    vid = "tcp:[2001:db8::10]:80" if ":" in address else "tcp:198.18.0.10:80"
    r = api.client.post(f"/v1/vips/{vid}/backends", json={"address": address})
    assert reason in assert_problem(r, 422, "invalid-input", "backend.address")["detail"]


@pytest.mark.parametrize(
    "args",
    [
        ("vip", "rm", "tcp:198.18.0.10:\u0668\u0660"),
        ("vip", "get", "tcp:198.18.0.10:\u00b2"),
        ("vip", "add", "tcp", "198.18.0.10:\u0668\u0661"),
        ("vip", "add", "tcp", "[2001:db8::10%x]:80"),
        ("backend", "add", "tcp:198.18.0.10:80", "2001:db8:11::8%zz"),
        ("backend", "rm", "tcp:198.18.0.10:80", "198.18.1.\u0662"),
        ("explain", "tcp", "198.18.2.1:\u0664\u0660", "198.18.0.10:80"),
    ],
    ids=["rm-arabic-indic", "get-superscript", "add-arabic-indic", "add-zone", "backend-zone",
         "backend-rm-arabic-indic", "explain-arabic-indic"],
)
def test_lbctl_parses_ids_and_addresses_as_ascii_without_zone_ids(
    api: Served, args: tuple[str, ...]
) -> None:
    from tests.api.test_cli import lbctl

    api.client.post("/v1/vips", json=V4).raise_for_status()
    p = lbctl(api, *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert [v.id for v in api.control.list_vips()] == ["tcp:198.18.0.10:80"]


def test_an_if_match_with_non_ascii_digits_is_412_not_500(api: Served) -> None:
    # Header bytes are latin-1: b"\xb2" is "²", which str.isdigit() takes.
    for tag in ('"\u00b2"'.encode("latin-1"), '"\u0661"'.encode()):
        r = api.client.put("/v1/state", json={"vips": []}, headers={"If-Match": tag})
        assert_problem(r, 412, "precondition-failed", "If-Match")
