"""`make bench` / `make bench-smoke`: every benchmark of the project, one table, one chart.

    python -m bench.run [--smoke] [--only forwarding,maglev,...]

Each benchmark module (`bench/bench_<name>.py`) exposes `main(smoke: bool) -> dict` and writes
its own `bench/results/<name>.json`. This runner calls each one in a child process of its own,
one after the other, so a benchmark's CPU load never overlaps another's measurement, a crash
in one (a BCC compile, a kernel error) is reported without losing the others, and a run that
overstays the budget is interrupted (SIGINT, so its cleanup runs). A module that does not
exist yet is skipped with a message; a module that fails makes the exit status non-zero.

Then it prints ONE summary table and draws bench/results/summary.png (bench/chart.py);
`make bench` then rewrites the README's benchmark section from the results (bench/readme.py).
With KATRAN_SRC=/path/to/katran, dataplane, curves and forwarding measure Katran beside xlb
(bench/katran/README.md) and get KATRAN_EXTRA_S more time; curves is left out of --smoke.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Run order: the quick, CPU-bound micro-benchmarks first, the load test on veth last.
MODULES = (
    "dataplane", "curves", "maglev", "controlplane", "api", "fleet", "startup", "forwarding",
)
# Time budgets in seconds (full run, smoke run), about 790 and 75 in all. A module may use
# its own share plus what the modules before it left unused, so one slow benchmark cannot
# starve the others; one that overstays is stopped and counted as failed.
SHARE_S: dict[str, tuple[float, float]] = {
    "dataplane": (110.0, 12.0),
    "curves": (90.0, 0.0),
    "maglev": (30.0, 3.0),
    "controlplane": (100.0, 12.0),
    "api": (80.0, 9.0),
    "fleet": (40.0, 6.0),
    # `lbctl serve` to /readyz, cold and warm (BCC compiles: ~5-10 s a start here).
    "startup": (100.0, 15.0),
    "forwarding": (240.0, 18.0),
}
# Modules the smoke run leaves out (two BCC compiles alone outlast a smoke share).
FULL_ONLY = frozenset({"curves"})
# With KATRAN_SRC, the modules that measure Katran too get this much more (full run).
KATRAN_EXTRA_S = {"dataplane": 60.0, "curves": 40.0, "forwarding": 40.0}
BUDGET_S = {False: sum(f for f, _ in SHARE_S.values()), True: sum(s for _, s in SHARE_S.values())}
STOP_GRACE_S = 15.0
# Per module: how many summary rows at most, so the table stays one screen.
MAX_ROWS = 12

# The child restores Python's SIGINT handler even when it was started with SIGINT ignored
# (a background job of a non-interactive shell), so that stopping it runs its cleanup
# (trafgen stopped, XDP detached, namespaces deleted). Not SIGTERM: pyroute2 stops its
# forked netns helpers with SIGTERM, and a raising handler would unwind the parent's stack
# (and its cleanup) inside them.
_CHILD = """
import json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from bench import bench_{name} as m
figures = m.main(smoke={smoke})
with open(sys.argv[1], "w") as f:
    json.dump(figures, f, default=str)
"""


@dataclass
class Outcome:
    """What running one benchmark module gave."""

    name: str
    status: str  # ok | skipped | failed
    seconds: float = 0.0
    message: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def module_exists(name: str) -> bool:
    """Whether bench/bench_<name>.py is there."""
    return importlib.util.find_spec(f"bench.bench_{name}") is not None


def run_module(name: str, smoke: bool, timeout_s: float) -> Outcome:
    """Run one benchmark's main() in a child process, within `timeout_s`."""
    if not module_exists(name):
        return Outcome(name, "skipped", message=f"bench/bench_{name}.py does not exist yet")
    if timeout_s <= 0:
        return Outcome(name, "failed", message="no time left in the run's budget")
    with tempfile.NamedTemporaryFile(prefix=f"xbench-{name}-", suffix=".json",
                                     delete=False) as f:
        out = Path(f.name)
    t0 = time.monotonic()
    # Children inherit stdout/stderr: their progress lines show as they come.
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(name=name, smoke=smoke), str(out)], cwd=ROOT
    )
    try:
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return Outcome(name, "failed", time.monotonic() - t0,
                           f"stopped after {timeout_s:.0f} s (over the run's time budget)")
        except KeyboardInterrupt:
            # The child got the same Ctrl-C (same process group): let it clean up.
            _stop(proc)
            raise
        secs = time.monotonic() - t0
        if rc != 0:
            return Outcome(name, "failed", secs, f"exited with status {rc} (see its output)")
        try:
            figures = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            return Outcome(name, "failed", secs, f"main() returned no readable figures: {e}")
        if not isinstance(figures, dict):
            return Outcome(name, "failed", secs, "main() did not return a dict")
        return Outcome(name, "ok", secs, figures=figures)
    finally:
        with contextlib.suppress(OSError):
            out.unlink()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Summary rows: (figure, value, unit, note).

Row = tuple[str, float | str, str, str]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def rows_forwarding(fig: dict[str, Any]) -> list[Row]:
    """Mpps per scenario; the note gives sender-CPU ns per packet and the ratios to the floor.

    The CPU-time ratio is the one to read on a shared machine: wall-clock Mpps drop whenever
    another process takes the sender's CPU, ns per packet of CPU actually used does not.
    """
    rows: list[Row] = []
    for name, sc in fig.get("scenarios", {}).items():
        parts = []
        if sc.get("ns_per_packet"):
            parts.append(f"{sc['ns_per_packet']:.0f} ns/pkt")
        if name != "fwd_floor":
            parts.append(f"floor x{sc.get('ratio_to_floor_cpu')} cpu, "
                         f"x{sc.get('ratio_to_floor')} wall")
        if sc.get("cpu_share") is not None:
            parts.append(f"cpu {sc['cpu_share']:.0%}")
        rows.append((name, sc.get("mpps", "?"), "Mpps", "; ".join(parts)))
    for name, why in fig.get("skipped", {}).items():
        rows.append((name, "-", "", f"skipped: {why}"))
    for name, mc in (fig.get("multicore") or {}).items():
        rows.append((f"{name} 2 cpus", mc.get("mpps_2cpu", "?"), "Mpps",
                     f"1 cpu {mc.get('mpps_1cpu')} Mpps: scaling x{mc.get('scaling')}"))
    t = fig.get("target") or {}
    if t.get("lb_native_to_floor_cpu") is not None:
        verdict = "met" if t.get("met") else "NOT met"
        rows.append(("lb_native / fwd_floor (target)", t["lb_native_to_floor_cpu"], "x",
                     f"by CPU time; goal >= {t.get('goal')}: {verdict}"))
    return rows


def rows_generic(fig: dict[str, Any]) -> list[Row]:
    """A module's own `summary` rows if it gives them, else its numeric leaves."""
    summary = fig.get("summary")
    if isinstance(summary, list):
        rows: list[Row] = []
        for r in summary:
            if isinstance(r, dict):
                rows.append((str(r.get("name", r.get("figure", "?"))), r.get("value", "?"),
                             str(r.get("unit", "")), str(r.get("note", ""))))
        return rows
    if isinstance(summary, dict):
        return [(k, v if _num(v) is not None else str(v), "", "") for k, v in summary.items()]
    flat: list[Row] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                if k in ("env", "method", "notes", "smoke"):
                    continue
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        elif _num(v) is not None:
            low = prefix.lower()
            unit = next((u for u in ("per_s", "mpps", "pps", "ns", "us", "ms", "s")
                         if low.endswith(f"_{u}") or low == u), "")
            flat.append((prefix, float(v), unit, ""))

    walk("", fig)
    return flat


ROWS = {"forwarding": rows_forwarding}


def summary_table(outcomes: list[Outcome]) -> str:
    """The one table: a block of rows per benchmark."""
    lines = [f"{'benchmark':<13} {'figure':<32} {'value':>9} {'unit':<5} note", "-" * 100]
    for o in outcomes:
        head = f"{o.name:<13}"
        if o.status != "ok":
            lines.append(f"{head} {o.status.upper()}: {o.message}")
            continue
        rows = ROWS.get(o.name, rows_generic)(o.figures)
        if not rows:
            lines.append(f"{head} (no figures)  [{o.seconds:.0f} s]")
        shown = rows[:MAX_ROWS]
        for i, (fig, val, unit, note) in enumerate(shown):
            v = f"{val:9.4g}" if isinstance(val, float | int) else f"{val!s:>9}"
            label = head if i == 0 else " " * 13
            lines.append(f"{label} {fig[:32]:<32} {v} {unit:<5} {note}".rstrip())
        if len(rows) > MAX_ROWS:
            lines.append(f"{'':13} ... {len(rows) - MAX_ROWS} more in "
                         f"bench/results/{o.name}.json")
        lines.append(f"{'':13} ({o.seconds:.0f} s)")
    return "\n".join(lines)


def parse_only(value: str | None) -> list[str]:
    """--only forwarding,bench_maglev -> ['forwarding', 'maglev'], in run order."""
    if not value:
        return list(MODULES)
    wanted = {v.strip().removeprefix("bench_") for v in value.split(",") if v.strip()}
    unknown = wanted - set(MODULES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(MODULES)}")
    return [m for m in MODULES if m in wanted]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns the exit status (1 if one failed)."""
    ap = argparse.ArgumentParser(description="Run every xlb benchmark; one table, one chart.")
    ap.add_argument("--smoke", action="store_true", help="short versions of all (<= 60 s)")
    ap.add_argument("--only", help="comma-separated benchmarks: " + ",".join(MODULES))
    ap.add_argument("--no-chart", action="store_true", help="skip bench/results/summary.png")
    args = ap.parse_args(argv)
    names = parse_only(args.only)
    if os.geteuid() != 0:
        _say("warning: not root; benchmarks that load BPF or build namespaces will fail")
    budget = BUDGET_S[args.smoke]
    if os.environ.get("KATRAN_SRC") and not args.smoke:
        budget += sum(KATRAN_EXTRA_S.values())
    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    allowed = 0.0
    for name in names:
        # This module's share plus whatever the ones before it left unused.
        allowed += SHARE_S[name][1 if args.smoke else 0]
        if os.environ.get("KATRAN_SRC") and not args.smoke:
            allowed += KATRAN_EXTRA_S.get(name, 0.0)
        left = allowed - (time.monotonic() - t0)
        if args.smoke and name in FULL_ONLY:
            outcomes.append(Outcome(name, "skipped", message="full run only (make bench)"))
            continue
        _say(f"--- {name} ({'smoke' if args.smoke else 'full'}, up to {left:.0f} s) ---")
        o = run_module(name, args.smoke, left)
        if o.status != "ok":
            _say(f"{name}: {o.status}: {o.message}")
        outcomes.append(o)
    total = time.monotonic() - t0
    print()
    print(f"xlb benchmarks ({'smoke' if args.smoke else 'full'}), {total:.0f} s; "
          "shared-machine figures: compare ratios within this run, not absolute values")
    print(summary_table(outcomes))
    if not args.no_chart:
        try:
            from bench.chart import draw

            png = draw(RESULTS, RESULTS / "summary.png")
            print(f"\nchart: {png.relative_to(ROOT)}")
        except Exception as e:  # the table above is the result; a chart failure is reported
            print(f"\nchart not drawn: {e}")
            outcomes.append(Outcome("chart", "failed", message=str(e)))
    failed = [o.name for o in outcomes if o.status == "failed"]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    if total > budget:
        print(f"warning: the run took {total:.0f} s, over its {budget:.0f} s budget")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
