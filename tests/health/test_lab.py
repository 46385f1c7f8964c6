"""Health checks end to end in the lab: the daemon probes real backends through the router.

One lab (3 backends) and one daemon for the module. Servers are stopped by the pid the lab
recorded for them and started again with lb.lab.network.start_servers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lb.client import ApiError, vip_path
from lb.dataplane import netns
from lb.lab import network as labmod
from lb.lab.network import Lab, LabApi

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

INTERVAL, FALL, RISE = 0.5, 2, 2
CHECK = {"type": "http", "port": 80, "interval_s": INTERVAL, "timeout_s": 0.4, "fall": FALL,
         "rise": RISE, "jitter": 0.1, "flap_threshold": 0}


@pytest.fixture(scope="module")
def hlab(test_prefix: str) -> Iterator[Lab]:
    """A lab of 3 backends with its daemon, torn down by its prefix even on failure."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, BPF)")
    lab = Lab(prefix=f"{test_prefix}h", backends=3)
    labmod.down(lab.prefix)
    try:
        labmod.up(lab)
        labmod.start_daemon(lab)
        yield lab
    finally:
        labmod.down(lab.prefix)


@pytest.fixture
def api(hlab: Lab) -> Iterator[LabApi]:
    """The daemon's API; VIPs made by the test are deleted and servers restarted after."""
    api = LabApi(hlab)
    yield api
    for v in api.get("/v1/vips")["data"]:
        with contextlib.suppress(ApiError):
            api.delete(vip_path(v["id"]))
    dead = [i for i in hlab.backend_ids if not _server_alive(hlab, i)]
    if dead:
        labmod.start_servers(hlab, dead)


def _server_alive(lab: Lab, i: int) -> bool:
    try:
        pid = int(lab.server_pid_file(i).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return netns.pid_alive(pid)


def stop_server(lab: Lab, i: int) -> None:
    """Stop backend i's server (by the pid the lab recorded) and wait until it is gone."""
    pid = int(lab.server_pid_file(i).read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while netns.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _until(cond: Callable[[], bool], within: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within:.1f} s")
        time.sleep(0.05)
    return time.monotonic() - start


def _vip(api: LabApi, lab: Lab, port: int = 80, **check: Any) -> str:
    body = {"protocol": "tcp", "address": lab.vip4, "port": port,
            "backends": [{"address": lab.backend4(i)} for i in lab.backend_ids],
            "health_check": {**CHECK, **check}}
    return str(api.post("/v1/vips", body)["id"])


def _health(api: LabApi, vid: str) -> dict[str, Any]:
    try:
        return dict(api.get(vip_path(vid) + "/health"))
    except ApiError:
        return {"out": [], "held": [], "all_down": False, "backends": []}


def _all_probed(api: LabApi, vid: str) -> bool:
    bs = _health(api, vid)["backends"]
    return len(bs) == 3 and all(b["probes"] >= RISE and b["status"] == "up" for b in bs)


def test_stopped_server_leaves_the_ring_and_comes_back(hlab: Lab, api: LabApi) -> None:
    vid = _vip(api, hlab)
    _until(lambda: _all_probed(api, vid), 10, "every backend probed up")
    b2 = hlab.backend4(2)
    stop_server(hlab, 2)
    _until(lambda: _health(api, vid)["out"] == [b2], FALL * INTERVAL + 1,
           "the stopped backend out of the ring")
    tally = labmod.http_requests(hlab, hlab.vip4, 60)
    assert not tally.failures, f"new connections failed: {tally.failures}"
    assert set(tally.per_backend) == {"b1", "b3"}, "no new flow goes to the stopped backend"
    state = api.get("/v1/state")
    assert all(b["state"] == "active" for b in state["vips"][0]["backends"]), \
        "the desired state still says active"
    labmod.start_servers(hlab, [2])
    _until(lambda: _health(api, vid)["out"] == [], RISE * INTERVAL + 2, "back in the ring")
    tally = labmod.http_requests(hlab, hlab.vip4, 60)
    assert not tally.failures and "b2" in tally.per_backend
    kinds = [(e["backend"], e["kind"]) for e in api.get("/v1/health")["events"]]
    assert (b2, "down") in kinds and (b2, "up") in kinds


def test_safety_floor_and_all_down_keep_serving(hlab: Lab, api: LabApi) -> None:
    vid = _vip(api, hlab)
    _until(lambda: _all_probed(api, vid), 10, "every backend probed up")
    stop_server(hlab, 1)
    _until(lambda: len(_health(api, vid)["out"]) == 1, FALL * INTERVAL + 1, "one out")
    stop_server(hlab, 2)
    _until(lambda: len(_health(api, vid)["held"]) == 1, FALL * INTERVAL + 1, "floor holds")
    assert len(_health(api, vid)["out"]) == 1, "at most half the weight leaves the ring"
    stop_server(hlab, 3)
    _until(lambda: _health(api, vid)["all_down"], FALL * INTERVAL + 1, "all down flagged")
    h = _health(api, vid)
    assert h["out"] == [hlab.backend4(1)], "the last healthy set stays in the ring"
    metrics = api.request("GET", "/metrics")[2]
    assert f'xlb_health_all_down{{vip="{vid}"}} 1.0' in metrics


def test_flapping_backend_is_damped(hlab: Lab, api: LabApi) -> None:
    vid = _vip(api, hlab, fall=1, rise=1, flap_threshold=1.5, flap_half_life_s=60)
    _until(lambda: _all_probed(api, vid) or len(_health(api, vid)["backends"]) == 3, 10,
           "probed")
    b3 = hlab.backend4(3)
    for _ in range(2):
        stop_server(hlab, 3)
        _until(lambda: b3 in _health(api, vid)["out"], 2 * INTERVAL + 1, "out")
        labmod.start_servers(hlab, [3])
        _until(lambda: b3 not in _health(api, vid)["out"] or any(
            b["suppressed"] for b in _health(api, vid)["backends"]), 2 * INTERVAL + 2,
            "back or damped")
    time.sleep(4 * INTERVAL)  # several good probes: rise=1 would have let it back
    pair = next(b for b in _health(api, vid)["backends"] if b["address"] == b3)
    assert pair["suppressed"] and not pair["in_ring"], "a flapping backend stays out"
    assert pair["last_ok"], "while its probes pass"


def test_drain_wait_completes_when_the_streams_end(hlab: Lab, api: LabApi) -> None:
    from lbctl.main import main

    vid = _vip(api, hlab, port=labmod.STREAM_PORT)  # checked over HTTP on port 80
    streams = labmod.open_streams(hlab, hlab.vip4, 12, port=labmod.STREAM_PORT)
    try:
        name = streams[0].backend
        addr = hlab.backend4(int(name.removeprefix("b")))
        mine = [s for s in streams if s.backend == name]
        argv = ["--url", f"unix://{hlab.api_socket}", "--token-file",
                str(hlab.run_dir / "token"), "backend", "drain", vid, addr, "--wait",
                "--timeout", "30"]
        rc: list[int] = []
        waiter = threading.Thread(target=lambda: rc.append(main(argv)), daemon=True)
        waiter.start()
        time.sleep(3)
        assert waiter.is_alive(), "drain --wait returned while streams were open"
        assert all(s.alive for s in mine), "draining keeps the tracked streams going"
        closed_at = time.monotonic()
        for s in streams:
            s.close()
        waiter.join(timeout=20)
        assert not waiter.is_alive() and rc == [0], "drain --wait did not complete"
        assert time.monotonic() - closed_at < 15
    finally:
        for s in streams:
            s.close()


@pytest.mark.parametrize("encap", ["ipip", "gue"])
def test_tunnel_mode_probes_each_backend_through_the_vip(
    hlab: Lab, api: LabApi, encap: str
) -> None:
    body = {"protocol": "tcp", "address": hlab.vip4, "port": 80, "encap": encap,
            "backends": [{"address": hlab.backend4(i)} for i in hlab.backend_ids],
            "health_check": {**CHECK, "mode": "tunnel"}}
    vid = str(api.post("/v1/vips", body)["id"])
    _until(lambda: _all_probed(api, vid), 15, "every backend answers through the tunnel")
    pairs = _health(api, vid)["backends"]
    assert {b["probe_address"] for b in pairs} == {hlab.vip4}, "probes go to the VIP"
    assert len({b["mark"] for b in pairs}) == 3, "one mark per backend"
    egress = subprocess.run(["tc", "-n", hlab.lb_ns, "filter", "show", "dev", labmod.LB_IF,
                             "egress"], capture_output=True, text=True, check=True).stdout
    assert "tc_hc_encap" in egress, "the tunnel program runs on the LB's egress"
    assert api.get("/v1/health")["tunnel"]["state"] == "ready"
    assert "xlb_health_tunnel_ready 1.0" in api.request("GET", "/metrics")[2]
    stop_server(hlab, 1)
    _until(lambda: _health(api, vid)["out"] == [hlab.backend4(1)], FALL * INTERVAL + 1,
           "only the stopped backend leaves (each probe reached its own backend)")
    assert all(b["status"] == "up" for b in _health(api, vid)["backends"]
               if b["address"] != hlab.backend4(1))


def test_down_backend_stays_out_across_a_daemon_restart(hlab: Lab, api: LabApi) -> None:
    # rise 6: after the restart, probes need about 3 s to bring the backend back, the
    # window in which only the saved health can keep it out.
    rise = 6
    vid = _vip(api, hlab, rise=rise)
    _until(lambda: _all_probed(api, vid), 10, "every backend probed up")
    b2 = hlab.backend4(2)
    stop_server(hlab, 2)
    _until(lambda: _health(api, vid)["out"] == [b2], FALL * INTERVAL + 1, "out of the ring")
    saved = hlab.run_dir / "state" / "health.json"
    _until(saved.exists, 2, "health saved")
    assert saved.stat().st_mode & 0o777 == 0o600, "health.json is not 0600"
    labmod.stop_daemon(hlab)
    # The backend answers again while the daemon is down: only probes may bring it back.
    labmod.start_servers(hlab, [2])
    labmod.start_daemon(hlab)
    started = time.monotonic()
    h = _health(api, vid)
    pair = next(b for b in h["backends"] if b["address"] == b2)
    assert h["out"] == [b2], "a backend that was down rejoined the ring at the restart"
    assert pair["status"] == "down" and pair["ring"] == "draining", pair
    tally = labmod.http_requests(hlab, hlab.vip4, 30)
    assert time.monotonic() - started < (rise - 1) * INTERVAL, "too slow to prove anything"
    assert not tally.failures and set(tally.per_backend) == {"b1", "b3"}, tally.per_backend
    _until(lambda: _health(api, vid)["out"] == [], rise * INTERVAL + 2, "back after probes")
    kinds = [(e["backend"], e["kind"]) for e in api.get("/v1/health")["events"]]
    assert (b2, "up") in kinds


def test_a_check_changed_to_tunnel_mode_is_never_shown_with_the_old_probes(
    hlab: Lab, api: LabApi
) -> None:
    vid = _vip(api, hlab)
    _until(lambda: _all_probed(api, vid), 10, "every backend probed up directly")
    api.request("PUT", vip_path(vid) + "/health_check", {**CHECK, "mode": "tunnel"})
    # The direct pairs are all up with probes to spare: were they still answered for the
    # VIP, this would hold at once (the fault seen when a VIP id came back in tunnel mode).
    _until(lambda: _all_probed(api, vid), 15, "every backend answers through the tunnel")
    h = _health(api, vid)
    assert h["check"]["mode"] == "tunnel"
    assert {b["probe_address"] for b in h["backends"]} == {hlab.vip4}, "probes go to the VIP"


def test_tunnel_mode_works_after_a_daemon_crash(hlab: Lab, api: LabApi) -> None:
    body = {"protocol": "tcp", "address": hlab.vip4, "port": 80, "encap": "ipip",
            "backends": [{"address": hlab.backend4(i)} for i in hlab.backend_ids],
            "health_check": {**CHECK, "mode": "tunnel"}}
    vid = str(api.post("/v1/vips", body)["id"])
    _until(lambda: _all_probed(api, vid), 15, "probed through the tunnel")
    labmod.stop_daemon(hlab, kill=True)  # its tc filter stays on the LB's egress
    labmod.start_daemon(hlab)
    _until(lambda: api.get("/v1/health")["tunnel"]["state"] in ("ready", "failed"), 30,
           "the tunnel program loaded or failed")
    tunnel = api.get("/v1/health")["tunnel"]
    assert tunnel["state"] == "ready", f"the restarted daemon has no tunnel: {tunnel}"
    _until(lambda: _all_probed(api, vid) and all(
        b["mark"] is not None for b in _health(api, vid)["backends"]), 15,
        "probed through the tunnel again")
    egress = subprocess.run(["tc", "-n", hlab.lb_ns, "filter", "show", "dev", labmod.LB_IF,
                             "egress"], capture_output=True, text=True, check=True).stdout
    assert len(re.findall(r" name tc_hc_encap ", egress)) == 1, "one program on egress"
