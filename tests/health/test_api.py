"""Health checking through the REST API: configure, watch transitions, metrics, state."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from lb.control.facade import ControlPlane
from lb.health.manager import HealthManager
from tests.control.conftest import StateSettings
from tests.health.conftest import Server, free_port
from xlb_api.main import create_app
from xlb_api.settings import ApiSettings

TOKEN = "health-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECK = {"type": "http", "interval_s": 0.2, "timeout_s": 0.2, "fall": 2, "rise": 2,
         "flap_threshold": 0}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[httpx.Client]:
    """The API (store-only control plane, health manager) served by uvicorn in a thread."""
    control = ControlPlane(StateSettings(tmp_path), None, loopback_backends=True)
    app = create_app(
        control=control,
        settings=ApiSettings(token=SecretStr(TOKEN)),
        health_manager=HealthManager(control, sync_interval=0.1),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _until(lambda: server.started, 20, "uvicorn start")
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}") as c:
            yield c
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        control.close()


def _until(cond: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.05)


def _pairs(c: httpx.Client) -> dict[str, Any]:
    body = c.get("/v1/health").json()
    return {b["address"]: b for v in body["vips"] for b in v["backends"]}


def test_check_set_on_create_shows_health_events_and_metrics(client: httpx.Client) -> None:
    port = free_port()
    servers = [Server("http", host=a, port=port) for a in ("127.0.0.2", "127.0.0.3")]
    try:
        r = client.post("/v1/vips", headers=AUTH, json={
            "protocol": "tcp", "address": "198.18.0.10", "port": port,
            "backends": [{"address": "127.0.0.2"}, {"address": "127.0.0.3"}],
            "health_check": CHECK,
        })
        assert r.status_code == 201, r.text
        vid = r.json()["id"]
        assert r.json()["health_check"]["type"] == "http"
        gen = client.get("/v1/state").json()["generation"]
        _until(lambda: all(p["probes"] >= 2 for p in _pairs(client).values())
               and len(_pairs(client)) == 2, 5, "probes ran")
        servers[1].stop()
        _until(lambda: _pairs(client)["127.0.0.3"]["status"] == "down", 3, "down")
        pair = _pairs(client)["127.0.0.3"]
        assert not pair["in_ring"] and pair["last_error"]
        vh = client.get(f"/v1/vips/{quote(vid, safe=':')}/health").json()
        assert vh["out"] == ["127.0.0.3"]
        body = client.get("/v1/health").json()
        assert any(e["kind"] == "down" and e["backend"] == "127.0.0.3" for e in body["events"])
        assert body["totals"]["down"] == 1
        assert client.get("/v1/state").json()["generation"] == gen, "no generation bump"
        metrics = client.get("/metrics").text
        assert f'xlb_health_up{{backend="127.0.0.3",vip="{vid}"}} 0.0' in metrics
        assert (f'xlb_health_transitions_total{{backend="127.0.0.3",to="down",vip="{vid}"}}'
                ' 1.0') in metrics
    finally:
        for s in servers:
            s.stop()


def _probe_counts(c: httpx.Client) -> dict[tuple[str, str], float]:
    text = c.get("/metrics").text
    fam = {m.name: m for m in text_string_to_metric_families(text)}["xlb_health_probe_seconds"]
    return {(s.labels["type"], s.labels["result"]): s.value
            for s in fam.samples if s.name.endswith("_count")}


def test_probe_round_trips_fill_the_probe_histogram_by_type_and_result(
    client: httpx.Client,
) -> None:
    port = free_port()
    server = Server("tcp", host="127.0.0.2", port=port)  # 127.0.0.3 refuses: failed probes
    try:
        r = client.post("/v1/vips", headers=AUTH, json={
            "protocol": "tcp", "address": "198.18.0.10", "port": port,
            "backends": [{"address": "127.0.0.2"}, {"address": "127.0.0.3"}],
            "health_check": {**CHECK, "type": "tcp"},
        })
        assert r.status_code == 201, r.text
        _until(lambda: _probe_counts(client).get(("tcp", "ok"), 0) >= 2
               and _probe_counts(client).get(("tcp", "failed"), 0) >= 2, 5, "probes timed")
        assert set(_probe_counts(client)) == {("tcp", "ok"), ("tcp", "failed")}, (
            "probe labels are not (check type, result)")
    finally:
        server.stop()


def test_put_and_delete_health_check(client: httpx.Client) -> None:
    vid = client.post("/v1/vips", headers=AUTH, json={
        "protocol": "udp", "address": "198.18.0.10", "port": 53}).json()["id"]
    path = f"/v1/vips/{quote(vid, safe=':')}/health_check"
    gen = client.get("/v1/state").json()["generation"]
    r = client.put(path, headers=AUTH, json={"type": "udp", "mode": "tunnel"})
    assert r.status_code == 200, r.text
    state = client.get("/v1/state").json()
    assert state["generation"] == gen + 1, "a check is desired state: stored and versioned"
    assert state["vips"][0]["health_check"]["mode"] == "tunnel"
    bad = client.put(path, headers=AUTH, json={"interval_s": 1, "timeout_s": 5})
    assert bad.status_code == 422
    assert client.delete(path, headers=AUTH).status_code == 204
    assert client.get("/v1/state").json()["vips"][0]["health_check"] is None


def test_port_zero_vip_needs_a_check_port(client: httpx.Client) -> None:
    r = client.post("/v1/vips", headers=AUTH, json={
        "protocol": "tcp", "address": "198.18.0.10", "port": 0, "health_check": {}})
    assert r.status_code == 422
    assert r.json()["field"] == "health_check.port"


def test_flows_need_a_data_plane(client: httpx.Client) -> None:
    vid = client.post("/v1/vips", headers=AUTH, json={
        "protocol": "tcp", "address": "198.18.0.10", "port": 80,
        "backends": [{"address": "198.18.1.2"}]}).json()["id"]
    r = client.get(f"/v1/vips/{quote(vid, safe=':')}/backends/198.18.1.2/flows")
    assert r.status_code == 503
    r = client.get(f"/v1/vips/{quote(vid, safe=':')}/backends/198.18.1.9/flows")
    assert r.status_code == 404


def _ring_column(table: str, address: str) -> str:
    """The RING column of `address`'s row in `lbctl health show`."""
    for line in table.splitlines():
        words = line.split()
        if address in words:
            roles = [w for w in words if w in ("serving", "draining")]
            assert len(roles) == 1, line
            return roles[0]
    raise AssertionError(f"no row for {address} in:\n{table}")


def test_lbctl_health_set_show_rm_and_stats(
    client: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    from lbctl.main import main

    url = ["--url", str(client.base_url), "--token", TOKEN]
    port = free_port()
    server = Server("tcp", host="127.0.0.2", port=port)
    try:
        assert main(["vip", "add", "tcp", f"198.18.0.10:{port}", *url]) == 0
        vid = f"tcp:198.18.0.10:{port}"
        assert main(["backend", "add", vid, "127.0.0.2", *url]) == 0
        assert main(["backend", "add", vid, "127.0.0.3", *url]) == 0
        assert main(["health", "set", vid, "--type", "tcp", "--interval", "0.2",
                     "--timeout", "0.2", "--fall", "2", "--rise", "2", *url]) == 0
        capsys.readouterr()
        _until(lambda: _pairs(client).get("127.0.0.3", {}).get("status") == "down", 5, "down")
        assert main(["health", "show", vid, *url]) == 0
        out = capsys.readouterr().out
        assert "127.0.0.3" in out and "down" in out and "connection refused" in out
        assert " RING " in out.splitlines()[0] and "IN-RING" not in out
        assert _ring_column(out, "127.0.0.2") == "serving"
        assert _ring_column(out, "127.0.0.3") == "draining", "out by health: not serving"
        # Drained by the desired state (health up): out of the ring, not "in ring".
        assert main(["backend", "drain", vid, "127.0.0.2", *url]) == 0
        _until(lambda: _pairs(client)["127.0.0.2"]["ring"] == "draining", 5, "draining")
        capsys.readouterr()
        assert main(["health", "show", vid, *url]) == 0
        assert _ring_column(capsys.readouterr().out, "127.0.0.2") == "draining"
        assert main(["health", "show", "-o", "json", *url]) == 0
        assert '"status": "down"' in capsys.readouterr().out
        assert main(["health", "rm", vid, *url]) == 0
        assert client.get("/v1/state").json()["vips"][0]["health_check"] is None
        assert main(["health", "set", vid, "--interval", "1", "--timeout", "3", *url]) == 1
    finally:
        server.stop()
