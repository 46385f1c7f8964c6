"""Second chance's switch and window through the REST API, the dry-run plan and lbctl
(docs/second-chance.md): on by default for GUE, refused for IPIP, the window opened by a
ring change shown by GET and `lbctl vip get`; explain showing both hops of a flow and the
LB's counters of a packet that carried one (the live program, BPF_PROG_TEST_RUN)."""

from __future__ import annotations

import json

import pytest

from lb.dataplane.conntab import ConnTable
from lb.dataplane.flowhash import Flow5
from lb.dataplane.testrun import TestRunner
from lb.ops.explain import build_packet
from tests.api.conftest import Served, assert_problem
from tests.api.test_cli import lbctl, ok

pytestmark = pytest.mark.bpf

VIP = {"protocol": "tcp", "address": "198.18.0.10", "port": 80}
VID = "tcp:198.18.0.10:80"


def _backends(*last: int) -> list[dict[str, object]]:
    return [{"address": f"198.18.1.{i}"} for i in last]


def test_ipip_with_second_chance_is_422_and_gue_has_it_by_default(api: Served) -> None:
    r = api.client.post("/v1/vips", json={**VIP, "encap": "ipip", "second_chance": True})
    body = assert_problem(r, 422, "invalid-input", "second_chance")
    assert "GUE" in body["detail"]
    r = api.client.post("/v1/vips", json={**VIP, "encap": "gue", "backends": _backends(1, 2)})
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["second_chance"], v["second_chance_on"]) == (None, True)
    assert v["second_chance_window_s"] == 300 and v["second_window"] is None
    # Back to IPIP while switched on explicitly: refused too; with the default, allowed (off).
    api.client.patch(f"/v1/vips/{VID}", json={"second_chance": True}).raise_for_status()
    r = api.client.patch(f"/v1/vips/{VID}", json={"encap": "ipip"})
    assert_problem(r, 422, "invalid-input", "second_chance")
    r = api.client.patch(f"/v1/vips/{VID}", json={"encap": "ipip", "second_chance": None})
    assert r.status_code == 200, r.text
    assert r.json()["second_chance_on"] is False
    r = api.client.patch(f"/v1/vips/{VID}", json={"second_chance_window_s": -1})
    assert r.status_code == 422, r.text


def test_a_ring_change_opens_the_window_get_shows_it_and_switching_off_closes_it(
    api: Served,
) -> None:
    api.client.post("/v1/vips", json={**VIP, "encap": "gue", "second_chance_window_s": 60,
                                      "backends": _backends(1, 2)}).raise_for_status()
    api.client.post(f"/v1/vips/{VID}/backends", json={"address": "198.18.1.3"}).raise_for_status()
    w = api.client.get(f"/v1/vips/{VID}").json()["second_window"]
    assert w is not None and [a for a, _ in w["backends"]] == ["198.18.1.1", "198.18.1.2"]
    assert w["until"] - w["opened"] == pytest.approx(60)
    r = api.client.patch(f"/v1/vips/{VID}", json={"second_chance": False})
    assert r.status_code == 200, r.text
    assert (r.json()["second_chance_on"], r.json()["second_window"]) == (False, None)


def test_dry_run_counts_the_slots_that_get_a_second_hop(api: Served) -> None:
    def state(n: int, **flags: object) -> dict[str, object]:
        return {"vips": [{**VIP, "encap": "gue", **flags, "backends": _backends(*range(1, n + 1))}]}

    api.client.put("/v1/state", json=state(2)).raise_for_status()
    plan = api.client.put("/v1/state", params={"dry_run": "true"}, json=state(3)).json()
    (vip,) = plan["changed_vips"]
    assert vip["second_hop_slots"] > 0
    # The slots that move are the ones with a second hop (about a third of the ring).
    assert 0.2 < vip["moved_fraction"] < 0.45
    plan = api.client.put("/v1/state", params={"dry_run": "true"},
                          json=state(3, second_chance=False)).json()
    assert plan["changed_vips"][0]["second_hop_slots"] == 0


def test_lbctl_switch_and_window(api: Served) -> None:
    ok(lbctl(api, "vip", "add", "tcp", "198.18.0.10:80", "--encap", "gue",
             "--second-chance-window", "60"))
    assert "second chance: on, window 60 s; no window open" in ok(lbctl(api, "vip", "get", VID))
    ok(lbctl(api, "backend", "add", VID, "198.18.1.2"))
    ok(lbctl(api, "backend", "add", VID, "198.18.1.3"))
    out = ok(lbctl(api, "vip", "get", VID))
    assert "second chance: on, window 60 s; open until " in out
    assert "previous ring: 198.18.1.2" in out
    got = json.loads(ok(lbctl(api, "-o", "json", "vip", "get", VID)))
    assert got["second_window"]["backends"] == [["198.18.1.2", 1]]
    ok(lbctl(api, "vip", "set", VID, "--no-second-chance"))
    assert "second chance: off (switched off)" in ok(lbctl(api, "vip", "get", VID))
    p = lbctl(api, "vip", "add", "udp", "198.18.0.11:53", "--second-chance")
    assert p.returncode == 1 and "[422 invalid-input]" in p.stderr and "GUE" in p.stderr
    ok(lbctl(api, "vip", "add", "udp", "198.18.0.11:53"))
    assert "second chance: off (IPIP VIP)" in ok(lbctl(api, "vip", "get", "udp:198.18.0.11:53"))


def _explain(api: Served, sport: int) -> dict[str, object]:
    r = api.client.get("/v1/explain", params={"protocol": "tcp", "src": "198.18.2.1",
                                              "sport": sport, "dst": "198.18.0.10", "dport": 80})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _second_hops(api: Served) -> int:
    return int(api.client.get("/v1/stats").json()["global"]["STAT_SECOND_HOP"]["value"])


def test_explain_shows_both_hops_and_stats_count_the_packets_that_carry_them(
    api: Served,
) -> None:
    api.client.post("/v1/vips", json={**VIP, "encap": "gue",
                                      "backends": _backends(1, 2)}).raise_for_status()
    api.client.post(f"/v1/vips/{VID}/backends", json={"address": "198.18.1.3"}).raise_for_status()
    with ConnTable(api.balancer) as table:
        table.clear()
    moved = plain = None
    for sport in range(40000, 40400):
        e = _explain(api, sport)
        assert e["reason"] == "ring" and e["encap"] == "gue", e
        if e["second_hop"] and moved is None:
            moved = sport, e
        if not e["second_hop"] and plain is None:
            plain = sport, e
        if moved and plain:
            break
    assert moved is not None, "no flow of 400 hashes to a slot with a second hop"
    assert plain is not None, "every flow has a second hop: unchanged slots must carry none"
    sport, e = moved
    old = {"198.18.1.1", "198.18.1.2"}
    assert e["second_hop"] in old and e["second_hop"] != e["backend"], e
    out = ok(lbctl(api, "explain", "tcp", f"198.18.2.1:{sport}", "198.18.0.10:80"))
    assert f"backend   {e['backend']}" in out and f"then      {e['second_hop']}" in out, out
    out = ok(lbctl(api, "explain", "tcp", f"198.18.2.1:{plain[0]}", "198.18.0.10:80"))
    assert "then " not in out, out
    # A real packet of that flow (not explain's private run) moves the LB's counter, which
    # /v1/stats, /metrics and `lbctl stats` show.
    before = _second_hops(api)
    TestRunner(api.balancer.prog_fd).run(
        build_packet(Flow5.of("198.18.2.1", "198.18.0.10", sport, 80, "tcp")))
    assert _second_hops(api) == before + 1, "the packet carrying a hop was not counted"
    metrics = api.client.get("/metrics").text
    assert f'xlb_datapath_total{{counter="STAT_SECOND_HOP"}} {before + 1}.0' in metrics
    assert "STAT_SECOND_HOP" in ok(lbctl(api, "stats"))
