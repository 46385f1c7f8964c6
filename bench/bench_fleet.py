"""Fleet benchmark: one desired state through etcd for three LB hosts.

    python -m bench.bench_fleet [--smoke]

- ``propagation``: time from a change's 2xx-equivalent on host A (the ControlPlane call
  returned: etcd committed it, A's maps carry it) until the maps of every other host carry
  it too (their watch delivered it, their local copy stored it, their maps were written);
  p50/p99 over >= 200 changes with N = 3 hosts, each change made on the next host in turn.
- ``changes_per_s``: durable changes per second with 8 client threads, through etcd spread
  over three hosts (each following the others' changes), through etcd on one host alone,
  and the same load on one host's SQLite store (the same maps).

etcd is one real member (Debian's etcd-server) started for the run on loopback with its
data on the same filesystem as the state directories; every host is a ControlPlane in this
process with its own state directory (and, outside --smoke, its own loaded balancer maps).
The machine is shared (2 cores): compare runs side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lb.config import DataplaneConfig, EtcdConfig
from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, VipSpec
from lb.fleet.members import EtcdCluster
from lb.fleet.state import EtcdStore, etcd_store

NAME = "fleet"
CONFIG = DataplaneConfig(ring_size=4099, max_vips=16, max_reals=256, conn_table_size=1024)
HOSTS = 3
CLIENTS = 8
VIP = "tcp:198.18.0.10:80"


@dataclass(frozen=True)
class _Settings:
    state_dir: Path


def _say(msg: str) -> None:
    print(msg, flush=True)


def _vip(port: int, n: int) -> VipSpec:
    return VipSpec.model_validate({
        "protocol": "tcp", "address": "198.18.0.10", "port": port,
        "backends": [{"address": f"198.18.1.{k + 1}"} for k in range(n)],
    })


def _be(i: int) -> BackendSpec:
    return BackendSpec.model_validate({"address": f"198.18.2.{i % 250 + 1}"})


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _maps(smoke: bool) -> list[Any]:
    if smoke:
        return [None] * HOSTS
    try:
        from lb.dataplane.loader import Balancer

        return [Balancer(CONFIG) for _ in range(HOSTS)]
    except Exception as e:  # no BCC: the control planes without maps
        _say(f"no balancer maps ({e}): measuring the control planes alone")
        return [None] * HOSTS


def _host(base: Path, i: int, cluster: EtcdCluster, maps: Any) -> ControlPlane:
    state = base / f"lb{i}"
    cfg = EtcdConfig(endpoints=cluster.endpoints, host_name=f"lb{i}")
    return ControlPlane(_Settings(state), maps, config=CONFIG, store=etcd_store(state, cfg))


def bench_propagation(hosts: list[ControlPlane], changes: int) -> dict[str, Any]:
    """Ack on one host -> maps applied on every host, per change."""
    stores = [h._store for h in hosts]
    assert all(isinstance(s, EtcdStore) for s in stores)
    lat: list[float] = []
    for k in range(changes):
        a = k % len(hosts)
        if k % 2 == 0:
            hosts[a].add_backend(VIP, _be(k // 2))
        else:
            hosts[a].remove_backend(VIP, str(_be(k // 2).address))
        acked = time.perf_counter()
        rev = stores[a].revision  # type: ignore[attr-defined]
        for j, s in enumerate(stores):
            if j != a and not s.wait_applied(rev, 10):  # type: ignore[attr-defined]
                raise RuntimeError(f"host {j} did not apply revision {rev} in 10 s")
        lat.append(time.perf_counter() - acked)
    return {
        "changes": changes,
        "p50_ms": round(statistics.median(lat) * 1e3, 3),
        "p99_ms": round(_pct(lat, 0.99) * 1e3, 3),
        "max_ms": round(max(lat) * 1e3, 3),
    }


def bench_throughput(hosts: list[ControlPlane], per_client: int) -> dict[str, Any]:
    """Durable changes per second from CLIENTS threads spread over `hosts`."""
    errors: list[BaseException] = []

    def client(t: int) -> None:
        cp = hosts[t % len(hosts)]
        vid = f"tcp:198.18.0.10:{1000 + t}"
        try:
            for k in range(per_client):
                if k % 2 == 0:
                    cp.add_backend(vid, BackendSpec.model_validate(
                        {"address": f"198.18.{3 + t}.{k % 200 + 1}"}))
                else:
                    cp.remove_backend(vid, f"198.18.{3 + t}.{(k - 1) % 200 + 1}")
        except BaseException as e:
            errors.append(e)

    for t in range(CLIENTS):
        vid = f"tcp:198.18.0.10:{1000 + t}"
        if vid not in {v.id for v in hosts[0].list_vips()}:
            hosts[0].create_vip(_vip(1000 + t, 2))
    threads = [threading.Thread(target=client, args=(t,)) for t in range(CLIENTS)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    took = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]!r}")
    n = CLIENTS * per_client
    return {"changes": n, "seconds": round(took, 3), "changes_per_s": round(n / took, 1)}


def main(smoke: bool = False) -> dict[str, Any]:
    """Run the fleet benchmark; returns (and writes) its figures."""
    changes = 40 if smoke else 240
    per_client = 10 if smoke else 60
    base = Path(tempfile.mkdtemp(prefix="xlb-bench-fleet-"))
    maps = _maps(smoke)
    try:
        with EtcdCluster(base / "etcd", 1) as cluster:
            hosts = [_host(base, i, cluster, maps[i]) for i in range(HOSTS)]
            try:
                hosts[0].create_vip(_vip(80, 8))
                for s in (h._store for h in hosts):
                    assert isinstance(s, EtcdStore)
                    s.wait_applied(s.revision, 5)
                _say(f"propagation over {changes} changes, {HOSTS} hosts ...")
                prop = bench_propagation(hosts, changes)
                _say(f"{CLIENTS} clients through etcd, spread over {HOSTS} hosts ...")
                spread = bench_throughput(hosts, per_client)
            finally:
                for h in hosts[1:]:
                    h.close()
            # Alone: the other hosts (in this process, on these 2 cores) no longer follow.
            try:
                _say(f"{CLIENTS} clients through etcd, one host ...")
                one = bench_throughput(hosts[:1], per_client)
            finally:
                hosts[0].close()
        _say(f"{CLIENTS} clients on one host's SQLite ...")
        sq = ControlPlane(_Settings(base / "sqlite"), maps[0], config=CONFIG)
        try:
            sqlite = bench_throughput([sq], per_client)
        finally:
            sq.close()
        fs = _fs_type(base)
    finally:
        for m in maps:
            if m is not None:
                m.close()
        shutil.rmtree(base, ignore_errors=True)
    figures: dict[str, Any] = {
        "propagation": prop,
        "changes_per_s": {"etcd_one_host": one, "etcd_three_hosts": spread, "sqlite": sqlite},
        "method": {
            "hosts": HOSTS, "clients": CLIENTS, "etcd": "1 member, loopback", "state_fs": fs,
            "maps": "balancer" if maps[0] is not None else "none (control planes only)",
            "cpus": os.cpu_count(),
        },
        "smoke": smoke,
        "summary": [
            {"name": "ack on A -> maps on all 3, p50", "value": prop["p50_ms"], "unit": "ms",
             "note": f"{prop['changes']} changes"},
            {"name": "ack on A -> maps on all 3, p99", "value": prop["p99_ms"], "unit": "ms",
             "note": "goal <= 100 ms"},
            {"name": "changes/s, 8 clients, etcd, 1 host", "value": one["changes_per_s"],
             "unit": "1/s", "note": "durable in etcd and the local copy"},
            {"name": "changes/s, 8 clients, etcd, 3 hosts", "value": spread["changes_per_s"],
             "unit": "1/s", "note": "races between hosts retried"},
            {"name": "changes/s, 8 clients, SQLite", "value": sqlite["changes_per_s"],
             "unit": "1/s", "note": "one host, for comparison"},
        ],
    }
    path = _write(figures)
    for r in figures["summary"]:
        _say(f"{r['name']:<40} {r['value']:>10} {r['unit']}")
    _say(f"wrote {path} (state on {fs}; shared 2-core machine: figures are noisy)")
    return figures


def _write(figures: dict[str, Any]) -> Path:
    from bench.common import environment, merge_results

    figures["env"] = environment()
    return Path(merge_results(NAME, figures))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--smoke", action="store_true", help="fewer changes, no maps")
    main(smoke=ap.parse_args().smoke)
