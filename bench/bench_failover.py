"""Failover benchmark: an LB host dies in a fleet lab; how long until the router and new
connections notice.

    python -m bench.bench_failover [--smoke]

A fleet lab (`lbctl lab up --lb-hosts 3`, 2 in smoke) with the same VIP on every host, the
router (BIRD, ECMP) learning it from each host's BGP speaker (hold time 3 s). Each run kills
one host at once and silently: its daemon and its speaker freeze (SIGSTOP: no FIN, no
withdrawal) and its XDP program leaves the interface (nothing forwards), so only the BGP hold
timer can notice (a `kill -9` of the speaker closes TCP and is noticed at once: not the case
that needs measuring). Then the host comes back (the speaker resumes, a new daemon with the
same command adopts it and attaches) before the next run. Meanwhile clients open new TCP
connections to the VIP all the time (4 threads, 0.25 s connect timeout, each a new source
port so a new ECMP choice).

- ``route_change_s``: from the death to the router's kernel route losing that nexthop.
- ``first_ok_s``: from the death to the first successful new connection through the hosts
  that remain (the death's share of flows fails until the route changes; the rest never do).
- ``last_failure_s``: from the death to the last failed new connection: the window in which
  new connections hashed to the dead host fail. It should end with the route change.
- ``failed_connections``: new connections that failed in that window.

Median of several runs (5, 2 in smoke), next to the configured hold time. The lab comes up
through the product's own CLI (bench never imports lb.lab) and is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lb.client import ApiClient
from lb.dataplane import netlink, netns

NAME = "failover"
PREFIX = f"xbf{os.getpid() % 100000}"
VIP = "198.18.0.10"
PORT = 80
HOLD_TIME_S = 3  # the lab's bgp.hold_time (lb.lab.network.LAB_HOLD_TIME)
RESULTS = Path(__file__).resolve().parent / "results"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _lbctl(*args: str, timeout: float = 600) -> str:
    r = subprocess.run([sys.executable, "-m", "lbctl", *args], capture_output=True, text=True,
                       timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"lbctl {' '.join(args)} failed: {r.stderr.strip() or r.stdout}")
    return r.stdout


def _nexthops(router_ns: str) -> list[str]:
    r = netns.run(router_ns, ["ip", "-j", "-4", "route", "show", VIP], check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    out: list[str] = []
    for route in json.loads(r.stdout):
        out += [route["gateway"]] if "gateway" in route else []
        out += [nh["gateway"] for nh in route.get("nexthops", []) if "gateway" in nh]
    return sorted(out)


def _gateway(ns: str) -> str:
    r = netns.run(ns, ["ip", "-j", "-4", "route", "show", "default"])
    return str(json.loads(r.stdout)[0]["gateway"])


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


class Prober:
    """Threads opening new TCP connections to the VIP from the client namespace."""

    def __init__(self, client_ns: str, workers: int = 4, timeout: float = 0.25) -> None:
        self.client_ns = client_ns
        self.timeout = timeout
        self.events: list[tuple[float, bool]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def __enter__(self) -> Prober:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def _run(self) -> None:
        with netns.entered(self.client_ns):
            while not self._stop.is_set():
                ok = True
                try:
                    with socket.create_connection((VIP, PORT), timeout=self.timeout):
                        pass
                except OSError:
                    ok = False
                with self._lock:
                    self.events.append((time.monotonic(), ok))
                time.sleep(0.005)


def _pid(f: Path) -> int:
    return int(f.read_text().split()[0])


def _kill_host(victim_ns: str, host_dir: Path) -> tuple[list[str], int]:
    """The host dies at once: its daemon and speaker freeze (no FIN, no withdrawal) and the
    program leaves the interface (nothing forwards). Returns the daemon's argv and BIRD's pid."""
    daemon = _pid(host_dir / "daemon.pid")
    argv = Path(f"/proc/{daemon}/cmdline").read_bytes().decode().split("\0")[:-1]
    bird = _pid(host_dir / "state" / "bgp" / "bird.pid")
    os.kill(daemon, signal.SIGSTOP)
    os.kill(bird, signal.SIGSTOP)
    netlink.xdp_detach(victim_ns, "lb0")
    return argv, bird


def _revive_host(victim_ns: str, host_dir: Path, argv: list[str], bird: int) -> None:
    """Back to life: the speaker resumes, a new daemon (same command) adopts it and attaches."""
    daemon = _pid(host_dir / "daemon.pid")
    os.kill(daemon, signal.SIGKILL)
    os.kill(bird, signal.SIGCONT)
    while netns.pid_alive(daemon):
        time.sleep(0.02)
    pid = netns.spawn(victim_ns, argv, log=host_dir / "daemon.log")
    (host_dir / "daemon.pid").write_text(f"{pid}\n")
    sock = host_dir / "xlb_api.sock"
    api = ApiClient(f"unix://{sock}", token_file=host_dir / "token", timeout=5)

    def ready() -> bool:
        with contextlib.suppress(Exception):
            return bool(sock.exists() and api.request("GET", "/readyz")[0] == 200)
        return False

    _wait(ready, 180, "the revived daemon is ready")


def one_run(router_ns: str, client_ns: str, victim_ns: str, victim_lb4: str, hosts: int,
            host_dir: Path) -> dict[str, Any]:
    """Kill one host, measure, bring it back; returns the figures of the run."""
    with Prober(client_ns) as probe:
        time.sleep(0.5)
        t0 = time.monotonic()
        argv, bird = _kill_host(victim_ns, host_dir)
        try:
            while victim_lb4 in _nexthops(router_ns):
                if time.monotonic() - t0 > 15:
                    raise RuntimeError("the router never dropped the dead host")
                time.sleep(0.005)
            route_change = time.monotonic() - t0
            time.sleep(1.0)
        finally:
            stop = time.monotonic()
    after = [(t - t0, ok) for t, ok in probe.events if t0 <= t <= stop]
    _revive_host(victim_ns, host_dir, argv, bird)
    # A failed attempt is stamped when it gives up: its own timeout after it started.
    fails = [t - probe.timeout for t, ok in after if not ok]
    oks = [t for t, ok in after if ok]
    _wait(lambda: len(_nexthops(router_ns)) == hosts, 60, "the host announced again")
    return {
        "route_change_s": round(route_change, 3),
        "first_ok_s": round(min(oks), 3) if oks else None,
        "last_failure_s": round(max(fails), 3) if fails else 0.0,
        "failed_connections": len(fails),
        "attempts": len(after),
    }


def main(smoke: bool = False, write: bool = True) -> dict[str, Any]:
    """Run the benchmark, write bench/results/failover.json, print a table, return figures."""
    hosts, runs = (2, 2) if smoke else (3, 5)
    _say(f"fleet lab {PREFIX}: {hosts} LB hosts, BGP hold time {HOLD_TIME_S} s ...")
    _lbctl("lab", "up", "--prefix", PREFIX, "--lb-hosts", str(hosts), "--backends", "2")
    results: list[dict[str, Any]] = []
    try:
        st = json.loads(_lbctl("lab", "status", "--prefix", PREFIX, "--json"))
        sockets = [Path(v["api_socket"]) for v in st["lb_hosts"].values()]
        body = {"vips": [{"protocol": "tcp", "address": VIP, "port": PORT,
                          "backends": [{"address": "198.18.11.2"}, {"address": "198.18.12.2"}]}]}
        for s in sockets:
            ApiClient(f"unix://{s}", token_file=s.parent / "token").request("PUT", "/v1/state",
                                                                            body)
        router_ns, client_ns = f"{PREFIX}-rt", f"{PREFIX}-cl"
        victim_ns = f"{PREFIX}-lb{hosts}"
        victim_lb4 = f"198.18.{1 + hosts}.2"
        _wait(lambda: len(_nexthops(router_ns)) == hosts, 30, "every host announced")
        for i in range(runs):
            r = one_run(router_ns, client_ns, victim_ns, victim_lb4, hosts, sockets[-1].parent)
            _say(f"run {i + 1}/{runs}: route change {r['route_change_s']:.2f} s, last failed "
                 f"connection {r['last_failure_s']:.2f} s, {r['failed_connections']} failed")
            results.append(r)
    finally:
        with contextlib.suppress(Exception):
            _lbctl("lab", "down", "--prefix", PREFIX, timeout=120)

    def med(key: str) -> float | None:
        vals = [r[key] for r in results if r[key] is not None]
        return round(statistics.median(vals), 3) if vals else None

    figures: dict[str, Any] = {
        "hold_time_s": HOLD_TIME_S,
        "route_change_median_s": med("route_change_s"),
        "first_ok_median_s": med("first_ok_s"),
        "last_failure_median_s": med("last_failure_s"),
        "failed_connections_median": med("failed_connections"),
        "runs": results,
        "method": {
            "lb_hosts": hosts,
            "death": "SIGSTOP of the host's daemon and BIRD, its XDP program detached (silent)",
            "router": "BIRD 2, ECMP (merge paths), fib_multipath_hash_policy=1",
            "probes": "4 threads, new TCP connection each, 0.25 s connect timeout",
            "cpus": os.cpu_count(),
        },
    }
    _say(f"hold time {HOLD_TIME_S} s: route change median {figures['route_change_median_s']} s,"
         f" first new connection {figures['first_ok_median_s']} s, last failure "
         f"{figures['last_failure_median_s']} s")
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{NAME}.json").write_text(json.dumps(
            {"env": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "kernel": os.uname().release},
             "figures": figures}, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--smoke", action="store_true")
    main(smoke=p.parse_args().smoke)
