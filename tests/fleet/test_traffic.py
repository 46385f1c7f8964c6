"""etcd stopped and restarted under traffic: the host forwards throughout, no flow moves."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.config import EtcdConfig
from lb.consts import XDP_TX
from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, VipSpec
from lb.dataplane.testrun import TestRunner
from lb.errors import XlbError
from lb.fleet.etcd import EtcdUnavailable
from lb.fleet.members import EtcdCluster
from lb.fleet.state import EtcdStore, etcd_store
from tests.conftest import TEST_CONFIG
from tests.control.conftest import StateSettings, clear_maps
from tests.fleet.conftest import wait_for

pytestmark = [pytest.mark.bpf]

VIP = "tcp:198.18.0.10:80"
FLOWS = 48


def _packet(i: int, syn: bool) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(Ether(src="02:00:00:00:00:aa", dst="02:00:00:00:00:01")
                 / IP(src=f"198.18.3.{i + 1}", dst="198.18.0.10")
                 / TCP(sport=41000 + i, dport=80, flags="S" if syn else "A"))


@pytest.fixture
def live(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The session balancer (program and maps), emptied before and after."""
    from lb.errors import KernelError

    try:
        b = request.getfixturevalue("balancer")
    except KernelError as e:
        pytest.skip(f"xdp/balancer/balancer.c does not load: {e}")
    clear_maps(b)
    yield b
    clear_maps(b)


def test_etcd_restart_under_traffic_moves_no_flow(
    live: Any, tmp_path: Path, etcd: EtcdCluster
) -> None:
    cfg = [EtcdConfig(endpoints=etcd.endpoints, host_name=f"lb{i}", timeout_s=0.5)
           for i in range(2)]
    lb0 = ControlPlane(StateSettings(tmp_path / "lb0"), live,
                       store=etcd_store(tmp_path / "lb0", cfg[0]))
    lb1 = ControlPlane(StateSettings(tmp_path / "lb1"), None, config=TEST_CONFIG,
                       store=etcd_store(tmp_path / "lb1", cfg[1]))
    try:
        lb1.create_vip(VipSpec.model_validate({
            "protocol": "tcp", "address": "198.18.0.10", "port": 80,
            "backends": [{"address": f"198.18.1.{n}"} for n in range(1, 5)]}))
        wait_for(lambda: [v.id for v in lb0.list_vips()] == [VIP], 10, "the VIP on lb0")
        runner = TestRunner(live.prog_fd)
        first = runner.run(_packet(0, True))
        if first.verdict != XDP_TX:
            pytest.skip(f"the balancer does not forward yet (verdict {first.verdict})")
        backend: dict[int, bytes] = {}
        for i in range(FLOWS):  # open every flow (SYN: the ring, then the conn table)
            r = runner.run(_packet(i, True))
            assert r.verdict == XDP_TX
            backend[i] = r.packet[30:34]
        bad: list[str] = []
        sent = [0]
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set() and len(bad) < 10:
                for i in range(FLOWS):
                    r = runner.run(_packet(i, False))
                    sent[0] += 1
                    if r.verdict != XDP_TX:
                        bad.append(f"flow {i}: verdict {r.verdict}")
                    elif r.packet[30:34] != backend[i]:
                        bad.append(f"flow {i} moved to {r.packet[30:34].hex()}")

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        try:
            etcd.members[0].kill()
            with pytest.raises(EtcdUnavailable):
                lb1.add_backend(VIP, BackendSpec.model_validate({"address": "198.18.1.9"}))
            time.sleep(1.0)
            etcd.members[0].start()
            etcd.wait_healthy()

            last: list[str] = []

            def added() -> bool:
                try:
                    lb1.add_backend(VIP, BackendSpec.model_validate({"address": "198.18.1.9"}))
                except XlbError as e:
                    last[:] = [f"{type(e).__name__}: {e.detail}"]
                    # The write etcd's death cut off may have committed before it died (its
                    # 503 says so): then the backend is there and this add is a conflict.
                    return any(str(b.address) == "198.18.1.9"
                               for b in lb1.get_vip(VIP).backends)
                return True

            try:
                wait_for(added, 15, "a write once etcd is back")
            except AssertionError as e:
                raise AssertionError(f"{e} (last refusal: {last})") from None
            s1 = lb1._store
            assert isinstance(s1, EtcdStore)
            wait_for(lambda: len(lb0.get_vip(VIP).backends) == 5, 10, "lb0 to catch up")
            time.sleep(0.3)  # traffic on the new ring too
        finally:
            stop.set()
            t.join(30)
        assert not bad, bad
        assert sent[0] > 500, f"too little traffic to judge: {sent[0]} packets"
        assert lb0.verify() == []
    finally:
        lb1.close()
        lb0.close()
        clear_maps(live)
