"""bench/results/summary.png: the benchmark figures a reader looks at first, in one image.

Panels: forwarded Mpps per scenario (forwarding.json) with each bar's ratio to the
forwarding floor; the protocol x frame size x sender-CPU matrix when the full run made it;
scaling from 1 to 2 sender CPUs (forwarding.json "multicore"); nanoseconds per packet per
program path, xlb beside Katran when it was measured (dataplane.json); the cost curves,
ns per packet against table fill and backends per VIP (curves.json). A panel whose results file is
missing says so instead of disappearing, so an empty chart is never mistaken for a slow one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SCENARIO_ORDER = (
    "drop_limit", "fwd_floor", "lb_native", "lb_one_flow", "katran_native", "katran_one_flow",
    "lb_generic", "lb_1m_flows", "syn_flood", "kernel_fwd",
)
_REFERENCE = {"drop_limit", "fwd_floor", "kernel_fwd"}
_NS_KEY = re.compile(r"^(ns|ns_per_(packet|pkt)|median_ns|ns_median|ns_pkt)$")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ns_per_path(data: dict[str, Any]) -> dict[str, float]:
    """{path: ns per packet} from dataplane.json, whatever nesting it uses for its paths."""
    best: dict[str, float] = {}

    def visit(node: Any) -> None:
        nonlocal best
        if not isinstance(node, dict):
            return
        found: dict[str, float] = {}
        for name, sub in node.items():
            if isinstance(sub, dict):
                for k, v in sub.items():
                    if _NS_KEY.match(str(k)) and isinstance(v, int | float):
                        found[str(name)] = float(v)
                        break
        if len(found) > len(best):
            best = found
        for k, sub in node.items():
            if k != "env":
                visit(sub)

    visit(data)
    return best


def _missing(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", fontsize=10, color="0.4",
            transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _capacity(sc: dict[str, Any]) -> float:
    ns = sc.get("ns_per_packet")
    return 1e3 / float(ns) if ns else 0.0


def _forwarding(ax: Any, fwd: dict[str, Any] | None) -> None:
    ax.set_title("Forwarding on veth: Mpps per sender CPU (bars) and measured Mpps (dots)",
                 fontsize=11)
    scen = (fwd or {}).get("scenarios", {})
    if not scen:
        _missing(ax, "no forwarding.json yet: make bench")
        return
    names = [n for n in SCENARIO_ORDER if n in scen]
    cap = [_capacity(scen[n]) for n in names]
    wall = [float(scen[n]["mpps"]) for n in names]
    colors = ["0.65" if n in _REFERENCE else "tab:blue" for n in names]
    y = list(range(len(names)))
    ax.barh(y, cap, color=colors)
    ax.plot(wall, y, "o", color="black", ms=5, label="measured Mpps (wall clock)")
    ax.set_yticks(y, [f"{n}\n{scen[n].get('traffic', '')}" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Mpps per sender CPU = 1000 / (sender-CPU ns per forwarded packet)")
    top = max(cap + wall) if names else 1.0
    for i, n in enumerate(names):
        r = scen[n].get("ratio_to_floor_cpu")
        label = f"{cap[i]:.2f}" + (f"  ({r:.0%} of floor)" if r and n != "fwd_floor" else "")
        ax.text(max(cap[i], wall[i]) + top * 0.015, i, label, va="center", fontsize=8)
    if "fwd_floor" in scen and _capacity(scen["fwd_floor"]):
        goal = float((fwd or {}).get("target", {}).get("goal", 0.95))
        x = _capacity(scen["fwd_floor"]) * goal
        ax.axvline(x, color="tab:red", ls="--", lw=1)
        ax.text(x, len(names) - 0.45, f" target: {goal:.0%} of floor", color="tab:red",
                fontsize=8, va="bottom")
    ax.set_xlim(0, top * 1.4)
    ax.legend(fontsize=8, loc="lower right")
    skipped = (fwd or {}).get("skipped") or {}
    if skipped:
        ax.text(0.99, 0.12, "skipped: " + ", ".join(skipped), transform=ax.transAxes,
                ha="right", fontsize=7, color="0.4")


def _matrix(ax: Any, fwd: dict[str, Any] | None) -> None:
    ax.set_title("Mpps per sender CPU by traffic: XDP_DROP / floor / balancer (same run)",
                 fontsize=11)
    rows = (fwd or {}).get("matrix") or []
    if not rows:
        _missing(ax, "matrix only in the full run (make bench)")
        return
    series = [("drop_limit", "0.75"), ("fwd_floor", "0.45"), ("lb_native", "tab:blue")]
    width = 0.27
    for j, (key, color) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        vals = [1e3 / float(r[f"{key}_ns"]) if r.get(f"{key}_ns") else 0.0 for r in rows]
        ax.bar(xs, vals, width, label=key, color=color)
    for i, r in enumerate(rows):
        if r.get("lb_to_floor_cpu"):
            ax.text(i + width, 0.02, f"{r['lb_to_floor_cpu']:.0%}", ha="center", fontsize=7,
                    color="white", rotation=90, va="bottom")
    ax.set_xticks(range(len(rows)), [r["traffic"].replace("/", "\n", 1) for r in rows],
                  fontsize=7)
    ax.set_ylabel("Mpps per sender CPU")
    ax.legend(fontsize=8, loc="upper right")


def _dataplane(ax: Any, dp: dict[str, Any] | None) -> None:
    ax.set_title("Balancer program per path (BPF_PROG_TEST_RUN), ns above the XDP_TX floor",
                 fontsize=11)
    paths = (dp or {}).get("paths") or {}
    if not paths or not all("above_floor_ns" in r for r in paths.values()):
        legacy = ns_per_path(dp) if dp else {}
        if not legacy:
            _missing(ax, "no ns-per-packet figures in dataplane.json yet")
            return
        paths = {n: {"above_floor_ns": v} for n, v in legacy.items()}
    kat = ((dp or {}).get("katran") or {}).get("paths") or {}
    names = list(paths)
    width = 0.4 if kat else 0.8
    xlb = [float(paths[n]["above_floor_ns"]) for n in names]
    ys = list(range(len(names)))
    ax.barh([y - (width / 2 if kat else 0) for y in ys], xlb, width, color="tab:green",
            label="xlb")
    top = max(xlb)
    if kat:
        kv = [float(kat[n]["above_floor_ns"]) if n in kat else 0.0 for n in names]
        ax.barh([y + width / 2 for y in ys], kv, width, color="tab:orange",
                label=f"Katran {str((dp or {}).get('katran', {}).get('commit', ''))[:10]}")
        top = max(top, *kv)
        for y, n in enumerate(names):
            r = (dp or {}).get("ratio_to_katran", {}).get(n)
            if r is not None:
                ax.text(max(xlb[y], kv[y]) + top * 0.01, y, f"x{r:.2f}", va="center",
                        fontsize=7)
    else:
        for y, v in enumerate(xlb):
            ax.text(v + top * 0.01, y, f"{v:.0f}", va="center", fontsize=8)
    ax.set_yticks(ys, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ns per packet above the floor (median of runs)")
    ax.set_xlim(0, top * 1.2 if top > 0 else 1.0)
    ax.legend(fontsize=8, loc="lower right")


def _multicore(ax: Any, fwd: dict[str, Any] | None) -> None:
    ax.set_title("Forwarding, 1 vs 2 sender CPUs (two veth queues): Mpps", fontsize=11)
    mc = (fwd or {}).get("multicore") or {}
    if not mc:
        _missing(ax, "multi-core only in the full run (make bench)")
        return
    names = list(mc)
    xs = range(len(names))
    one = [float(mc[n].get("mpps_1cpu") or 0) for n in names]
    two = [float(mc[n].get("mpps_2cpu") or 0) for n in names]
    ax.bar([x - 0.2 for x in xs], one, 0.4, color="0.6", label="1 CPU")
    ax.bar([x + 0.2 for x in xs], two, 0.4, color="tab:blue", label="2 CPUs")
    for x, n in zip(xs, names, strict=True):
        sc = mc[n].get("scaling")
        if sc:
            ax.text(x + 0.2, two[x], f"x{sc:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("Mpps (wall clock)")
    ax.legend(fontsize=8)


def _curves(ax: Any, cv: dict[str, Any] | None) -> None:
    ax.set_title("Cost curves: ns above floor vs table fill (solid) and backends (dashed)",
                 fontsize=11)
    if not cv or "fill" not in cv:
        _missing(ax, "no curves.json yet: make bench")
        return
    colors = {"xlb": "tab:green", "katran": "tab:orange"}
    fill, back = cv["fill"], cv.get("backends") or {}
    for s, color in colors.items():
        for p, marker in (("ack_v4_shuffled", "o"), ("syn_v4", "s")):
            if s in fill and p in fill[s]:
                ax.plot([x * 100 for x in fill["levels"]], fill[s][p], marker=marker,
                        color=color, label=f"{s} {p} / fill %")
    ax.set_xlabel("connection table fill, % of capacity")
    ax.set_ylabel("ns above floor")
    if back.get("counts"):
        ax2 = ax.twiny()
        for s, color in colors.items():
            for p, marker in (("ack_v4_shuffled", "o"), ("syn_v4", "s")):
                if s in back and p in back[s]:
                    ax2.plot(back["counts"], back[s][p], marker=marker, ls="--", color=color,
                             alpha=0.6, label=f"{s} {p} / backends")
        ax2.set_xscale("log")
        ax2.set_xlabel("backends per VIP (log)", fontsize=8)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left", ncol=2)
    else:
        ax.legend(fontsize=7)


def draw(results: Path, out: Path) -> Path:
    """Draw the summary chart from the JSON files in `results` into `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fwd = _load(results / "forwarding.json")
    dp = _load(results / "dataplane.json")
    cv = _load(results / "curves.json")
    fig, axes = plt.subplots(5, 1, figsize=(10, 21),
                             gridspec_kw={"height_ratios": [1.3, 1.0, 0.8, 1.0, 1.0]})
    _forwarding(axes[0], fwd)
    _matrix(axes[1], fwd)
    _multicore(axes[2], fwd)
    _dataplane(axes[3], dp)
    _curves(axes[4], cv)
    env = (fwd or dp or {}).get("env") or {}
    stamp = " | ".join(str(env[k]) for k in ("date", "kernel", "cpu") if k in env)
    fig.suptitle("xlb benchmarks" + (f"  ({stamp})" if stamp else ""), fontsize=12)
    fig.text(0.5, 0.005, "Shared 2-core machine: absolute figures are noisy; compare bars "
             "within one run.", ha="center", fontsize=8, color="0.4")
    fig.tight_layout(rect=(0, 0.015, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
