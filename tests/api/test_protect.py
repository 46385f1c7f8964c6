"""Per-VIP source ranges through the REST API, the declarative state and lbctl, down to the
src_v4 / src_v6 tries and the VIP's flags; and the errors that name the field."""

from __future__ import annotations

import ipaddress
import json

import pytest

from lb.consts import F_SRC_ALLOW, F_SRC_RANGES, SRC_ALLOW, SRC_DENY
from lb.dataplane import protect
from tests.api.conftest import Served, assert_problem
from tests.api.test_cli import lbctl, ok

pytestmark = pytest.mark.bpf

VIP = {"protocol": "tcp", "address": "198.18.0.10", "port": 80}
VID = "tcp:198.18.0.10:80"


def _ranges(api: Served) -> dict[str, int]:
    """The tries' entries of this VIP as 'prefix' -> verdict."""
    num = api.control.vip_number(VID)
    out = {}
    for (family, n, raw, plen), v in protect.read_src_ranges(api.balancer).items():
        if n == num:
            addr = ipaddress.ip_address(raw[:4] if family == 4 else raw)
            out[f"{addr}/{plen}"] = v
    return out


def _flags(api: Served) -> int:
    key = api.balancer.vip_key(ipaddress.ip_address("198.18.0.10"), 80, "tcp")
    return int(api.balancer.vip_map[key].flags)


def test_create_vip_with_ranges_writes_the_tries(api: Served) -> None:
    r = api.client.post("/v1/vips", json={**VIP, "allow": ["198.18.0.0/16"],
                                          "deny": ["198.18.2.0/24", "198.18.3.4"]})
    assert r.status_code == 201, r.text
    assert r.json()["allow"] == ["198.18.0.0/16"]
    assert r.json()["deny"] == ["198.18.2.0/24", "198.18.3.4/32"]
    assert _ranges(api) == {"198.18.0.0/16": SRC_ALLOW, "198.18.2.0/24": SRC_DENY,
                            "198.18.3.4/32": SRC_DENY}
    assert _flags(api) & (F_SRC_RANGES | F_SRC_ALLOW) == F_SRC_RANGES | F_SRC_ALLOW
    assert api.control.verify() == [] or all(d.map != "src_ranges" for d in api.control.verify())


def test_a_vip_without_ranges_has_no_range_flag(api: Served) -> None:
    api.client.post("/v1/vips", json=VIP).raise_for_status()
    assert _flags(api) & (F_SRC_RANGES | F_SRC_ALLOW) == 0
    assert _ranges(api) == {}


def test_patch_replaces_and_null_empties_the_lists(api: Served) -> None:
    api.client.post("/v1/vips", json={**VIP, "allow": ["198.18.0.0/16"]}).raise_for_status()
    r = api.client.patch(f"/v1/vips/{VID}", json={"allow": ["198.18.7.0/24"],
                                                  "deny": ["198.18.7.7/32"]})
    assert r.status_code == 200, r.text
    assert _ranges(api) == {"198.18.7.0/24": SRC_ALLOW, "198.18.7.7/32": SRC_DENY}
    r = api.client.patch(f"/v1/vips/{VID}", json={"allow": None, "deny": []})
    assert r.status_code == 200, r.text
    assert r.json()["allow"] == [] and r.json()["deny"] == []
    assert _ranges(api) == {}
    assert _flags(api) & F_SRC_RANGES == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        # Refused by the schema (pydantic's location), then by the model's rules.
        ({"allow": ["198.18.0.1/24"]}, "allow.0"),  # host bits set
        ({"allow": ["198.18.0.0/33"]}, "allow.0"),
        ({"deny": ["not-a-prefix"]}, "deny.0"),
        ({"allow": ["2001:db8::/32"]}, "allow[0]"),  # IPv6 prefix on an IPv4 VIP
        ({"allow": ["198.18.0.0/16"], "deny": ["198.18.0.0/16"]}, "deny[0]"),  # listed twice
        ({"deny": ["198.18.1.0/24", "198.18.1.0/24"]}, "deny[1]"),
    ],
    ids=["host bits", "length over 32", "not a prefix", "family mismatch", "in both lists",
         "twice in one list"],
)
def test_invalid_ranges_are_422_naming_the_field(api: Served, body: dict[str, object],
                                                 field: str) -> None:
    r = api.client.post("/v1/vips", json={**VIP, **body})
    assert_problem(r, 422, "invalid-input", field)


def test_patch_with_a_family_mismatch_is_422_and_changes_nothing(api: Served) -> None:
    api.client.post("/v1/vips", json={**VIP, "deny": ["198.18.9.0/24"]}).raise_for_status()
    r = api.client.patch(f"/v1/vips/{VID}", json={"deny": ["2001:db8::/48"]})
    assert_problem(r, 422, "invalid-input", "deny[0]")
    assert _ranges(api) == {"198.18.9.0/24": SRC_DENY}


def test_state_dry_run_shows_a_range_change_and_writes_nothing(api: Served) -> None:
    api.client.post("/v1/vips", json=VIP).raise_for_status()
    state = {"vips": [{**VIP, "deny": ["198.18.5.0/24"]}]}
    r = api.client.put("/v1/state", params={"dry_run": "true"}, json=state)
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["dry_run"] is True
    assert [v["ranges_changed"] for v in plan["changed_vips"]] == [True]
    assert _ranges(api) == {}
    api.client.put("/v1/state", json=state).raise_for_status()
    assert _ranges(api) == {"198.18.5.0/24": SRC_DENY}
    got = api.client.get("/v1/state").json()
    assert got["vips"][0]["deny"] == ["198.18.5.0/24"]


def test_lbctl_vip_set_allow_and_deny(api: Served) -> None:
    ok(lbctl(api, "vip", "add", "tcp", "198.18.0.10:80", "--deny", "198.18.66.0/24"))
    out = ok(lbctl(api, "vip", "set", VID, "--allow", "198.18.0.0/16,198.18.99.0/24",
                   "--deny", "198.18.2.0/24"))
    assert "allow: 198.18.0.0/16 198.18.99.0/24" in out and "deny: 198.18.2.0/24" in out
    assert _ranges(api) == {"198.18.0.0/16": SRC_ALLOW, "198.18.99.0/24": SRC_ALLOW,
                            "198.18.2.0/24": SRC_DENY}
    table = ok(lbctl(api, "vip", "list"))
    assert "allow:2" in table and "deny:1" in table
    ok(lbctl(api, "vip", "set", VID, "--no-allow"))
    got = json.loads(ok(lbctl(api, "-o", "json", "vip", "get", VID)))
    assert got["allow"] == [] and got["deny"] == ["198.18.2.0/24"]
    p = lbctl(api, "vip", "set", VID, "--deny", "2001:db8::/32")
    assert p.returncode == 1 and "deny[0]" in p.stderr
