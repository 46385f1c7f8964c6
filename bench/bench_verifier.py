"""The verifier's view of each program on the running kernel: how close to its limits we are.

    python -m bench.bench_verifier [--results-dir DIR]

For xdp_balancer, xdp_decap, tc_decap, tc_hc_encap and xdp_root as the product loads them: the
instructions the verifier processed (every path it walked; the kernel refuses a program past
1,000,000), the program's size after the verifier's rewrites (xlated) and once JITed, and the
load time (compile + verify). A change that creeps towards the limit shows here long before a
kernel refuses it. `make test-kernels` runs this inside each kernel of its matrix and merges
the figures into bench/results/verifier.json, one top-level key per kernel release.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import environment, merge_results
from lb.config import DataplaneConfig, RuntimeConfig
from lb.dataplane.chain import Root
from lb.dataplane.decap import Decap
from lb.dataplane.hcencap import HcEncap
from lb.dataplane.loader import Balancer, prog_info

# The verifier's limit on processed instructions (BPF_COMPLEXITY_LIMIT_INSNS) since 5.2.
INSNS_LIMIT = 1_000_000
INSN_BYTES = 8


def _figures(fd: int, load_s: float) -> dict[str, Any]:
    info = prog_info(fd)
    return {
        "insns_processed": info.verified_insns,
        "limit_pct": round(100.0 * info.verified_insns / INSNS_LIMIT, 1),
        "xlated_insns": info.xlated_len // INSN_BYTES,
        "jited_bytes": info.jited_len,
        "load_s": round(load_s, 2),
    }


def measure() -> dict[str, dict[str, Any]]:
    """Load each program once; program name -> figures (or {"error": ...})."""
    out: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    try:
        bal = Balancer(DataplaneConfig())
    except Exception as e:
        out["xdp_balancer"] = {"error": str(e)}
    else:
        out["xdp_balancer"] = _figures(bal.prog_fd, time.monotonic() - t0)
        bal.close()
    t0 = time.monotonic()
    try:
        dec = Decap()
    except Exception as e:
        out["xdp_decap"] = out["tc_decap"] = {"error": str(e)}
    else:
        load_s = time.monotonic() - t0
        out["xdp_decap"] = _figures(dec.xdp_fd, load_s)
        out["tc_decap"] = _figures(dec.tc_fd, load_s)
        dec.close()
    t0 = time.monotonic()
    try:
        hc = HcEncap(RuntimeConfig())
    except Exception as e:
        out["tc_hc_encap"] = {"error": str(e)}
    else:
        out["tc_hc_encap"] = _figures(int(hc.fn.fd), time.monotonic() - t0)
        hc.close()
    out["xdp_root"] = _root_figures()
    return out


def _root_figures() -> dict[str, Any]:
    # The XDP chain's root (docs/chain.md) needs its program array on a pin: a private
    # directory on bpffs, removed afterwards.
    pins = Path(f"/sys/fs/bpf/xlb-verifier-{os.getpid()}")
    t0 = time.monotonic()
    try:
        root = Root(pins)
    except Exception as e:
        return {"error": str(e)}
    finally:
        shutil.rmtree(pins, ignore_errors=True)
    try:
        return _figures(root.prog_fd, time.monotonic() - t0)
    finally:
        root.close()


def main(smoke: bool = False, results_dir: Path | None = None) -> dict[str, Any]:
    programs = measure()
    figures: dict[str, Any] = {
        platform.release(): {"env": environment(), "programs": programs},
    }
    path = merge_results("verifier", figures, results_dir)
    _table(programs)
    print(f"written: {path}")
    return figures


def _table(programs: dict[str, dict[str, Any]]) -> None:
    print(f"verifier on Linux {platform.release()} (limit {INSNS_LIMIT:,} processed insns)")
    print(f"{'program':<14} {'processed':>10} {'% limit':>8} {'xlated':>8} {'jited B':>8}"
          f" {'load s':>7}")  # fmt: skip
    for name, f in programs.items():
        if "error" in f:
            print(f"{name:<14} refused: {f['error']}")
            continue
        print(f"{name:<14} {f['insns_processed']:>10,} {f['limit_pct']:>8} "
              f"{f['xlated_insns']:>8,} {f['jited_bytes']:>8,} {f['load_s']:>7}")  # fmt: skip


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_verifier")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)
    figures = main(results_dir=args.results_dir)
    programs = next(iter(figures.values()))["programs"]
    return 1 if any("error" in f for f in programs.values()) else 0


if __name__ == "__main__":
    sys.exit(cli())
