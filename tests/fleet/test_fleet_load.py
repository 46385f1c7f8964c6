"""Many writers over three hosts, a 3-member etcd losing a member, a writer killed by -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lb.config import EtcdConfig
from lb.control.facade import ControlPlane
from lb.control.model import BackendUpdate
from lb.fleet.members import EtcdCluster
from lb.fleet.state import etcd_store
from tests.fleet.conftest import WRITER_CONFIG, Fleet, StateDir, wait_for
from tests.fleet.test_state import assert_same_everywhere, be, vip

pytestmark = [pytest.mark.bpf]

CLIENTS = 20
CHANGES = 50
VIPS = 4


def _addr(t: int, j: int) -> str:
    return f"198.18.{10 + j}.{t + 1}"


def _run_client(cp: ControlPlane, t: int, errors: list[BaseException]) -> None:
    # Client t owns backends _addr(t, 0) (always there, its weight moves) and _addr(t, 1)
    # (added and removed in turn) on VIP t % VIPS.
    vid = f"tcp:198.18.0.10:{80 + t % VIPS}"
    try:
        for k in range(CHANGES):
            if k % 2 == 0:
                cp.update_backend(vid, _addr(t, 0), BackendUpdate(weight=k + 1))
            elif k % 4 == 1:
                cp.add_backend(vid, be(_addr(t, 1), k + 1))
            else:
                cp.remove_backend(vid, _addr(t, 1))
    except BaseException as e:
        errors.append(e)


def test_twenty_clients_over_three_hosts_end_with_exactly_their_changes(fleet: Fleet) -> None:
    hosts = [fleet.start(i) for i in range(3)]
    for j in range(VIPS):
        hosts[0].create_vip(vip(80 + j, *[_addr(t, 0) for t in range(j, CLIENTS, VIPS)]))
    wait_for(fleet.converged, what="the VIPs on every host")
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_run_client, args=(hosts[t % 3], t, errors))
               for t in range(CLIENTS)]
    start = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(240)
    took = time.monotonic() - start
    assert not errors, errors[:3]
    assert_same_everywhere(fleet)
    for t in range(CLIENTS):
        got = {str(b.address): b.weight
               for b in hosts[t % 3].get_vip(f"tcp:198.18.0.10:{80 + t % VIPS}").backends
               if str(b.address) in (_addr(t, 0), _addr(t, 1))}
        # Last changes: k=48 set the weight of backend 0 to 49, k=49 added backend 1 (50).
        assert got == {_addr(t, 0): 49, _addr(t, 1): 50}, f"client {t}: {got}"
    # Each acknowledged change is one generation (VIP creations included), but the first
    # weight change of each client sets the weight it already has (1): no change.
    assert hosts[1].generation == VIPS + CLIENTS * (CHANGES - 1)
    turns = [fleet.store(i).turns_taken for i in range(3)]
    print(f"{CLIENTS * CHANGES} changes over 3 hosts in {took:.1f} s (write turns taken: {turns})")


def test_three_member_etcd_loses_one_member_and_writes_go_on(
    tmp_path: Path, etcd3: EtcdCluster
) -> None:
    fleet = Fleet(tmp_path, etcd3, None)
    try:
        a, b, c = (fleet.start(i) for i in range(3))
        a.create_vip(vip(80, "198.18.1.1"))
        wait_for(fleet.converged, what="the VIP on every host")
        # Every client talks to the first endpoint first: kill that member.
        etcd3.members[0].kill()
        for n in range(2, 6):
            b.add_backend("tcp:198.18.0.10:80", be(f"198.18.1.{n}"))
        c.add_backend("tcp:198.18.0.10:80", be("198.18.1.9"))
        wait_for(fleet.converged, 15, "every host after losing a member")
        assert len(a.get_vip("tcp:198.18.0.10:80").backends) == 6
        states = [fleet.hosts[i].get_state() for i in range(3)]
        assert states[0] == states[1] == states[2]
        assert all(fleet.store(i).status().writable for i in range(3))
    finally:
        fleet.close()


WRITER = Path(__file__).with_name("writer_child.py")


def test_kill_9_of_a_writer_loses_no_acknowledged_change(tmp_path: Path,
                                                         etcd: EtcdCluster) -> None:
    cfg = {"endpoints": etcd.endpoints, "host_name": "lb0"}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(tmp_path / "lb0"), json.dumps(cfg)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ACK "):
                acked.append(int(line.split()[1]))
                if len(acked) == 40:
                    os.kill(proc.pid, signal.SIGKILL)  # in the middle of its writes
                    break
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert len(acked) == 40
    # Another host reads the fleet's state: every acknowledged backend is there.
    state = tmp_path / "lb1"
    cp = ControlPlane(StateDir(state), None, config=WRITER_CONFIG,
                      store=etcd_store(state, EtcdConfig(endpoints=etcd.endpoints,
                                                         host_name="lb1")))
    try:
        have = {str(b.address) for b in cp.get_vip("tcp:198.18.0.10:80").backends}
        lost = [k for k in acked if f"198.18.{20 + k // 200}.{1 + k % 200}" not in have]
        assert not lost, f"acknowledged changes lost: {lost}"
    finally:
        cp.close()
    # The killed writer's own copy restarts too, and catches up with etcd.
    again = ControlPlane(StateDir(tmp_path / "lb0"), None, config=WRITER_CONFIG,
                         store=etcd_store(tmp_path / "lb0", EtcdConfig(
                             endpoints=etcd.endpoints, host_name="lb0")))
    try:
        assert {str(b.address) for b in again.get_vip("tcp:198.18.0.10:80").backends} == have
    finally:
        again.close()
