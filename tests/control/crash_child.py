"""Child process of test_durability.py: runs the control plane on pinned maps until killed.

    python -m tests.control.crash_child run   STATE_DIR PIN_DIR   # apply OPS, print acks
    python -m tests.control.crash_child group STATE_DIR PIN_DIR   # concurrent writers
    python -m tests.control.crash_child purge-delete STATE_DIR PIN_DIR   # see _purge
    python -m tests.control.crash_child purge-swap   STATE_DIR PIN_DIR
    python -m tests.control.crash_child check STATE_DIR PIN_DIR   # restart, print JSON

`run` prints ``BEGIN k`` before and ``ACK k <generation>`` after the k-th change returned;
the test kills it (XLB_CRASH_AT, or SIGKILL from outside) and then runs `check`.

`group` creates GROUP_WRITERS VIPs (generation 1) of two backends, then runs one thread per
VIP whose k-th change sets the weight of the VIP's first backend to k + 1, printing
``BEGIN t k`` / ``ACK t k``; each store write prints ``WRITE <generation before> <after>``,
so the test sees groups of several changes go to disk at once.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from lb.config import DataplaneConfig
from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, BackendUpdate, State, VipSpec

CONFIG = DataplaneConfig(ring_size=4099, max_vips=16, max_reals=64, conn_table_size=65536)
VIP = "tcp:198.18.0.10:80"


def _vip(port: int, *backends: str) -> VipSpec:
    return VipSpec.model_validate({"protocol": "tcp", "address": "198.18.0.10", "port": port,
                                   "backends": [{"address": a} for a in backends]})


def _be(i: int) -> BackendSpec:
    return BackendSpec.model_validate({"address": f"198.18.2.{i}"})


def _ops() -> list[Callable[[ControlPlane], object]]:
    ops: list[Callable[[ControlPlane], object]] = [
        lambda cp: cp.create_vip(_vip(80, "198.18.1.1", "198.18.1.2", "198.18.1.3"))
    ]
    for i in range(1, 13):
        ops.append(lambda cp, i=i: cp.add_backend(VIP, _be(i)))
        if i % 4 == 0:
            ops.append(lambda cp, i=i: cp.create_vip(_vip(1000 + i, f"198.18.2.{i}",
                                                          "198.18.1.1")))
        if i % 5 == 0:
            ops.append(lambda cp, i=i: cp.remove_backend(VIP, f"198.18.2.{i - 2}"))
        if i % 6 == 0:
            ops.append(lambda cp, i=i: cp.update_backend(VIP, f"198.18.2.{i - 1}",
                                                         BackendUpdate(state="disabled")))
        if i == 9:
            ops.append(lambda cp: cp.delete_vip("tcp:198.18.0.10:1004"))
    return ops


#: The changes `run` applies, in order; change k bumps the generation to k.
OPS = _ops()


#: Concurrent writers of the `group` mode, each on its VIP (port GROUP_PORT + t).
GROUP_WRITERS = 6
GROUP_PORT = 2000


def _say(lock: threading.Lock, line: str) -> None:
    with lock:  # one write per line: threads never interleave inside a line
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _group(cp: ControlPlane) -> None:
    lock = threading.Lock()
    store = cp._store
    write = store.write

    def logged_write() -> None:
        before, after = store.generation, store.staged_generation
        write()
        _say(lock, f"WRITE {before} {after}")

    store.write = logged_write  # type: ignore[method-assign]
    # Two backends each, so that every weight change moves ring slots.
    cp.apply_state(State(vips=[_vip(GROUP_PORT + t, f"198.18.3.{t + 1}", f"198.18.4.{t + 1}")
                               for t in range(GROUP_WRITERS)]))

    def writer(t: int) -> None:
        for k in range(1, 1000):  # weights 2..1000: every change changes something
            _say(lock, f"BEGIN {t} {k}")
            cp.update_backend(f"tcp:198.18.0.10:{GROUP_PORT + t}", f"198.18.3.{t + 1}",
                              BackendUpdate(weight=k + 1))
            _say(lock, f"ACK {t} {k}")

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(GROUP_WRITERS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _purge(cp: ControlPlane, swap: bool) -> None:
    """Give a VIP and a backend connection-table slots, then free them (the test kills this
    process between taking them out of the maps and purging their slots).

    `purge-delete`: VIP 80 (backend .1.1) is deleted, VIP 81 (.1.2) stays. `purge-swap`:
    every VIP number is taken and VIP 80 is swapped for VIP 2000 in one change, which hands
    it VIP 80's number. Prints ``STALE <vip_num> <real_idx>`` (-1: that index stays in use)
    for the slots that must go, ``KEEP <vip_num> <real_idx> <n>`` for those that must stay.
    """
    from lb.dataplane.conntab import ConnTable
    from lb.dataplane.flowhash import Flow5

    others = [_vip(81, "198.18.1.2")]
    if swap:
        others = [_vip(1000 + i, "198.18.1.1") for i in range(CONFIG.max_vips - 1)]
    cp.apply_state(State(vips=[_vip(80, "198.18.1.1"), *others]))
    num, idx = cp.vip_number(VIP), cp.backend_index("198.18.1.1")
    keep_num = cp.vip_number(others[0].id)
    keep_idx = cp.backend_index(others[0].backends[0].identity)
    with ConnTable(cp._balancer) as t:  # type: ignore[arg-type]
        for sport in range(40000, 40020):
            t.insert(Flow5.of("198.18.2.1", "198.18.0.10", sport, 80, "tcp"), idx, num)
            t.insert(Flow5.of("198.18.2.1", "198.18.0.10", sport, others[0].port, "tcp"),
                     keep_idx, keep_num)
    print(f"STALE {num} {-1 if swap else idx}", flush=True)
    print(f"KEEP {keep_num} {keep_idx} 20", flush=True)
    if swap:
        cp.apply_state(State(vips=[_vip(2000, "198.18.1.1"), *others]))
    else:
        cp.delete_vip(VIP)


def _conns(cp: ControlPlane) -> list[list[int]]:
    """[vip_num, real_idx, slots] of every pair the connection table names."""
    from collections import Counter

    from lb.dataplane.conntab import ConnTable

    with ConnTable(cp._balancer) as t:  # type: ignore[arg-type]
        e = t.entries()
    pairs = Counter(zip(e.vip_num.tolist(), e.real_idx.tolist(), strict=True))
    return [[n, i, c] for (n, i), c in sorted(pairs.items())]


class _Settings:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir


def _control(state_dir: Path, pin_dir: Path) -> ControlPlane:
    from tests.control.conftest import MapsOnly

    return ControlPlane(_Settings(state_dir), MapsOnly(CONFIG, pin_dir=pin_dir))  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    """Entry point (see the module docstring)."""
    mode, state_dir, pin_dir = argv[0], Path(argv[1]), Path(argv[2])
    cp = _control(state_dir, pin_dir)
    if mode == "check":
        print(json.dumps({
            "generation": cp.generation,
            "state": cp.get_state().model_dump(mode="json"),
            "drifts": [d.model_dump() for d in cp.verify()],
            "in_sync": cp.in_sync,
            "conns": _conns(cp),
        }), flush=True)
        return 0
    if mode in ("purge-delete", "purge-swap"):
        _purge(cp, swap=mode == "purge-swap")
        print("DONE", flush=True)
        return 0
    if mode == "group":
        _group(cp)
        print("DONE", flush=True)
        return 0
    for k, op in enumerate(OPS, start=1):
        print(f"BEGIN {k}", flush=True)
        op(cp)
        print(f"ACK {k} {cp.generation}", flush=True)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
