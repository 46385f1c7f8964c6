"""Per-VIP source ranges through the REST API, the declarative state and lbctl, down to the
src_v4 / src_v6 tries and the VIP's flags; and the errors that name the field."""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lb.config import ProtectConfig
from lb.consts import F_SRC_ALLOW, F_SRC_RANGES, GUARD_WINDOW_SHIFT, SRC_ALLOW, SRC_DENY
from lb.dataplane import protect
from lb.dataplane.flowhash import Flow5
from lb.dataplane.testrun import TestRunner
from lb.ops.explain import build_packet
from tests.api.conftest import RUNTIME, Served, assert_problem
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


# --- Operator visibility: the guard's mode and state and the protections' counters in
# /v1/stats, /metrics and `lbctl stats`.

BACKENDS = ["198.18.1.2", "198.18.1.3"]


@pytest.fixture
def guarded(api: Served) -> Iterator[tuple[Served, int]]:
    """A TCP VIP denying 198.18.3.0/24, the test pinned to one CPU (the guard's windows are
    per CPU); the guard's configuration and state restored after."""
    body = {**VIP, "deny": ["198.18.3.0/24"], "backends": [{"address": a} for a in BACKENDS]}
    api.client.post("/v1/vips", json=body).raise_for_status()
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield api, cpu
    finally:
        os.sched_setaffinity(0, before)
        protect.clear_guard_config(api.balancer)
        protect.write_guard_config(api.balancer, RUNTIME.protect)


def _syn(api: Served, src: str, sport: int) -> None:
    pkt = bytearray(build_packet(Flow5.of(src, "198.18.0.10", sport, 80, "tcp")))
    pkt[14 + 20 + 13] = 0x02  # flags: SYN
    TestRunner(api.balancer.prog_fd).run(bytes(pkt))


def _prot(api: Served) -> dict[str, Any]:
    s = api.client.get("/v1/stats").json()
    return {"p": s["protection"], "vip": next(v for v in s["vips"] if v["vip_id"] == VID)}


def test_flood_mode_and_counters_show_in_stats_metrics_and_lbctl(
    guarded: tuple[Served, int],
) -> None:
    api, _ = guarded
    old = {k: c["value"] for k, c in _prot(api)["p"]["counters"].items()}
    protect.write_guard_config(api.balancer, ProtectConfig(syn_guard="always"))
    for i in range(3):
        _syn(api, "198.18.2.1", 42000 + i)
    for i in range(2):
        _syn(api, "198.18.3.1", 42000 + i)  # denied by the VIP's source ranges
    got = _prot(api)
    p = got["p"]
    assert (p["syn_guard"], p["flood"]) == ("always", True)
    assert p["window_ms"] == pytest.approx((1 << GUARD_WINDOW_SHIFT) / 1e6, abs=0.001)
    delta = {k: c["value"] - old[k] for k, c in p["counters"].items()}
    assert delta == {"flood_windows": 0, "syn_stateless": 3, "no_evict": 0,
                     "echo_limited": 0, "too_big_limited": 0, "src_denied": 2}, delta
    assert got["vip"]["counters"]["src_denied"]["value"] == 2
    text = api.anon.get("/metrics").text
    for line in (
        'xlb_syn_guard_mode{mode="always"} 1.0',
        'xlb_syn_guard_mode{mode="auto"} 0.0',
        "xlb_syn_guard_flood 1.0",
        f"xlb_syn_guard_stateless_syns_total {float(old['syn_stateless'] + 3)}",
        f"xlb_src_denied_total {float(old['src_denied'] + 2)}",
        f'xlb_vip_src_denied_total{{vip="{VID}"}} 2.0',
        'xlb_reply_rate_limited_total{reply="echo"}',
        'xlb_reply_rate_limited_total{reply="too_big"}',
        "xlb_syn_guard_no_evict_total",
        "xlb_syn_guard_flood_windows_total",
    ):
        assert line in text, line
    out = ok(lbctl(api, "stats"))
    assert "SYN guard always: FLOOD MODE" in out, out
    assert f"stateless SYNs {old['syn_stateless'] + 3}" in out, out
    assert "SRC-DENIED" in out


def test_auto_mode_shows_normal_then_the_cpu_in_flood_mode(guarded: tuple[Served, int]) -> None:
    api, cpu = guarded
    p = _prot(api)["p"]
    assert (p["syn_guard"], p["flood"], p["flood_cpus"]) == ("auto", False, [])
    assert p["syn_per_window"] == RUNTIME.protect.syn_per_window
    assert "SYN guard auto: normal" in ok(lbctl(api, "stats"))
    assert "xlb_syn_guard_flood 0.0" in api.anon.get("/metrics").text
    rate = 2 * 1_000_000_000 // (1 << GUARD_WINDOW_SHIFT) + 1  # 2 SYNs per window
    protect.write_guard_config(api.balancer, ProtectConfig(syn_guard="auto",
                                                           syn_flood_rate=rate))
    old = p["counters"]
    w = protect.guard_window_now()  # start right after a window boundary
    while protect.guard_window_now() == w:
        time.sleep(0.002)
    for i in range(4):
        _syn(api, "198.18.2.1", 43000 + i)
    p = _prot(api)["p"]
    assert (p["syn_guard"], p["flood"], p["flood_cpus"], p["syn_per_window"]) == (
        "auto", True, [cpu], 2)
    c = p["counters"]
    assert c["flood_windows"]["value"] - old["flood_windows"]["value"] == 1
    assert c["syn_stateless"]["value"] - old["syn_stateless"]["value"] == 2
    assert f"SYN guard auto: FLOOD MODE on CPU {cpu}" in ok(lbctl(api, "stats"))
