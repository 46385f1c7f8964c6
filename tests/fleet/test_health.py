"""Health the fleet agrees on: one host's failing probes do not make its ring differ."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from lb.config import EtcdConfig
from lb.control.facade import ControlPlane
from lb.control.model import VipSpec
from lb.dataplane import netns as nsmod
from lb.fleet.members import EtcdCluster
from lb.fleet.node import FleetNode
from lb.health.manager import HealthManager
from tests.control.conftest import MapsOnly, clear_maps
from tests.fleet.conftest import FLEET_CONFIG, StateDir, dump, wait_for

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

VIP = "tcp:198.18.0.10:80"


@contextmanager
def listening(addresses: list[str]) -> Iterator[int]:
    """TCP listeners on these loopback addresses, one shared port; closed afterwards."""
    socks = []
    port = 0
    try:
        for a in addresses:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((a, port))
            port = s.getsockname()[1]
            s.listen(64)
            socks.append(s)
        stop = threading.Event()

        def accept(s: socket.socket) -> None:
            s.settimeout(0.1)
            while not stop.is_set():
                try:
                    c, _ = s.accept()
                    c.close()
                except OSError:
                    continue

        threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in socks]
        for t in threads:
            t.start()
        yield port
        stop.set()
        for t in threads:
            t.join(2)
    finally:
        for s in socks:
            s.close()


class Prober:
    """A HealthManager's loop in a thread of its own (in a namespace, if given)."""

    def __init__(self, hm: HealthManager, ns: str | None) -> None:
        self.hm = hm
        self.ns = ns
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        with ExitStack() as stack:
            if self.ns is not None:
                stack.enter_context(nsmod.entered(self.ns))
            asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        task = asyncio.create_task(self.hm.run())
        self._ready.set()
        await self._stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def stop(self) -> None:
        """Stop the probes."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


def _vip(port: int) -> VipSpec:
    return VipSpec.model_validate({
        "protocol": "tcp", "address": "198.18.0.10", "port": 80,
        "backends": [{"address": f"127.0.0.{n}"} for n in (1, 2, 3, 4)],
        "health_check": {"type": "tcp", "port": port, "interval_s": 0.2, "timeout_s": 0.2,
                         "rise": 1, "fall": 2, "max_down_fraction": 0.5},
    })


def test_one_hosts_failing_probes_leave_every_ring_identical(
    tmp_path: Path, etcd: EtcdCluster, host_maps: list[MapsOnly],
    netns: Callable[[str], str],
) -> None:
    blind = netns("blind")  # host 0 probes from here: nothing answers it
    with ExitStack() as stack, listening(["127.0.0.1", "127.0.0.2", "127.0.0.3"]) as port:
        nodes: list[FleetNode] = []
        controls: list[ControlPlane] = []
        for i in range(3):
            clear_maps(host_maps[i])
            state = tmp_path / f"lb{i}"
            node = FleetNode(state, _cfg(etcd, i))
            stack.callback(node.close)
            # Its backends are probed on 127.0.0.x: loopback backends allowed (test bed).
            cp = ControlPlane(StateDir(state), host_maps[i], config=FLEET_CONFIG,
                              store=node.store_factory, loopback_backends=True)
            stack.callback(cp.close)
            node.start(cp)
            nodes.append(node)
            controls.append(cp)
        controls[0].create_vip(_vip(port))
        hms = [HealthManager(cp, sync_interval=0.1, view=n.health)
               for cp, n in zip(controls, nodes, strict=True)]
        probers = [Prober(hm, blind if i == 0 else None) for i, hm in enumerate(hms)]
        for p in probers:
            stack.callback(p.stop)

        def rings_out() -> list[set[str]]:
            return [set(hm.snapshot()["vips"][0]["out"]) if hm.snapshot()["vips"] else {"?"}
                    for hm in hms]

        # 127.0.0.4 listens nowhere: every host sees it down, so it leaves every ring.
        # Host 0 sees all four down, the others only .4: the agreed view is .4 alone.
        wait_for(lambda: rings_out() == [{"127.0.0.4"}] * 3, 15,
                 "127.0.0.4 out of every ring, and only it")
        def local0() -> dict[str, str]:
            return {b["address"]: b["status"] for b in hms[0].snapshot()["vips"][0]["backends"]}

        # Host 0's own probes see every backend down; its ring still keeps .1-.3.
        wait_for(lambda: local0() == {f"127.0.0.{n}": "down" for n in (1, 2, 3, 4)}, 15,
                 "host 0 to see every backend down")
        assert rings_out() == [{"127.0.0.4"}] * 3, rings_out()
        wait_for(lambda: len({tuple(sorted(cp.ring_fingerprints().items()))
                              for cp in controls}) == 1, 10, "identical fingerprints")
        maps = [dump(host_maps[i], controls[i]) for i in range(3)]
        assert maps[0] == maps[1] == maps[2], "one host's failing probes changed its maps"
        # Fleet status names every host and no divergence.
        wait_for(lambda: len(nodes[1].status()["hosts"]) == 3, 10, "three hosts in status")
        wait_for(lambda: not nodes[1].status()["divergent"], 10, "no divergence")
        status = nodes[2].status()
        assert sorted(status["health_hosts"]) == ["lb0", "lb1", "lb2"]
        assert [h["host"] for h in status["hosts"]] == ["lb0", "lb1", "lb2"]


def _cfg(etcd: EtcdCluster, i: int) -> EtcdConfig:
    return EtcdConfig(endpoints=etcd.endpoints, host_name=f"lb{i}", timeout_s=1.0,
                      lease_ttl_s=3)
