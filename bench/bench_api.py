"""REST API benchmark: the real daemon (`lbctl serve`) driven over loopback HTTP.

    python -m bench.bench_api [--smoke]

- ``add_backend_p50_ms`` / ``add_backend_p99_ms``: latency of POST /v1/vips/{id}/backends
  adding one backend to a VIP with 100 backends (ring 65537), seen by a client on loopback:
  HTTP, validation, the durable SQLite commit (WAL, synchronous=FULL, state on disk), the
  Maglev ring build, the slot diff and the map writes. Each add is followed by an untimed
  DELETE of the same backend, so every add meets 100 backends. 1,000 adds (100 in smoke).
- ``changes_per_s``: 10 VIPs x 10 backends, 8 clients (threads, one keep-alive connection
  each) sending PATCH weight changes as fast as answers come, for 10 s (2 s in smoke):
  successful changes per second. The daemon group-commits concurrent writes (one fsync
  and one map apply per group; each change is durable before it is answered), so this is
  the end-to-end rate of durable, applied changes.

The daemon is a separate process (`lbctl serve`, not attached to any interface, maps pinned
in a bpffs directory of this run, removed afterwards) so the client never shares its GIL.
The machine has 2 cores shared by the client, the daemon and anything else running: the
figures are noisy; compare runs side by side.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

NAME = "api"
RING = 65537
BPFFS = Path("/sys/fs/bpf")
TOKEN = "bench-token"
LBCTL = Path(sys.executable).with_name("lbctl")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """`lbctl serve` on a free loopback port, with its own state and pin directories."""

    def __init__(self, base: Path) -> None:
        self.port = _free_port()
        self.pin_dir = BPFFS / f"xlbbench{os.getpid()}"
        token_file = base / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(base),
            "XLB_STATE_DIR": str(base / "state"),
            "XLB_PIN_DIR": str(self.pin_dir),
            "XLB_DATAPLANE__RING_SIZE": str(RING),
            "XLB_DATAPLANE__MAX_VIPS": "16",
            "XLB_DATAPLANE__MAX_REALS": "2048",
            "XLB_DATAPLANE__CONN_TABLE_SIZE": "4096",
        }
        self.log = base / "daemon.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(LBCTL), "serve", "--port", str(self.port), "--token-file", str(token_file),
                 "--log-level", "warning"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_up(self, timeout: float = 60) -> None:
        """Until /healthz answers (not attached, so /readyz stays 503 by design)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + self.log.read_text())
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    c.close()
                    return
                c.close()
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("daemon did not come up:\n" + self.log.read_text())

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL if it lingers; remove its pins."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.pin_dir, ignore_errors=True)


class Client:
    """One keep-alive HTTP connection with the token."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers=self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.conn.close()


def _vip(n: int, backends: int) -> dict[str, Any]:
    return {
        "protocol": "tcp",
        "address": f"198.18.0.{n + 10}",
        "port": 80,
        "backends": [{"address": f"198.19.{n}.{k + 1}"} for k in range(backends)],
    }


def _percentile(sorted_ms: list[float], q: float) -> float:
    idx = min(len(sorted_ms) - 1, max(0, round(q * (len(sorted_ms) - 1))))
    return sorted_ms[idx]


def bench_add_backend(port: int, adds: int) -> dict[str, Any]:
    """Latency of adding one backend to a VIP with 100 backends (then removing it, untimed)."""
    c = Client(port)
    try:
        status, body = c.call("PUT", "/v1/state", {"vips": [_vip(0, 100)]})
        assert status == 200, body
        path = "/v1/vips/tcp:198.18.0.10:80/backends"
        samples: list[float] = []
        for i in range(adds):
            addr = f"198.20.{i // 250}.{i % 250 + 1}"
            t0 = time.perf_counter()
            status, body = c.call("POST", path, {"address": addr})
            samples.append((time.perf_counter() - t0) * 1000)
            assert status == 201, body
            status, body = c.call("DELETE", f"{path}/{addr}")
            assert status == 204, body
    finally:
        c.close()
    samples.sort()
    return {
        "requests": adds,
        "p50_ms": round(_percentile(samples, 0.50), 3),
        "p90_ms": round(_percentile(samples, 0.90), 3),
        "p99_ms": round(_percentile(samples, 0.99), 3),
        "max_ms": round(samples[-1], 3),
        "mean_ms": round(statistics.fmean(samples), 3),
    }


def bench_changes(port: int, seconds: float, clients: int = 8) -> dict[str, Any]:
    """Sustained weight changes per second from `clients` concurrent clients."""
    c = Client(port)
    status, body = c.call("PUT", "/v1/state", {"vips": [_vip(n, 10) for n in range(10)]})
    c.close()
    assert status == 200, body
    done = [0] * clients
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def work(t: int) -> None:
        cl = Client(port)
        i = 0
        start.wait()
        try:
            while time.monotonic() < stop_at[0]:
                n = (i * clients + t) % 10
                k = (i // 10 + t) % 10 + 1
                path = f"/v1/vips/tcp:198.18.0.{n + 10}:80/backends/198.19.{n}.{k}"
                status, _ = cl.call("PATCH", path, {"weight": i % 9 + 1})
                if status == 200:
                    done[t] += 1
                else:
                    errors[t] += 1
                i += 1
        finally:
            cl.close()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(clients)]
    for th in threads:
        th.start()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    start.wait()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - t0
    return {
        "clients": clients,
        "seconds": round(elapsed, 3),
        "changes": sum(done),
        "errors": sum(errors),
        "changes_per_s": round(sum(done) / elapsed, 1),
    }


def _write(figures: dict[str, Any]) -> Path:
    from bench.common import environment, merge_results

    figures["env"] = environment()
    return Path(merge_results(NAME, figures))


def main(smoke: bool = False, state_base: str = "/var/tmp", write: bool = True) -> dict[str, Any]:
    """Run the benchmark, merge bench/results/api.json, print a table, return the figures.

    `state_base` is where the daemon's state directory goes (default: on disk, as in
    production; /dev/shm shows what the same path costs without the disk's fsync).
    """
    adds = 100 if smoke else 1000
    seconds = 2.0 if smoke else 10.0
    base = Path(tempfile.mkdtemp(prefix="xlb-bench-api-", dir=state_base))
    daemon = Daemon(base)
    try:
        _say(f"starting lbctl serve (ring {RING}) ...")
        daemon.wait_up()
        _say(f"{adds} x add a backend to a VIP with 100 backends ...")
        add = bench_add_backend(daemon.port, adds)
        _say(f"10 VIPs x 10 backends, 8 clients changing weights for {seconds:.0f} s ...")
        rate = bench_changes(daemon.port, seconds)
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    figures: dict[str, Any] = {
        "add_backend_p50_ms": add["p50_ms"],
        "add_backend_p99_ms": add["p99_ms"],
        "changes_per_s": rate["changes_per_s"],
        "add_backend": add,
        "changes": rate,
        "method": {
            "ring_size": RING,
            "server": "lbctl serve (uvicorn, separate process), loopback TCP, keep-alive",
            "store": f"SQLite WAL, synchronous=FULL, in {state_base}",
            "cpus": os.cpu_count(),
        },
        "smoke": smoke,
    }
    path = _write(figures) if write else None
    rows = [
        ("add backend (VIP with 100), p50", f"{add['p50_ms']:.2f} ms", "<= 5 ms"),
        ("add backend (VIP with 100), p99", f"{add['p99_ms']:.2f} ms", "<= 20 ms"),
        ("changes/s, 10x10, 8 clients", f"{rate['changes_per_s']:.0f}", ">= 300"),
        ("  failed changes", str(rate["errors"]), "0"),
    ]
    width = max(len(r[0]) for r in rows)
    _say(f"{'figure':<{width}}  {'measured':>10}  target")
    for label, value, target in rows:
        _say(f"{label:<{width}}  {value:>10}  {target}")
    _say(f"wrote {path} (shared 2-core machine: figures are noisy)" if path else "not written")
    return figures


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--smoke", action="store_true", help="fewer requests, shorter run")
    ap.add_argument("--state-base", default="/var/tmp", help="parent of the state directory")
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/results")
    a = ap.parse_args()
    main(smoke=a.smoke, state_base=a.state_base, write=not a.no_write)
