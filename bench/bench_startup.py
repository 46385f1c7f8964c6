"""Start-up benchmark: from `lbctl serve` to ready (/readyz 200), BCC compile included.

    python -m bench.bench_startup [--smoke]

The daemon runs as the service does (`lbctl serve --config ...`, a unix socket, a token
file), attached in generic mode to a veth in a namespace of the benchmark's own, with two
data-plane sizes: the defaults an installed /etc/xlb/xlb.toml gives (ring 65537 x 512 VIPs,
4M connection slots) and the lab's small ones. Per size:

- ``cold_s``: fresh pins (the pin directory removed first): compile, create and pin the
  maps, attach, open the store, serve.
- ``warm_s``: a restart over the pins the previous run left (maps adopted, the program
  replaced atomically): what a `systemctl restart` or a crash costs.
- ``compile_s``: the BCC compile and load alone, in a fresh process (no pins, no API; once;
  not in smoke runs).
- ``import_s``: `python -c "import xlb_api.main"`: the interpreter and the imports.

Cold and warm runs alternate (A/B) and the median of several is given (3 each, 1 in smoke),
since timings on a shared machine are noisy. Figures in bench/results/startup.json and a
table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import environment, merge_results
from lb.client import ApiClient, ApiError

NAME = "startup"
PREFIX = f"xbs{os.getpid() % 100000}"
NS = f"{PREFIX}-ns"
PINS = Path(f"/sys/fs/bpf/{PREFIX}")
IF = "bs0"
SIZES: dict[str, dict[str, int]] = {
    "default": {},
    "lab": {"ring_size": 16381, "max_vips": 16, "max_reals": 256, "conn_table_size": 65536},
}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Daemon:
    """`lbctl serve` in the namespace with its own files under `base`."""

    def __init__(self, base: Path, size: dict[str, int]) -> None:
        self.base = base
        self.socket = base / "api.sock"
        self.token = base / "token"
        self.token.write_text(secrets.token_urlsafe(32) + "\n")
        os.chmod(self.token, 0o600)
        dp = "".join(f"{k} = {v}\n" for k, v in size.items())
        self.config = base / "xlb.toml"
        self.config.write_text(
            f'interface = "{IF}"\nxdp_mode = "generic"\nstate_dir = "{base / "state"}"\n'
            f'pin_dir = "{PINS}"\n[dataplane]\n{dp}[runtime]\ngateway_mac = "02:00:00:00:00:fe"\n'
        )

    def time_to_ready(self, timeout: float = 600) -> float:
        """Start it, return the seconds until /readyz answered 200, stop it (SIGTERM)."""
        log = (self.base / "daemon.log").open("w")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{NS}", sys.executable, "-m", "lbctl", "serve",
             "--config", str(self.config), "--uds", str(self.socket), "--token-file",
             str(self.token), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        api = ApiClient(f"unix://{self.socket}", token_file=self.token, timeout=5)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("the daemon exited: "
                                       + (self.base / "daemon.log").read_text()[-2000:])
                if self.socket.exists():
                    with contextlib.suppress(OSError, ApiError):
                        if api.request("GET", "/readyz")[0] == 200:
                            return time.monotonic() - t0
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"not ready after {timeout} s")
                time.sleep(0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def _compile_s(size: dict[str, int]) -> float:
    code = ("import time; from lb.config import DataplaneConfig; "
            "from lb.dataplane.loader import Balancer; "
            f"c = DataplaneConfig(**{size!r}); t = time.monotonic(); b = Balancer(c); "
            "print(time.monotonic() - t); b.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    return float(out.split()[-1])


def _import_s() -> float:
    t = time.monotonic()
    subprocess.run([sys.executable, "-c", "import xlb_api.main"], check=True, timeout=120)
    return time.monotonic() - t


def main(smoke: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns (and records) its figures."""
    runs = 1 if smoke else 3
    sizes = {"lab": SIZES["lab"]} if smoke else SIZES
    base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    _sh("ip", "netns", "add", NS)
    figures: dict[str, Any] = {"env": environment(), "smoke": smoke, "runs": runs, "sizes": {}}
    try:
        _sh("ip", "-n", NS, "link", "add", IF, "type", "veth", "peer", "name", "bs1")
        for dev in (IF, "bs1", "lo"):
            _sh("ip", "-n", NS, "link", "set", dev, "up")
        for name, size in sizes.items():
            (base / name).mkdir()
            d = Daemon(base / name, size)
            cold: list[float] = []
            warm: list[float] = []
            for i in range(runs):
                shutil.rmtree(PINS, ignore_errors=True)
                cold.append(d.time_to_ready())
                warm.append(d.time_to_ready())
                _say(f"[startup] {name} run {i + 1}/{runs}: cold {cold[-1]:.2f} s, "
                     f"warm {warm[-1]:.2f} s")
            # Skipped in smoke runs (another 4 s).
            comp = [] if smoke else [_compile_s(size)]
            figures["sizes"][name] = {
                "config": size or "defaults (lb/settings.py)",
                "cold_s": round(statistics.median(cold), 2),
                "warm_s": round(statistics.median(warm), 2),
                "compile_s": round(statistics.median(comp), 2) if comp else None,
                "cold_runs_s": [round(x, 2) for x in cold],
                "warm_runs_s": [round(x, 2) for x in warm],
            }
        figures["import_s"] = round(statistics.median(_import_s() for _ in range(runs)), 2)
    finally:
        subprocess.run(["ip", "netns", "delete", NS], check=False)
        shutil.rmtree(PINS, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    figures["summary"] = [
        {"name": f"{n} {k.removesuffix('_s')}", "value": v[k], "unit": "s",
         "note": {"cold_s": "serve -> /readyz, fresh pins", "warm_s": "restart, pins adopted",
                  "compile_s": "BCC compile + load only"}[k]}
        for n, v in figures["sizes"].items() for k in ("cold_s", "warm_s", "compile_s")
        if v[k] is not None
    ] + [{"name": "import xlb_api.main", "value": figures["import_s"], "unit": "s",
          "note": "interpreter + imports"}]
    merge_results(NAME, figures)
    return figures


def _table(fig: dict[str, Any]) -> str:
    lines = [f"{'size':<9} {'cold s':>7} {'warm s':>7} {'compile s':>10}"]
    for n, v in fig["sizes"].items():
        lines.append(f"{n:<9} {v['cold_s']:>7} {v['warm_s']:>7} {v['compile_s']:>10}")
    lines.append(f"imports: {fig['import_s']} s; medians of {fig['runs']} runs (compile: one)")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    out = main(smoke=a.smoke)
    print(_table(out))
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, indent=1)[:2000])
