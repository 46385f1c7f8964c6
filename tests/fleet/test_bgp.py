"""The BGP speaker (lb/fleet/bgp.py) against a real BIRD router in a namespace."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lb.config import BgpConfig, EtcdConfig
from lb.dataplane import netns
from lb.errors import InvalidInput
from lb.fleet.announce import Announcer
from lb.fleet.bgp import Speaker, parse_protocols, render_config
from lb.fleet.members import EtcdCluster
from lb.fleet.node import FleetNode
from lb.lab.router import ROUTER_ASN, kernel_nexthops
from lb.settings import load_settings
from tests.api.conftest import running_api
from tests.api.test_cli import lbctl, ok
from tests.fleet.conftest import H4, H6, R4, Pair

V4 = ipaddress.ip_address("198.18.0.10")
V6 = ipaddress.ip_address("2001:db8::10")


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
    """Poll until `cond()`; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture
def speaker(bgp_pair: Pair, bgp_dir: Path) -> Iterator[Speaker]:
    """A speaker for the host namespace, stopped by its pid file afterwards."""
    sp = Speaker(BgpConfig(**bgp_pair.bgp_settings()), bgp_dir / "bgp")
    try:
        yield sp
    finally:
        sp.stop()
        assert sp.pid() is None


def _start(pair: Pair, sp: Speaker, routes: set[ipaddress.IPv4Address | ipaddress.IPv6Address]
           ) -> int:
    # The speaker runs in the namespace of whoever starts it (the daemon's, in production).
    return netns.call_in(pair.host_ns, sp.start, routes)


@pytest.mark.netns
def test_announce_reaches_router_and_withdraw_removes_it(bgp_pair: Pair, speaker: Speaker
                                                         ) -> None:
    _start(bgp_pair, speaker, {V4, V6})
    wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [H4], what="v4 route")
    wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "2001:db8::10") == [H6],
             what="v6 route")
    st = speaker.state()
    assert st.running and sorted(st.routes) == sorted([str(V4), str(V6)])
    assert speaker.config_file.stat().st_mode & 0o077 == 0, "the config (passwords) is readable"
    assert all(p.up for p in st.peers) and len(st.peers) == 2, st
    assert sum(p.routes_exported for p in st.peers) == 2
    speaker.announce({V6})
    took = wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [],
                    what="v4 withdrawn")
    assert took < 2, "withdraw took longer than 2 s"
    assert kernel_nexthops(bgp_pair.router_ns, "2001:db8::10") == [H6], "v6 lost"
    # The sessions were not reset by the reconfiguration.
    assert all(p.up for p in speaker.state().peers)


@pytest.mark.netns
def test_restarted_owner_adopts_speaker_without_withdrawing(bgp_pair: Pair, speaker: Speaker
                                                            ) -> None:
    pid = _start(bgp_pair, speaker, {V4})
    wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [H4], what="route")
    again = Speaker(speaker.cfg, speaker.work_dir)
    assert netns.call_in(bgp_pair.host_ns, again.start, {V4}) == pid, "a second BIRD started"
    assert kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [H4]


@pytest.mark.netns
def test_killed_speaker_is_dropped_and_a_stale_pid_is_not_adopted(bgp_pair: Pair,
                                                                  speaker: Speaker) -> None:
    pid = _start(bgp_pair, speaker, {V4})
    wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [H4], what="route")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not netns.pid_alive(pid), what="speaker gone")
    wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [], timeout=5,
             what="router dropped the killed speaker")
    assert speaker.pid() is None and not speaker.state().running
    # A pid file naming another process is not ours.
    speaker.pid_file.write_text(f"{os.getpid()}\n")
    assert speaker.pid() is None


@pytest.mark.netns
def test_md5_password_and_communities_reach_router(bgp_pair: Pair, bgp_dir: Path) -> None:
    peers = [{"address": R4, "asn": ROUTER_ASN, "password": "lab-secret"}]
    cfg = BgpConfig(**bgp_pair.bgp_settings(communities=["65001:100", "65001:7:9"],
                                            peers=peers))
    dataclasses.replace(bgp_pair.router, password="lab-secret").reconfigure()
    sp = Speaker(cfg, bgp_dir / "bgp2")
    try:
        _start(bgp_pair, sp, {V4})
        wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [H4],
                 what="route")
        out = bgp_pair.router.cli("show", "route", "198.18.0.10/32", "all")
        assert "(65001,100)" in out and "(65001, 7, 9)" in out, out
    finally:
        sp.stop()


def test_config_renders_peers_timers_and_routes() -> None:
    cfg = BgpConfig(enabled=True, asn=65001, hold_time=6, peers=[
        {"address": "198.18.2.1", "asn": 65000, "password": "s3cret"}])
    text = render_config(cfg, {V4, V6}, log_file=Path("/tmp/x.log"))
    assert "neighbor 198.18.2.1 port 179 as 65000;" in text
    assert "hold time 6;" in text and "keepalive time 2;" in text
    assert 'password "s3cret";' in text
    assert "route 198.18.0.10/32 blackhole;" in text and "route 2001:db8::10/128 blackhole;" in text


def test_parse_protocols_reads_state_and_exports() -> None:
    cfg = BgpConfig(enabled=True, asn=65001, peers=[{"address": "198.18.2.1", "asn": 65000}])
    text = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     1764769800
peer_198_18_2_1 BGP        ---        up     1764769801    Established
  BGP state:          Established
    Neighbor address: 198.18.2.1
  Channel ipv4
    Routes:         0 imported, 3 exported, 0 preferred
"""
    (p,) = parse_protocols(text, cfg.peers)
    assert p.up and p.routes_exported == 3 and p.since == 1764769801


@pytest.mark.parametrize(("env", "field"), [
    ({"XLB_BGP__ENABLED": "true", "XLB_BGP__PEERS": '[{"address": "198.18.2.1", "asn": 1}]'},
     "bgp"),
    ({"XLB_BGP__HOLD_TIME": "2"}, "bgp.hold_time"),
    ({"XLB_BGP__COMMUNITIES": '["65536:1"]'}, "bgp.communities"),
    ({"XLB_BGP__PEERS": '[{"address": "198.18.2.1", "asn": 0}]'}, "bgp.peers.0.asn"),
    ({"XLB_BGP__PEERS": '[{"address": "nope", "asn": 1}]'}, "bgp.peers.0.address"),
    ({"XLB_BGP__PEERS": '[{"address": "198.18.2.1", "asn": 1, "password": "a\\"b"}]'},
     "bgp.peers.0.password"),
], ids=["enabled-without-asn", "hold-time-below-3", "community-part-too-big", "asn-zero",
        "peer-not-an-address", "password-with-quote"])
def test_bad_bgp_settings_name_the_field(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                         field: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InvalidInput) as e:
        load_settings()
    assert e.value.field == field, e.value.detail
    assert "env XLB_BGP" in e.value.detail


@pytest.mark.netns
def test_fleet_status_shows_each_hosts_bgp_state(bgp_pair: Pair, bgp_dir: Path,
                                                 etcd: EtcdCluster, tmp_path: Path) -> None:
    # The daemon's wiring (api/xlb_api/main.py): the fleet node publishes the announcer's
    # summary, so GET /v1/fleet and `lbctl fleet status` show every host's BGP line.
    node = FleetNode(tmp_path / "lb", EtcdConfig(endpoints=etcd.endpoints, host_name="lb1",
                                                 timeout_s=1.0, lease_ttl_s=3))
    with contextlib.ExitStack() as stack:
        stack.callback(node.close)
        api = stack.enter_context(running_api(None, tmp_path / "lb", fleet_node=node))
        assert api.client.post("/v1/vips", json={
            "protocol": "tcp", "address": str(V4), "port": 80,
            "backends": [{"address": "198.18.1.1"}]}).status_code == 201
        announcer = Announcer(BgpConfig(**bgp_pair.bgp_settings()), bgp_dir, api.control,
                              lambda: True)
        stack.callback(announcer.stop_speaker)
        node.bgp = announcer.summary

        def bgp() -> dict[str, object] | None:
            hosts = api.client.get("/v1/fleet").json()["hosts"]
            return hosts[0]["bgp"] if hosts else None

        wait_for(lambda: api.client.get("/v1/fleet").json()["hosts"] != [], what="host entry")
        netns.call_in(bgp_pair.host_ns, announcer.sync)  # the speaker runs in the host's ns
        wait_for(lambda: (bgp() or {}).get("peers_up") == 2, what="both sessions up")
        b = bgp()
        assert b is not None and b["state"] == "announcing" and b["routes"] == 1, b
        assert b["peers"] == 2
        out = ok(lbctl(api, "fleet", "status"))
        assert "announcing 2/2" in out, out
        announcer.drain()
        wait_for(lambda: (bgp() or {}).get("state") == "drained", what="drained in status")
        assert ok(lbctl(api, "fleet", "status", "-o", "json")).count('"drained"') == 1


def _detach_config(pair: Pair, state_dir: Path, path: Path) -> Path:
    """An xlb.toml for `lbctl detach`: this state_dir's speaker, lo in the host namespace."""
    bgp = pair.bgp_settings()
    peers = "".join(f'[[bgp.peers]]\naddress = "{p["address"]}"\nasn = {p["asn"]}\n'
                    for p in bgp["peers"])  # type: ignore[attr-defined]
    path.write_text(f'state_dir = "{state_dir}"\ninterface = "lo"\nnetns = "{pair.host_ns}"\n'
                    f'[bgp]\nenabled = true\nasn = {bgp["asn"]}\nhold_time = 3\n{peers}')
    return path


@pytest.mark.netns
def test_lbctl_detach_withdraws_the_routes_first_and_keeps_the_sessions(
    bgp_pair: Pair, speaker: Speaker, bgp_dir: Path, tmp_path: Path
) -> None:
    # The daemon stopped (the unit's speaker outlives it): nobody else would withdraw.
    pid = _start(bgp_pair, speaker, {V4})
    wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [H4], what="route")
    conf = _detach_config(bgp_pair, bgp_dir, tmp_path / "xlb.toml")
    out = ok(lbctl(None, "detach", "--config", str(conf)))
    assert "withdrew this host's VIP routes" in out and "nothing attached to lo" in out, out
    wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [], timeout=5,
             what="the route withdrawn")
    assert speaker.pid() == pid and all(p.up for p in speaker.state().peers)
    # Nothing announced any more: a second detach has nothing to withdraw.
    assert "withdrew" not in ok(lbctl(None, "detach", "--config", str(conf)))


@pytest.mark.netns
def test_lbctl_detach_no_withdraw_leaves_the_routes(
    bgp_pair: Pair, speaker: Speaker, bgp_dir: Path, tmp_path: Path
) -> None:
    _start(bgp_pair, speaker, {V4})
    wait_for(lambda: kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [H4], what="route")
    conf = _detach_config(bgp_pair, bgp_dir, tmp_path / "xlb.toml")
    out = ok(lbctl(None, "detach", "--config", str(conf), "--no-withdraw"))
    assert "withdrew" not in out, out
    assert kernel_nexthops(bgp_pair.router_ns, "198.18.0.10") == [H4]
