"""The benchmarks' plumbing: the forwarding smoke run moves traffic in every scenario and writes
well-formed JSON; the runner's table, module selection and chart work. No timing assertions:
figures from a shared machine prove nothing, only that each path carried packets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import bench_forwarding as fwd
from bench import run
from bench.chart import draw, ns_per_path
from lb.dataplane import netns


@pytest.mark.parametrize("frame", [64, 512])
@pytest.mark.parametrize("proto", ["udp", "syn"])
@pytest.mark.parametrize("flows", ["seq", "table", "random"])
def test_trafgen_config_pads_to_the_frame_size(proto: str, frame: int, flows: str) -> None:
    text = fwd.Traffic(proto, frame, flows).config()
    pad = int(text.split("fill(0x00, ")[1].split(")")[0])
    assert pad + fwd.ETH_IP + fwd.L4_LEN[proto] + fwd.FCS == frame, "frame size is off"
    assert f"da={fwd.LB_MAC}" in text, "frames are not addressed to the LB"
    assert "ttl=64" in text, "a zero TTL would make kernel_fwd drop everything"


def test_only_accepts_module_names_with_or_without_prefix() -> None:
    assert run.parse_only("bench_forwarding,maglev") == ["maglev", "forwarding"]
    assert run.parse_only(None) == list(run.MODULES)
    with pytest.raises(SystemExit):
        run.parse_only("nosuch")


def test_summary_table_reports_skipped_and_failed_modules() -> None:
    table = run.summary_table([
        run.Outcome("maglev", "skipped", message="bench/bench_maglev.py does not exist yet"),
        run.Outcome("api", "failed", message="exited with status 1"),
        run.Outcome("controlplane", "ok", 1.0, figures={"create_vip": {"median_ms": 1.5}}),
    ])
    assert "SKIPPED: bench/bench_maglev.py does not exist yet" in table
    assert "FAILED: exited with status 1" in table
    assert "create_vip.median_ms" in table, "a module's numeric figures are missing"


def test_chart_draws_without_any_results(tmp_path: Path) -> None:
    png = draw(tmp_path, tmp_path / "summary.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"


def test_ns_per_path_finds_the_paths_whatever_the_nesting() -> None:
    data = {"env": {"ns": 1}, "figures": {"paths": {"udp_hit": {"ns_per_packet": 90.0},
                                                    "syn_miss": {"ns_per_packet": 150}}}}
    assert ns_per_path(data) == {"udp_hit": 90.0, "syn_miss": 150.0}


@pytest.mark.netns
@pytest.mark.bpf
def test_forwarding_smoke_moves_traffic_in_every_scenario(tmp_path: Path) -> None:
    figures = fwd.main(smoke=True, results_dir=tmp_path)
    on_disk = json.loads((tmp_path / "forwarding.json").read_text())
    assert on_disk["scenarios"] == figures["scenarios"], "the JSON is not what main() returned"
    assert {"kernel", "cpu", "date"} <= set(on_disk["env"]), "environment is missing"
    # Katran's scenarios need KATRAN_SRC; without it they are skipped, saying how to get them.
    absent = {n for n in fwd.KATRAN_SCENARIOS if "KATRAN_SRC" in figures["skipped"].get(n, "")}
    assert set(figures["scenarios"]) | absent == set(fwd.SCENARIOS), (
        f"scenarios not measured: {figures.get('skipped')}"
    )
    for name, sc in figures["scenarios"].items():
        # Any window: on a loaded machine the sender may get no CPU for most of a smoke run
        # (lb_native once: "0.00@0% 0.00@0% 0.00@0% 0.04@5% 0.89@88%", a median of 0).
        assert max(sc["windows_mpps"]) > 0, f"{name} forwarded nothing in any window"
        assert len(sc["windows_mpps"]) >= fwd.SMOKE.windows, f"{name} has too few windows"
        for key in ("ratio_to_floor", "ratio_to_drop", "ratio_to_floor_cpu", "ns_per_packet"):
            assert isinstance(sc[key], float) and math.isfinite(sc[key]), f"{name}.{key}"
        if name.startswith(("lb_", "syn_", "katran_")):
            assert sc["encap_fraction"] == 1.0, f"{name}: the sink saw unencapsulated frames"
    est = figures["scenarios"]["syn_flood"]["established"]
    assert est["in_table_before"] > 0.99 * est["flows"], "the established flows were not written"
    assert {"in_table_after", "survival", "sample_forwarded_to_backend"} <= set(est)
    assert not netns.names(fwd.PREFIX), "the lab's namespaces were left behind"


def test_fleet_smoke_measures_propagation_and_throughput() -> None:
    from bench import bench_fleet
    from lb.fleet.members import etcd_binary

    if etcd_binary() is None:
        pytest.skip("etcd is not installed (scripts/setup.sh installs etcd-server)")
    fig = bench_fleet.main(smoke=True)
    assert fig["propagation"]["changes"] >= 40
    assert fig["propagation"]["p99_ms"] >= fig["propagation"]["p50_ms"] >= 0
    for kind in ("etcd_one_host", "etcd_three_hosts", "sqlite"):
        assert fig["changes_per_s"][kind]["changes_per_s"] > 0, kind


def test_readme_section_is_written_from_the_results(tmp_path: Path) -> None:
    from bench import readme

    env = {"date": "2026-12-03T18:00:00+00:00", "cpu": "Test CPU", "cpus": 2,
           "kernel": "6.18", "commit": "abcdef123456"}
    row = {"ns": 100.0, "above_floor_ns": 50.0, "spread_ns": [90.0, 110.0]}
    (tmp_path / "dataplane.json").write_text(json.dumps({
        "env": env, "floor_ns": 50.0, "runs": 5, "packets_per_run": 1000,
        "conn_table_slots": 8, "paths": {"ack_v6_hot": row},
        "katran": {"commit": "19f08fec82fb7b5f", "lru_size": 8,
                   "paths": {"ack_v6_hot": {**row, "above_floor_ns": 100.0}}},
        "ratio_to_katran": {"ack_v6_hot": 0.5}, "lru_reference": {}}))
    md = tmp_path / "README.md"
    md.write_text(f"# x\n\nbefore\n{readme.BEGIN}\nhand-typed\n{readme.END}\nafter\n")
    assert readme.main(["--readme", str(md), "--results", str(tmp_path), "--check"]) == 1
    assert readme.update(md, tmp_path), "the stale section was not rewritten"
    text = md.read_text()
    assert "hand-typed" not in text and text.startswith("# x\n\nbefore\n")
    assert text.endswith(f"{readme.END}\nafter\n"), "text after the section was touched"
    assert "| IPv6 ACK, one hot flow | 50 (40-60) | 100 (40-60) | 0.50 | - |" in text
    assert "abcdef123456" in text and "19f08fec82fb" in text, "run or Katran commit missing"
    assert "forwarding.json not found" in text
    assert readme.main(["--readme", str(md), "--results", str(tmp_path), "--check"]) == 0


def test_without_katran_src_the_run_says_how_to_get_the_column(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.katran import harness

    monkeypatch.delenv("KATRAN_SRC", raising=False)
    assert harness.source() is None
    assert "KATRAN_SRC" in harness.HOW_TO and "bench/katran/README.md" in harness.HOW_TO


@pytest.mark.bpf
def test_katran_as_the_harness_programs_it_forwards_vip_flows_and_passes_others() -> None:
    from bench import bench_dataplane as dp
    from bench.katran import harness
    from lb.config import DataplaneConfig
    from lb.consts import XDP_PASS, XDP_TX

    if harness.source() is None:
        pytest.skip(harness.HOW_TO)
    cfg = DataplaneConfig(conn_table_size=65536)
    rings = {num: dp.ring_values(cfg.ring_size, reals) for num, _, reals in dp.VIPS}
    k, info = dp._katran(rings, lambda _: None, lru_size=65536)
    assert k is not None and info["commit"]
    try:
        fs = dp.Frameset(200)
        for sc in [sc for sc in dp.SCENARIOS if sc.measured_on("katran")]:
            pre = fs.prepare(sc)
            if pre is not None:
                k.run(pre)
            before = k.snapshot()
            _, verdicts = k.run(fs.of(sc, 0))
            assert verdicts[sc.verdict] == 200, f"{sc.name}: {dict(verdicts)}"
            k.check(sc, before, 200)
        assert k.snapshot()["fallback_lru"] == 0, "a packet took Katran's fallback LRU"
        assert {XDP_PASS, XDP_TX} >= {sc.verdict for sc in dp.SCENARIOS}
    finally:
        k.close()
    assert not k.k.pin_dir.exists(), "the harness left its pins behind"
