"""Statistics, metrics, flow explain and health, with packets run through the live program."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from lb.dataplane.conntab import ConnTable
from lb.dataplane.flowhash import Flow5, Flows, conn_index, conn_index_many
from lb.dataplane.loader import write_runtime_config
from lb.dataplane.testrun import TestRunner
from lb.ops.explain import build_packet
from lb.ops.stats import StatsReader
from tests.api.conftest import AUTO_REASON, RUNTIME, Served, assert_problem
from tests.api.test_cli import lbctl

pytestmark = pytest.mark.bpf

VIP_ID = "tcp:198.18.0.10:80"
BACKENDS = ["198.18.1.2", "198.18.1.3", "198.18.1.4"]


@pytest.fixture
def lb(api: Served) -> Served:
    """The API with one TCP VIP, three backends, and an empty connection table."""
    body = {
        "protocol": "tcp",
        "address": "198.18.0.10",
        "port": 80,
        "backends": [{"address": a} for a in BACKENDS],
    }
    api.client.post("/v1/vips", json=body).raise_for_status()
    body = {
        "protocol": "udp",
        "address": "198.18.0.10",
        "port": 53,
        "backends": [{"address": a} for a in BACKENDS],
    }
    api.client.post("/v1/vips", json=body).raise_for_status()
    with ConnTable(api.balancer) as table:
        table.clear()
    return api


def _entries(api: Served) -> int:
    with ConnTable(api.balancer) as table:
        return table.count()


def _flow(proto: str = "tcp", sport: int = 40000, dport: int = 80) -> Flow5:
    return Flow5.of("198.18.2.1", "198.18.0.10", sport, dport, proto)


def _syn(api: Served, flow: Flow5) -> None:
    """Run a TCP SYN of the flow through the program (it enters the connection table)."""
    pkt = bytearray(build_packet(flow))
    pkt[14 + 20 + 13] = 0x02  # flags: SYN
    TestRunner(api.balancer.prog_fd).run(bytes(pkt))


def _explain(api: Served, proto: str = "tcp", sport: int = 40000, dport: int = 80) -> dict:
    r = api.client.get(
        "/v1/explain",
        params={
            "protocol": proto,
            "src": "198.18.2.1",
            "sport": sport,
            "dst": "198.18.0.10",
            "dport": dport,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_explain_new_flow_is_ring_and_leaves_no_entry(lb: Served) -> None:
    e = _explain(lb)
    assert e["verdict"] == "XDP_TX" and e["reason"] == "ring", e
    assert e["backend"] in BACKENDS and e["vip_id"] == VIP_ID and e["encap"] == "ipip"
    assert e["in_conn_table"] is False
    assert _entries(lb) == 0


def test_explain_tracked_flow_is_conn_table(lb: Served) -> None:
    _syn(lb, _flow())
    assert _entries(lb) == 1
    first = _explain(lb)
    assert first["reason"] == "conn_table" and first["in_conn_table"] is True, first
    assert first["conn_table_backend"] == first["backend"]
    # Draining the flow's backend keeps the flow on it: tracked flows go on.
    lb.client.patch(
        f"/v1/vips/{VIP_ID}/backends/{first['backend']}", json={"state": "draining"}
    ).raise_for_status()
    again = _explain(lb)
    assert again["reason"] == "conn_table" and again["backend"] == first["backend"]


def test_explain_udp_removes_the_entry_it_made(lb: Served) -> None:
    e = _explain(lb, "udp", 5353, 53)
    assert e["reason"] == "ring" and e["backend"] in BACKENDS
    assert _entries(lb) == 0


def test_explain_in_a_full_set_leaves_the_set_as_it_was(lb: Served) -> None:
    flow = Flow5.of("198.18.2.1", "198.18.0.10", 5353, 53, "udp")
    with ConnTable(lb.balancer) as table:
        ports = np.arange(1024, 65536)
        cands = Flows.v4(int(flow.src), int(flow.dst), ports, 53, flow.proto)
        same = ports[conn_index_many(cands, table.sets) == conn_index(flow, table.sets)]
        mates = [Flow5(flow.src, flow.dst, int(p), 53, flow.proto) for p in same[:9]
                 if p != flow.sport][:8]
        num, idx = lb.control.vip_number("udp:198.18.0.10:53"), lb.control.backend_index(
            BACKENDS[0])
        for age, m in enumerate(mates):
            table.insert(m, idx, num, udp=True, age_s=age + 1.0)
        e = _explain(lb, "udp", 5353, 53)
        assert e["reason"] == "ring" and e["in_conn_table"] is False
        assert table.lookup(flow) is None, "explain left its entry"
        assert all(table.lookup(m) is not None for m in mates), "explain evicted a tracked flow"


class _Traffic:
    """Real packets through the live program in a thread: SYNs, then ACKs of the same flows
    (connection-table hits), counted, until stopped."""

    def __init__(self, api: Served, flows: int = 64) -> None:
        self.flows = [_flow(sport=1000 + i) for i in range(flows)]
        self.sent = 0
        self._api = api
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        runner = TestRunner(self._api.balancer.prog_fd)
        syns = []
        for f in self.flows:
            pkt = bytearray(build_packet(f))
            pkt[14 + 20 + 13] = 0x02  # SYN
            syns.append(bytes(pkt))
        for p in syns:
            runner.run(p)
            self.sent += 1
        acks = [build_packet(f) for f in self.flows]
        while not self._stop.is_set():
            for p in acks:
                runner.run(p)
                self.sent += 1

    def __enter__(self) -> _Traffic:
        self._thread.start()
        while self.sent < len(self.flows) * 2:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_explain_reason_is_the_flows_own_slot_while_traffic_flows(lb: Served) -> None:
    # Other flows hit the connection table all along (the global STAT_LRU_HIT moves during
    # every run), yet a flow never seen is "ring" and a tracked one "conn_table".
    with _Traffic(lb) as traffic:
        for sport in range(30000, 30040):
            e = _explain(lb, sport=sport)
            assert e["reason"] == "ring" and e["in_conn_table"] is False, e
            assert e["counters"].get("STAT_LRU_HIT", 0) == 0, e["counters"]
        for f in traffic.flows[:10]:
            e = _explain(lb, sport=f.sport)
            assert e["reason"] == "conn_table" and e["backend"] == e["conn_table_backend"], e
            assert e["counters"].get("STAT_LRU_HIT") == 1, e["counters"]
        assert traffic.sent > 1000, "too little traffic to prove anything"
    with ConnTable(lb.balancer) as table:
        assert table.lookup(_flow(sport=30000)) is None, "explain left its entry"


def test_explain_packets_are_not_counted_as_traffic(lb: Served) -> None:
    reader = StatsReader(lb.balancer)
    num = lb.control.vip_number(VIP_ID)
    base_vip = {k: sum(v) for k, v in reader.vip(num).items()}
    idx = [lb.control.backend_index(a) for a in BACKENDS]
    base_real = sum(sum(reader.real(i)["packets"]) for i in idx)
    base_glob = {k: sum(v) for k, v in reader.glob().items()}
    base_pairs = _pair_packets(reader)
    with _Traffic(lb, flows=16) as traffic:
        for sport in range(31000, 31020):
            e = _explain(lb, sport=sport)
            assert e["verdict"] == "XDP_TX", e
            # Exactly this packet's counters, whatever the traffic did meanwhile.
            assert e["counters"] == {"STAT_LRU_MISS_OTHER": 1, "STAT_XDP_TX": 1}, e
        _explain(lb, sport=traffic.flows[0].sport)
    vip = {k: sum(v) for k, v in reader.vip(num).items()}
    glob = {k: sum(v) for k, v in reader.glob().items()}
    assert vip["packets"] - base_vip["packets"] == traffic.sent, "explain counted as VIP traffic"
    assert vip["new_conns"] - base_vip["new_conns"] == len(traffic.flows)
    reals = sum(sum(reader.real(i)["packets"]) for i in idx) - base_real
    assert reals == traffic.sent, "explain counted as backend traffic"
    assert glob["STAT_XDP_TX"] - base_glob["STAT_XDP_TX"] == traffic.sent
    pairs = _pair_packets(reader)
    assert sum(pairs.values()) - sum(base_pairs.values()) == traffic.sent, \
        "explain counted as (VIP, backend) pair traffic"


def _pair_packets(reader: StatsReader) -> dict[str, int]:
    """Packets per backend of VIP_ID from the per-pair counters."""
    snap = reader.snapshot(vips=[VIP_ID])
    return {a: sum(c["packets"]) for a, c in snap.pairs.get(VIP_ID, {}).items()}


def test_explain_on_an_interface_with_its_own_mac(lb: Served) -> None:
    # An attached program balances only frames to the interface's MAC: explain uses it.
    write_runtime_config(lb.balancer, RUNTIME, lb_mac="02:00:00:00:00:33")
    try:
        e = _explain(lb)
        assert e["verdict"] == "XDP_TX" and e["reason"] == "ring", e
    finally:
        write_runtime_config(lb.balancer, RUNTIME)


def test_explain_not_a_vip(lb: Served) -> None:
    e = _explain(lb, dport=81)
    assert e["reason"] == "not_a_vip" and e["backend"] is None and e["vip_id"] is None


def test_explain_mixed_families_is_422(lb: Served) -> None:
    r = lb.client.get(
        "/v1/explain",
        params={
            "protocol": "tcp",
            "src": "2001:db8::1",
            "sport": 1,
            "dst": "198.18.0.10",
            "dport": 80,
        },
    )
    assert_problem(r, 422, "invalid-input", "dst")


def test_explain_bad_port_is_422(lb: Served) -> None:
    r = lb.client.get(
        "/v1/explain",
        params={
            "protocol": "tcp",
            "src": "198.18.2.1",
            "sport": 70000,
            "dst": "198.18.0.10",
            "dport": 80,
        },
    )
    assert_problem(r, 422, "invalid-input", "sport")


def test_stats_count_packets_per_vip_backend_and_globally(lb: Served) -> None:
    before = lb.client.get("/v1/stats").json()
    for sport in range(41000, 41010):
        _syn(lb, _flow(sport=sport))
    s = lb.client.get("/v1/stats", params={"per_cpu": "true"}).json()
    vip = next(v for v in s["vips"] if v["vip_id"] == VIP_ID)["counters"]
    old = next(v for v in before["vips"] if v["vip_id"] == VIP_ID)["counters"]
    assert vip["packets"]["value"] - old["packets"]["value"] == 10
    assert vip["new_conns"]["value"] - old["new_conns"]["value"] == 10
    assert vip["bytes"]["value"] > old["bytes"]["value"]
    assert len(vip["packets"]["per_cpu"]) == len(s["global"]["STAT_XDP_TX"]["per_cpu"])
    assert sum(b["counters"]["packets"]["value"] for b in s["backends"]) >= 10
    assert s["global"]["STAT_XDP_TX"]["value"] >= 10
    assert s["conn_table"]["entries"] == 10 and s["conn_table"]["capacity"] == 4096
    assert s["conn_table"]["misses"] >= 10
    pairs = next(v for v in s["vips"] if v["vip_id"] == VIP_ID)["backends"]
    assert sum(p["counters"]["new_conns"]["value"] for p in pairs) >= 10, pairs
    assert {p["address"] for p in pairs} <= {b["address"] for b in s["backends"]}
    one = lb.client.get(f"/v1/vips/{VIP_ID}/stats").json()
    assert one["counters"]["packets"]["value"] == vip["packets"]["value"]
    assert [p["address"] for p in one["backends"]] == [p["address"] for p in pairs]
    assert one["counters"]["packets"]["per_cpu"] is None


def test_stats_rates_come_from_the_sampler(lb: Served) -> None:
    import time

    time.sleep(0.5)  # a few samples (every 0.2 s in tests)
    s = lb.client.get("/v1/stats").json()
    assert s["window_s"] > 0
    assert s["global"]["STAT_XDP_TX"]["per_s"] is not None


def test_metrics_expose_every_counter(lb: Served) -> None:
    _syn(lb, _flow())
    r = lb.anon.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in (
        f'xlb_vip_packets_total{{vip="{VIP_ID}"}}',
        f'xlb_vip_bytes_total{{vip="{VIP_ID}"}}',
        f'xlb_vip_new_connections_total{{vip="{VIP_ID}"}}',
        'xlb_backend_packets_total{backend="198.18.1.2"}',
        'xlb_backend_bytes_total{backend="198.18.1.2"}',
        f'",vip="{VIP_ID}"}} 1.0',  # xlb_vip_backend_* {backend=<the one it picked>,vip=}
        "xlb_vip_backend_new_connections_total{backend=",
        'xlb_datapath_total{counter="STAT_LRU_HIT"}',
        "xlb_conn_table_entries 1.0",
        "xlb_conn_table_slots_used 1.0",
        "xlb_conn_table_capacity 4096.0",
        'xlb_attached{mode="generic"} 1.0',
        f"xlb_state_generation {float(lb.control.generation)}",
        "xlb_reconcile_errors_total 0.0",
    ):
        assert line in text, line


def test_healthz_is_200(api: Served) -> None:
    r = api.anon.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_readyz_is_200_when_attached_and_in_sync(api: Served) -> None:
    r = api.anon.get("/readyz")
    assert r.status_code == 200 and r.json() == {
        "ready": True,
        "reasons": [],
        "attachment": "generic on test0",
        "xdp_mode": "generic",
        "xdp_mode_reason": AUTO_REASON,
        "generation": api.control.generation,
        "store": "sqlite",
        "degraded": [],
    }


def test_the_xdp_mode_and_why_show_in_stats_metrics_and_lbctl(lb: Served) -> None:
    s = lb.client.get("/v1/stats").json()
    assert (s["xdp_mode"], s["xdp_mode_reason"]) == ("generic", AUTO_REASON)
    text = lb.anon.get("/metrics").text
    assert 'xlb_attach_info{mode="generic",reason="' + AUTO_REASON in text, text
    p = lbctl(lb, "stats")
    assert p.returncode == 0, p.stderr
    assert f"XDP generic ({AUTO_REASON})" in p.stdout


def test_readyz_is_503_with_reason_when_not_attached(serve: Callable[..., Served]) -> None:
    api = serve(attached=False)
    r = api.anon.get("/readyz")
    assert r.status_code == 503
    assert r.json()["ready"] is False and "not attached" in r.json()["reasons"][0]


def test_per_cpu_lists_cover_every_possible_cpu(lb: Served) -> None:
    s = lb.client.get("/v1/stats", params={"per_cpu": "true"}).json()
    n = len(s["global"]["STAT_XDP_PASS"]["per_cpu"])
    assert n >= 1 and all(len(c["per_cpu"]) == n for c in s["global"].values())


def test_explain_ipv6_flow(api: Served) -> None:
    body = {
        "protocol": "udp",
        "address": "2001:db8::10",
        "port": 53,
        "encap": "gue",
        "backends": [{"address": "2001:db8:1::2"}, {"address": "2001:db8:1::3"}],
    }
    api.client.post("/v1/vips", json=body).raise_for_status()
    r = api.client.get(
        "/v1/explain",
        params={
            "protocol": "udp",
            "src": "2001:db8:2::1",
            "sport": 5353,
            "dst": "2001:db8::10",
            "dport": 53,
        },
    )
    e = r.json()
    assert r.status_code == 200 and e["reason"] == "ring", e
    assert e["backend"] in ("2001:db8:1::2", "2001:db8:1::3") and e["encap"] == "gue"
    assert e["vip_id"] == "udp:[2001:db8::10]:53"
