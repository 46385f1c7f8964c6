"""`make bench-readme`: the README's benchmark tables, written from bench/results/*.json.

    python -m bench.readme [--readme README.md] [--results bench/results] [--check]

Replaces what lies between the markers BEGIN and END in the README with tables made from
the last run's results (dataplane.json, curves.json, forwarding.json): the date, machine and
commit of each run, xlb beside Katran where the run measured it. Nothing in that section is
typed by hand; `--check` exits 1 when the README differs from what the results give.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The goal of issue 21: at most this fraction of Katran's cost on every path, in one run.
GOAL = 0.8
BEGIN = "<!-- bench-results:begin (make bench-readme writes this section) -->"
END = "<!-- bench-results:end -->"

PATH_LABELS = {
    "nonvip_pass": "non-VIP pass",
    "syn_v4": "TCP SYN, new flows (ring + insert + encap)",
    "ack_v4_shuffled": "TCP ACK, 200,000 flows shuffled",
    "ack_v4_hot": "TCP ACK, one hot flow",
    "syn_v6": "IPv6 SYN",
    "ack_v6_shuffled": "IPv6 ACK shuffled",
    "ack_v6_hot": "IPv6 ACK, one hot flow",
    "icmp_echo_v4": "ICMP echo reply",
}
FWD_LABELS = {
    "drop_limit": "XDP_DROP at the LB (generator limit)",
    "fwd_floor": "trivial MAC-rewrite XDP_TX (floor)",
    "lb_native": "xlb native, ~64k flows",
    "lb_one_flow": "xlb native, one flow",
    "katran_native": "Katran native, ~64k flows",
    "katran_one_flow": "Katran native, one flow",
    "lb_generic": "xlb generic",
    "lb_1m_flows": "xlb native, 1M flows in the table",
    "syn_flood": "xlb native, SYN flood",
    "kernel_fwd": "kernel IP forwarding",
}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _env(fig: dict[str, Any]) -> str:
    e = fig.get("env") or {}
    smoke = " (a smoke run: few packets, not figures to quote)" if fig.get("smoke") else ""
    return (f"{e.get('date', '?')}, {e.get('cpu', '?')} x {e.get('cpus', '?')} CPUs, "
            f"kernel {e.get('kernel', '?')}, commit `{e.get('commit', 'unknown')}`{smoke}")


def _cell(row: dict[str, Any] | None, floor: float) -> str:
    if not row:
        return "-"
    spread = row.get("spread_ns")
    if spread:
        return f"{row['above_floor_ns']:.0f} ({spread[0] - floor:.0f}-{spread[1] - floor:.0f})"
    return f"{row['above_floor_ns']:.0f}"


def dataplane_section(dp: dict[str, Any]) -> list[str]:
    """The BPF_PROG_TEST_RUN table: ns above the floor per path, xlb and Katran."""
    floor = float(dp.get("floor_ns", 0.0))
    kat = (dp.get("katran") or {}).get("paths") or {}
    ratio = dp.get("ratio_to_katran") or {}
    lru = dp.get("lru_reference") or {}
    kinfo = dp.get("katran") or {}
    lines = [
        f"Data plane (`python -m bench.bench_dataplane`), run of {_env(dp)}: ns per packet "
        f"through `BPF_PROG_TEST_RUN` above a swap-MACs/XDP_TX floor of {floor:.0f} ns, "
        f"median (min-max) of {dp.get('runs')} interleaved runs of "
        f"{dp.get('packets_per_run', 0):,} packets, a connection table of "
        f"{dp.get('conn_table_slots', 0):,} slots.",
    ]
    if kat:
        lines.append(
            f"Katran: commit `{str(kinfo.get('commit', '?'))[:12]}` built by "
            f"bench/katran/build.sh, its per-CPU LRU maps for {kinfo.get('lru_size', 0):,} "
            "entries, the same VIPs, backends and rings, measured in the same runs.")
    else:
        lines.append(f"Katran was not measured in this run ({kinfo.get('absent', '')}).")
    lines.append("")
    head = "| path | xlb |" + (" Katran | xlb / Katran |" if kat else "") \
        + " kernel LRU hash alone |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in (dp.get("paths") or {}).items():
        cols = [PATH_LABELS.get(name, name), _cell(row, floor)]
        if kat:
            cols += [_cell(kat.get(name), floor),
                     f"{ratio[name]:.2f}" if name in ratio else "-"]
        ref = lru.get(name)
        cols.append(f"{ref['above_floor_ns']:.0f}" if ref else "-")
        lines.append("| " + " | ".join(cols) + " |")
    if ratio:
        over = [f"{PATH_LABELS.get(n, n)} ({r:.2f})" for n, r in ratio.items() if r > GOAL]
        lines += ["", f"Paths above {GOAL}x Katran's cost in this run: "
                  + ("; ".join(over) if over else "none") + "."]
    return lines


def curves_section(cv: dict[str, Any]) -> list[str]:
    """The cost curves: ns above the floor against table fill and backends per VIP."""
    lines = [f"Cost curves (`python -m bench.bench_curves`), run of {_env(cv)}: ns above the "
             "floor, median of interleaved runs."]
    subjects = [s for s in ("xlb", "katran") if s in cv.get("fill", {})]
    paths = cv.get("paths") or ["ack_v4_shuffled", "syn_v4"]
    cols = [f"{s} {p}" for p in paths for s in subjects]
    for curve, key, label in (("fill", "levels", "table fill"),
                              ("backends", "counts", "backends per VIP")):
        data = cv.get(curve) or {}
        if not data.get(key):
            continue
        lines += ["", f"| {label} | " + " | ".join(cols) + " |",
                  "|" + "---|" * (len(cols) + 1)]
        for i, x in enumerate(data[key]):
            xs = f"{x:.0%}" if curve == "fill" else f"{x:,}"
            if curve == "fill" and "xlb" in data.get("occupancy", {}):
                xs += f" (xlb {data['occupancy']['xlb'][i]:.0%} occupied)"
            vals = [f"{data[s][p][i]:.0f}" for p in paths for s in subjects]
            lines.append(f"| {xs} | " + " | ".join(vals) + " |")
    return lines


def forwarding_section(fwd: dict[str, Any]) -> list[str]:
    """The trafgen lab: Mpps and the ratio to the floor by CPU time; multi-core scaling."""
    lines = [f"Forwarding on veth (`python -m bench.bench_forwarding`), run of {_env(fwd)}: "
             "trafgen, 64-byte UDP, one sender CPU unless said; \"vs floor\" is by CPU time "
             "per packet of the sending CPU, which runs the whole path.", "",
             "| scenario | Mpps | vs floor (CPU time) | sender-CPU ns per packet |",
             "|---|---|---|---|"]
    for name, sc in (fwd.get("scenarios") or {}).items():
        ratio = "1.00" if name == "fwd_floor" else str(sc.get("ratio_to_floor_cpu", "-"))
        lines.append(f"| {FWD_LABELS.get(name, name)} | {sc.get('mpps', 0):.3f} | {ratio} | "
                     f"{sc.get('ns_per_packet') or 0:.0f} |")
    for name, why in (fwd.get("skipped") or {}).items():
        lines.append(f"| {FWD_LABELS.get(name, name)} | - | skipped: {why} | - |")
    mc = fwd.get("multicore") or {}
    if mc:
        lines += ["", "Multi-core: two sender CPUs, each with its own veth RX/TX queue pair.", "",
                  "| program | 1 CPU, Mpps | 2 CPUs, Mpps | scaling |", "|---|---|---|---|"]
        for name, row in mc.items():
            lines.append(f"| {FWD_LABELS.get(name, name)} | {row.get('mpps_1cpu', 0):.3f} | "
                         f"{row.get('mpps_2cpu', 0):.3f} | x{row.get('scaling')} |")
    return lines


def render(results: Path) -> str:
    """The section's text (markers included) from the results in `results`."""
    parts: list[list[str]] = []
    for name, fn in (("dataplane", dataplane_section), ("curves", curves_section),
                     ("forwarding", forwarding_section)):
        fig = _load(results / f"{name}.json")
        if fig is None:
            parts.append([f"({name}.json not found: `make bench` makes it.)"])
        else:
            parts.append(fn(fig))
    body = "\n\n".join("\n".join(p) for p in parts)
    return (f"{BEGIN}\n_Generated by `make bench-readme` from bench/results/*.json; "
            "shared 2-core VM: compare within one run, not across days._\n\n"
            f"{body}\n{END}")


def update(readme: Path, results: Path) -> bool:
    """Rewrite the marked section of `readme`; returns whether it changed."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: the markers are missing:\n{BEGIN}\n{END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + render(results) + tail
    if new == text:
        return False
    readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) the README's benchmark section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    a = ap.parse_args(argv)
    if a.check:
        text = a.readme.read_text()
        start, end = text.find(BEGIN), text.find(END)
        current = text[start:end + len(END)] if start >= 0 and end >= 0 else ""
        return 0 if current == render(a.results) else 1
    changed = update(a.readme, a.results)
    print(f"{a.readme}: {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
