"""GET /v1/events (Server-Sent Events), GET /v1/capture (pcap), `lbctl monitor` and `lbctl
capture`, against a live uvicorn around the real program; packets go through
BPF_PROG_TEST_RUN. Also the hub's bounded queues: a reader that never reads loses events,
counted, and holds no more than its queue."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.dataplane.events import EV_T_DROP
from lb.dataplane.flowhash import Flow5
from lb.dataplane.testrun import TestRunner
from lb.ops.explain import build_packet
from lb.ops.monitor import EventFilter, EventHub
from tests.api.conftest import Served, assert_problem
from tests.api.test_cli import lbctl, ok

pytestmark = pytest.mark.bpf

VIP = "tcp:198.18.0.10:80"
VIP2 = "tcp:198.18.0.11:80"


def _vip(api: Served, address: str, backends: list[str], encap: str = "ipip") -> None:
    body = {"protocol": "tcp", "address": address, "port": 80, "encap": encap,
            "backends": [{"address": a} for a in backends]}
    api.client.post("/v1/vips", json=body).raise_for_status()


def _send(api: Served, dst: str = "198.18.0.10", sport: int = 40000, n: int = 1) -> None:
    runner = TestRunner(api.balancer.prog_fd)
    for i in range(n):
        runner.run(build_packet(Flow5.of("198.18.2.1", dst, sport + i, 80, "tcp")))


def _sse(api: Served, query: dict[str, Any], send: Any) -> list[tuple[str, dict[str, Any]]]:
    """Open the stream, run `send` once it is subscribed, and return its events."""
    out: list[tuple[str, dict[str, Any]]] = []
    with api.client.stream("GET", "/v1/events", params=query, timeout=20) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        send()
        kind = ""
        for text in resp.iter_lines():
            if text.startswith("event: "):
                kind = text[7:]
            elif text.startswith("data: "):
                out.append((kind, json.loads(text[6:])))
    return out


@pytest.fixture
def two_vips(api: Served) -> Iterator[Served]:
    """VIP with one backend, VIP2 with none (its packets are dropped: no_backend)."""
    _vip(api, "198.18.0.10", ["198.18.1.2"])
    _vip(api, "198.18.0.11", [])
    yield api


def test_events_report_a_drop_with_its_reason_and_vip(two_vips: Served) -> None:
    api = two_vips
    got = _sse(api, {"type": "drop", "count": 1}, lambda: _send(api, dst="198.18.0.11"))
    assert [k for k, _ in got] == ["drop"]
    ev = got[0][1]
    assert ev["reason"] == "STAT_NO_BACKEND" and ev["vip"] == VIP2 and ev["verdict"] == "XDP_DROP"
    assert ev["flow"]["source"] == "198.18.2.1" and ev["flow"]["destination_port"] == 80


def test_a_new_flow_names_the_backend_and_why(two_vips: Served) -> None:
    api = two_vips
    got = _sse(api, {"type": "flow", "count": 1}, lambda: _send(api))
    ev = got[0][1]
    assert ev["vip"] == VIP and ev["why"] == "ring" and ev["new_flow"]
    assert ev["flow"]["backend"] == "198.18.1.2" and ev["flow"]["encap"] == "ipip"
    assert ev["flow"]["destination"] == "198.18.0.10", "not the inner flow"


def test_filters_by_vip_and_reason(two_vips: Served) -> None:
    api = two_vips

    def send() -> None:
        _send(api)  # VIP: a new flow
        _send(api, dst="198.18.0.99")  # no VIP: passed
        _send(api, dst="198.18.0.11", n=2)  # VIP2: dropped

    got = _sse(api, {"vip": VIP2, "count": 2}, send)
    assert [e["vip"] for _, e in got] == [VIP2, VIP2]
    got = _sse(api, {"reason": "pass_non_vip", "count": 1}, send)
    assert [e["reason"] for _, e in got] == ["STAT_PASS_NON_VIP"]


def test_unknown_type_or_reason_is_422(api: Served) -> None:
    assert_problem(api.client.get("/v1/events", params={"type": "nope"}), 422, "invalid-input",
                   "type")
    assert_problem(api.client.get("/v1/events", params={"reason": "nope"}), 422,
                   "invalid-input", "reason")


def test_events_need_the_token_when_reads_are_not_open(serve: Any) -> None:
    api = serve(open_reads=False)
    assert api.anon.get("/v1/events").status_code == 401
    assert api.anon.get("/v1/capture").status_code == 401


def test_capture_needs_the_token_even_from_loopback(api: Served) -> None:
    assert api.anon.get("/v1/capture").status_code == 401


def test_a_reader_that_never_reads_loses_events_counted(api: Served) -> None:
    _vip(api, "198.18.0.11", [])
    hub = EventHub(api.balancer, poll_ms=10)
    try:
        sub = hub.subscribe(EventFilter(types=EV_T_DROP), maxlen=8)
        _send(api, dst="198.18.0.11", n=50)
        deadline = time.monotonic() + 10
        while sub.dropped + len(sub._items) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sub._items) == 8, "the queue grew past its bound"
        assert sub.dropped == 42, f"{sub.dropped} counted dropped, 42 were"
        assert len(sub.take()) == 8
    finally:
        hub.close()


def test_the_stream_reports_the_events_its_queue_dropped(api: Served) -> None:
    _vip(api, "198.18.0.11", [])
    hub = api.app.state.runtime.events
    with api.client.stream("GET", "/v1/events", params={"type": "drop", "duration": 3},
                           timeout=20) as resp:
        assert resp.status_code == 200
        sub = hub._subs[-1]
        sub.maxlen = 0  # a queue always full: every event is dropped, and counted
        _send(api, dst="198.18.0.11", n=20)
        lost = [json.loads(t[6:]) for t in resp.iter_lines() if t.startswith("data: {\"dropped")]
    assert lost and lost[-1] == {"dropped": 20, "ring_lost": 0}, lost


def test_last_reader_leaving_switches_sampling_off(two_vips: Served) -> None:
    api = two_vips
    _sse(api, {"count": 1}, lambda: _send(api))
    hub = api.app.state.runtime.events
    deadline = time.monotonic() + 5
    while hub._subs and time.monotonic() < deadline:
        time.sleep(0.01)
    cfg = api.balancer.maps["ev_cfg"][api.balancer.maps["ev_cfg"].Key(0)]
    assert cfg.flags == 0, "sampling left on with nobody listening"


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
@pytest.mark.parametrize("encap", ["ipip", "gue"])
def test_capture_is_a_pcap_tcpdump_reads_with_the_encapsulated_frame(
    api: Served, tmp_path: Path, encap: str
) -> None:
    _vip(api, "198.18.0.10", ["198.18.1.2"], encap=encap)
    path = tmp_path / "c.pcap"
    with api.client.stream("GET", "/v1/capture", params={"count": 2, "duration": 10},
                           timeout=20) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/vnd.tcpdump.pcap"
        threading.Timer(0.2, _send, (api,)).start()
        path.write_bytes(resp.read())
    out = subprocess.run(["tcpdump", "-nn", "-r", str(path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == 2, out
    assert "198.18.2.1.40000 > 198.18.0.10.80" in out[0], f"not the SYN as received: {out[0]}"
    if encap == "ipip":
        # tcpdump decodes IP in IP: outer header, then the inner packet on the same line.
        assert "> 198.18.1.2: IP 198.18.2.1.40000 > 198.18.0.10.80" in out[1], out[1]
    else:
        # ... but not GUE (UDP to a port it does not know): the outer header only.
        assert "> 198.18.1.2.6080: UDP" in out[1], out[1]


def test_lbctl_monitor_and_capture(two_vips: Served, tmp_path: Path) -> None:
    api = two_vips
    threading.Timer(1.5, _send, (api,), {"dst": "198.18.0.11"}).start()
    out = ok(lbctl(api, "monitor", "--type", "drop", "--count", "1", "-o", "json"))
    ev = json.loads(out.splitlines()[0])
    assert ev["event"] == "drop" and ev["reason"] == "STAT_NO_BACKEND" and ev["vip"] == VIP2
    threading.Timer(1.5, _send, (api,), {"dst": "198.18.0.11"}).start()
    out = ok(lbctl(api, "monitor", "--vip", VIP2, "--count", "1"))
    assert "drop  no_backend" in out and f"vip {VIP2}" in out, out
    pcap = tmp_path / "x.pcap"
    threading.Timer(1.5, _send, (api,)).start()
    p = lbctl(api, "capture", "-w", str(pcap), "--count", "2", "--duration", "10")
    assert p.returncode == 0, p.stderr
    assert "2 frames" in p.stderr and pcap.read_bytes()[:4] == bytes.fromhex("d4c3b2a1")


def test_events_without_a_data_plane_is_503(api: Served) -> None:
    rt = api.app.state.runtime
    hub, rt.events = rt.events, None
    try:
        assert_problem(api.client.get("/v1/events"), 503, "not-ready")
    finally:
        rt.events = hub

