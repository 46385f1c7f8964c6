"""Control-plane benchmark: one durable change, and convergence after a shared backend goes.

    python -m bench.bench_controlplane [--smoke]

- ``apply_change_ms``: median time of one ControlPlane call that adds or removes one backend
  on a VIP with 100 backends at ring 65537, everything included: validation, the SQLite
  transaction with fsync (synchronous=FULL, WAL) on the disk holding the state directory,
  the Maglev ring build, the slot diff and the batched map writes.
- ``converge_100x100_s``: 100 VIPs with 100 backends each (99 own, one shared by all); time
  from asking for the shared backend's removal in one change (``apply_state``) until every
  ring is rewritten and the change is durable. Also measured: the same removal as 100
  separate durable calls (``converge_100x100_sequential_s``).
- ``restart_100x100_s``: starting a control plane on that state with the maps already
  programmed (load the store, read every ring back in batches, compare).

Runs on the real maps of the balancer (BCC), loaded with max_vips=101. The machine is shared
(2 cores), so the figures are noisy: compare runs side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lb.config import DataplaneConfig
from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, State, VipSpec
from lb.control.store import Store

NAME = "controlplane"
RING = 65537
BACKENDS = 100
VIPS = 100
CONFIG = DataplaneConfig(
    ring_size=RING, max_vips=VIPS + 1, max_reals=VIPS * BACKENDS + 64, conn_table_size=1024
)
SHARED = "198.19.255.254"


@dataclass(frozen=True)
class _Settings:
    state_dir: Path


def _say(msg: str) -> None:
    print(msg, flush=True)


def _vip(n: int, backends: list[str]) -> VipSpec:
    return VipSpec.model_validate({
        "protocol": "tcp", "address": f"198.18.{n // 250}.{n % 250 + 1}", "port": 80,
        "backends": [{"address": a} for a in backends],
    })


def _own(n: int, count: int) -> list[str]:
    # Backend k of VIP n, distinct across VIPs: 198.19.<n>.<k+1> (VIP 0..100, k < 250).
    return [f"198.19.{n}.{k + 1}" for k in range(count)]


def _load_maps() -> tuple[Any, str]:
    """The balancer, and what was measured on."""
    from lb.dataplane.loader import Balancer

    return Balancer(CONFIG), "balancer"


def _fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "median_ms": round(statistics.median(xs) * 1e3, 3),
        "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1e3, 3),
        "min_ms": round(xs[0] * 1e3, 3),
    }


def bench_apply_change(cp: ControlPlane, reps: int) -> dict[str, Any]:
    """Add/remove one backend on a VIP with 100 backends, alternately."""
    vip = cp.create_vip(_vip(VIPS, _own(VIPS, BACKENDS)))
    extra = BackendSpec.model_validate({"address": "198.19.254.1"})
    adds: list[float] = []
    removes: list[float] = []
    for i in range(2 * reps):
        t0 = time.perf_counter()
        if i % 2 == 0:
            cp.add_backend(vip.id, extra)
            adds.append(time.perf_counter() - t0)
        else:
            cp.remove_backend(vip.id, extra.identity)
            removes.append(time.perf_counter() - t0)
    assert cp.reconcile_errors == 0 and cp.verify() == [], "maps out of step with the state"
    cp.delete_vip(vip.id)
    return {"all": _ms(adds + removes), "add": _ms(adds), "remove": _ms(removes),
            "changes": len(adds) + len(removes)}


def bench_parts(state_dir: Path, reps: int) -> dict[str, float]:
    """Where one change's time goes: the durable store alone and the ring build alone."""
    from lb.control import maglev
    from lb.control.model import Limits

    store = Store(state_dir / "parts", Limits.from_config(CONFIG))
    a = _vip(0, _own(0, BACKENDS))
    b = _vip(0, _own(0, BACKENDS + 1))
    commits: list[float] = []
    builds: list[float] = []
    for i in range(reps):
        t0 = time.perf_counter()
        store.commit([a if i % 2 else b])
        commits.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        maglev.build_ring([maglev.Endpoint(x.identity) for x in (a if i % 2 else b).backends],
                          RING)
        builds.append(time.perf_counter() - t0)
    store.close()
    return {"store_commit_median_ms": _ms(commits)["median_ms"],
            "ring_build_median_ms": _ms(builds)["median_ms"]}


def bench_converge(cp: ControlPlane, sequential: bool) -> dict[str, Any]:
    """Remove the backend shared by 100 VIPs x 100 backends; time until all rings are right."""
    vips = [_vip(n, [*_own(n, BACKENDS - 1), SHARED]) for n in range(VIPS)]
    t0 = time.perf_counter()
    cp.apply_state(State(vips=vips))
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    if sequential:
        for v in vips:
            cp.remove_backend(v.id, SHARED)
    else:
        after = [v.model_copy(update={"backends": v.backends[:-1]}) for v in vips]
        plan = cp.apply_state(State(vips=after))
        assert len(plan.changed_vips) == VIPS
    took = time.perf_counter() - t0
    drifts = cp.verify()
    assert cp.reconcile_errors == 0 and drifts == [], f"maps out of step: {drifts[:3]}"
    cp.apply_state(State(vips=[]))
    return {"seconds": round(took, 3), "setup_s": round(setup, 3)}


def bench_restart(maps: Any, state_dir: Path) -> float:
    """Start a control plane on 100 VIPs x 100 backends already in the store and the maps."""
    cp = ControlPlane(_Settings(state_dir), maps)
    cp.apply_state(State(vips=[_vip(n, [*_own(n, BACKENDS - 1), SHARED]) for n in range(VIPS)]))
    cp.close()
    t0 = time.perf_counter()
    again = ControlPlane(_Settings(state_dir), maps)  # load, read every ring back, diff
    took = time.perf_counter() - t0
    assert again.in_sync and again.verify() == [], "restart left the maps out of step"
    again.apply_state(State(vips=[]))
    again.close()
    return round(took, 3)


def _write(figures: dict[str, Any]) -> Path:
    try:
        from bench.common import environment, merge_results
    except ImportError:
        out = Path(__file__).resolve().parent / "results" / f"{NAME}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        old: dict[str, Any] = {}
        if out.exists():
            old = json.loads(out.read_text())
        out.write_text(json.dumps({**old, **figures}, indent=2) + "\n")
        return out
    figures["env"] = environment()
    return Path(merge_results(NAME, figures))


def main(smoke: bool = False) -> dict[str, Any]:
    """Run the benchmark, merge bench/results/controlplane.json, return the figures."""
    # Smoke: enough to show every path works, within its share of `make bench-smoke`.
    reps = 10 if smoke else 100
    _say(f"loading the balancer (ring {RING}, {CONFIG.max_vips} VIPs) ...")
    maps, loader = _load_maps()
    # The state goes to disk (not tmpfs): the fsync is part of what is measured.
    base = Path(tempfile.mkdtemp(prefix="xlb-bench-cp-", dir="/var/tmp"))
    try:
        cp = ControlPlane(_Settings(base / "state"), maps)
        _say(f"one change, VIP with {BACKENDS} backends, {2 * reps} changes ...")
        change = bench_apply_change(cp, reps)
        parts = bench_parts(base, reps)
        _say(f"{VIPS} VIPs x {BACKENDS} backends, shared backend removed in one change ...")
        one = bench_converge(cp, sequential=False)
        seq: dict[str, Any] = {"seconds": None}
        if not smoke:
            _say("... and as 100 separate changes ...")
            seq = bench_converge(cp, sequential=True)
        cp.close()
        restart: float | None = None
        if not smoke:
            _say("restart on 100 VIPs x 100 backends ...")
            restart = bench_restart(maps, base / "restart")
        fs = _fs_type(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        maps.close()
    figures: dict[str, Any] = {
        "apply_change_ms": change["all"]["median_ms"],
        "converge_100x100_s": one["seconds"],
        "converge_100x100_sequential_s": seq["seconds"],
        "apply_change": change,
        "apply_change_parts": parts,
        "converge_100x100": one,
        "restart_100x100_s": restart,
        "method": {
            "ring_size": RING, "backends_per_vip": BACKENDS, "vips": VIPS,
            "maps": loader, "state_fs": fs, "sqlite": "WAL, synchronous=FULL",
            "statistic": "median over alternating add/remove calls, each durable",
            "cpus": os.cpu_count(),
        },
        "smoke": smoke,
    }
    path = _write(figures)
    rows = [
        ("one change (add/remove 1 of 100), median", f"{figures['apply_change_ms']:.2f} ms"),
        ("  p90", f"{change['all']['p90_ms']:.2f} ms"),
        ("  of which durable store commit", f"{parts['store_commit_median_ms']:.2f} ms"),
        ("  of which ring build (65537, 100)", f"{parts['ring_build_median_ms']:.2f} ms"),
        ("100x100 shared backend out, one change", f"{one['seconds']:.3f} s"),
    ]
    if not smoke:
        rows += [
            ("100x100 shared backend out, 100 changes", f"{seq['seconds']:.3f} s"),
            ("restart on 100x100 (load, read back, diff)", f"{restart:.3f} s"),
        ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        _say(f"{label:<{width}}  {value:>10}")
    _say(f"wrote {path} (state on {fs}; shared 2-core machine: figures are noisy)")
    return figures


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--smoke", action="store_true", help="fewer repetitions")
    main(smoke=ap.parse_args().smoke)
