"""The health manager on loopback backends: the ring follows health, the store does not."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, VipSpec
from lb.errors import KernelError
from lb.health.manager import TUNNEL_LOADING, HealthManager
from lb.health.policy import HealthCheck
from tests.control.conftest import StateSettings, clear_maps
from tests.health.conftest import Server, free_port

BACKENDS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
FAST = {"type": "tcp", "interval_s": 0.2, "timeout_s": 0.2, "fall": 2, "rise": 2,
        "jitter": 0.1, "flap_threshold": 0}


class Pool:
    """Loopback backends on one port that can be stopped and restarted."""

    def __init__(self, addrs: list[str]) -> None:
        self.port = free_port()
        self.servers: dict[str, Server | None] = {a: Server("tcp", host=a, port=self.port)
                                                  for a in addrs}

    def stop(self, addr: str) -> None:
        s = self.servers[addr]
        assert s is not None
        s.stop()
        self.servers[addr] = None

    def start(self, addr: str) -> None:
        self.servers[addr] = Server("tcp", host=addr, port=self.port)

    def close(self) -> None:
        for s in self.servers.values():
            if s is not None:
                s.stop()


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(BACKENDS)
    yield p
    p.close()


def _vip(port: int, n: int = 4, **check: Any) -> VipSpec:
    return VipSpec(
        protocol="tcp", address="198.18.0.10", port=port,
        backends=[BackendSpec(address=a) for a in BACKENDS[:n]],
        health_check=HealthCheck.model_validate({**FAST, **check}),
    )


async def _until(cond: Callable[[], bool], within: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def _run(cp: ControlPlane, body: Callable[[HealthManager], Awaitable[None]],
         **kwargs: Any) -> None:
    async def main() -> None:
        hm = HealthManager(cp, sync_interval=0.1, **kwargs)
        task = asyncio.create_task(hm.run())
        try:
            await _until(lambda: hm.started, 5, "manager start")
            await body(hm)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


def _out(hm: HealthManager, vip_id: str) -> set[str]:
    for v in hm.snapshot()["vips"]:
        if v["vip_id"] == vip_id:
            return set(v["out"])
    return set()


def test_failed_backend_leaves_and_returns_without_touching_the_store(
    tmp_path: Path, pool: Pool
) -> None:
    cp = ControlPlane(StateSettings(tmp_path), None, loopback_backends=True)
    vip = cp.create_vip(_vip(pool.port))
    gen = cp.generation
    check = vip.health_check
    assert check is not None

    async def body(hm: HealthManager) -> None:
        await asyncio.sleep(0.5)
        assert _out(hm, vip.id) == set()
        pool.stop("127.0.0.3")
        bound = check.fall * check.interval_s + 1
        await _until(lambda: _out(hm, vip.id) == {"127.0.0.3"}, bound, "out of the ring")
        eff = hm.overlay(cp.get_vip(vip.id))
        state = {b.identity: b.state for b in eff.backends}
        assert state["127.0.0.3"] == "draining", "a failed backend keeps its tracked flows"
        assert all(b.state == "active" for b in cp.get_vip(vip.id).backends), \
            "the stored desired state still says active"
        assert cp.generation == gen, "health transitions do not bump the generation"
        pool.start("127.0.0.3")
        await _until(lambda: not _out(hm, vip.id), 2 + check.rise * check.interval_s,
                     "back in the ring")
        kinds = [(e.backend, e.kind) for e in hm.events]
        assert ("127.0.0.3", "down") in kinds and ("127.0.0.3", "up") in kinds

    _run(cp, body)
    cp.close()


def test_safety_floor_and_all_down_keep_the_vip_served(tmp_path: Path, pool: Pool) -> None:
    cp = ControlPlane(StateSettings(tmp_path), None, loopback_backends=True)
    vip = cp.create_vip(_vip(pool.port))

    def held() -> set[str]:
        return {b["address"] for v in hm_ref[0].snapshot()["vips"] for b in v["backends"]
                if b["held_by_floor"]}

    hm_ref: list[HealthManager] = []

    async def body(hm: HealthManager) -> None:
        hm_ref.append(hm)
        for a in BACKENDS[:3]:
            pool.stop(a)
        await _until(lambda: len(_out(hm, vip.id)) == 2 and len(held()) == 1, 3,
                     "two out (half the weight), one held by the floor")
        pool.stop(BACKENDS[3])
        await _until(lambda: hm.snapshot()["totals"].get("all_down") == 1, 3, "all down")
        assert len(_out(hm, vip.id)) == 2, "the last healthy set stays"
        assert any(e.kind == "floor_held" for e in hm.events)

    _run(cp, body)
    cp.close()


def test_flapping_backend_is_held_out(tmp_path: Path, pool: Pool) -> None:
    cp = ControlPlane(StateSettings(tmp_path), None, loopback_backends=True)
    vip = cp.create_vip(_vip(pool.port, rise=1, fall=1, flap_threshold=1.5,
                             flap_half_life_s=30))

    async def body(hm: HealthManager) -> None:
        a = "127.0.0.2"
        for _ in range(2):
            pool.stop(a)
            await _until(lambda: a in _out(hm, vip.id), 2, "out")
            pool.start(a)
            if a in _out(hm, vip.id):
                await _until(lambda: a not in _out(hm, vip.id) or any(
                    b["suppressed"] for v in hm.snapshot()["vips"] for b in v["backends"]),
                    2, "back or suppressed")
        await asyncio.sleep(1.0)  # five good probes: rise=1 would have brought it back
        assert a in _out(hm, vip.id), "a flapping backend stays out while damped"

    _run(cp, body)
    cp.close()


@pytest.mark.bpf
def test_ring_follows_health_and_verify_sees_no_drift(
    tmp_path: Path, pool: Pool, balancer: Any
) -> None:
    from lb.control.reconcile import MapIO

    clear_maps(balancer)
    cp = ControlPlane(StateSettings(tmp_path), balancer, loopback_backends=True)
    try:
        vip = cp.create_vip(_vip(pool.port, n=2))
        io = MapIO(balancer)
        num = cp.vip_number(vip.id)
        idx = cp.backend_index("127.0.0.3")

        def in_ring() -> bool:
            return idx in set(io.read_ring(num))

        async def body(hm: HealthManager) -> None:
            assert in_ring()
            pool.stop("127.0.0.3")
            await _until(lambda: not in_ring(), 0.2 * 2 + 1, "slots of the failed backend")
            assert cp.verify() == [], "verify compares the maps with the health overlay"
            pool.start("127.0.0.3")
            await _until(in_ring, 3, "backend back in the ring")

        _run(cp, body)
    finally:
        cp.close()
        clear_maps(balancer)


def test_returning_backend_ramps_its_weight(tmp_path: Path, pool: Pool) -> None:
    cp = ControlPlane(StateSettings(tmp_path), None, loopback_backends=True)
    vip = cp.create_vip(_vip(pool.port, n=2, slow_start_s=2))

    def weights(hm: HealthManager) -> dict[str, int]:
        return {b.identity: b.weight for b in hm.overlay(cp.get_vip(vip.id)).backends}

    async def body(hm: HealthManager) -> None:
        pool.stop("127.0.0.3")
        await _until(lambda: _out(hm, vip.id) == {"127.0.0.3"}, 2, "out")
        pool.start("127.0.0.3")
        await _until(lambda: not _out(hm, vip.id), 3, "back")
        first = weights(hm)
        assert first["127.0.0.2"] == 10 and 1 <= first["127.0.0.3"] <= 5, first
        await _until(lambda: weights(hm) == {"127.0.0.2": 1, "127.0.0.3": 1}, 4,
                     "full weight after the slow-start period")

    _run(cp, body)
    cp.close()


class FakeTunnel:
    """Marks without a tc program: enough to see which pairs the manager tunnels."""

    def mark(self, index: int, address: str, gue: bool) -> int:
        return 0x58000000 | index

    def release(self, mark: int) -> None:
        pass


def _pairs(hm: HealthManager, vip_id: str) -> list[dict[str, Any]]:
    return [b for v in hm.snapshot()["vips"] if v["vip_id"] == vip_id for b in v["backends"]]


def test_failed_tunnel_setup_is_retried_and_shown_until_it_works(tmp_path: Path) -> None:
    cp = ControlPlane(StateSettings(tmp_path), None, loopback_backends=True)
    vip = cp.create_vip(_vip(free_port(), mode="tunnel"))
    attempts: list[float] = []

    def source() -> FakeTunnel:
        attempts.append(time.monotonic())
        if len(attempts) < 3:  # e.g. the filter of a crashed daemon was in the way
            raise KernelError("Filter already exists")
        return FakeTunnel()

    seen: list[dict[str, Any]] = []

    async def body(hm: HealthManager) -> None:
        def failed_twice() -> bool:
            seen.append(hm.snapshot()["tunnel"])
            return seen[-1]["failed_attempts"] == 2
        await _until(failed_twice, 5, "two failed attempts")
        status = seen[-1]
        assert status["state"] in ("failed", "loading"), status
        assert "Filter already exists" in status["error"]
        pairs = _pairs(hm, vip.id)
        assert pairs and all("Filter already exists" in (b["last_error"] or "")
                             for b in pairs), "the pairs say why they are not probed"
        await _until(lambda: hm.snapshot()["tunnel"]["state"] == "ready", 5, "retried")
        assert hm.snapshot()["tunnel"]["failed_attempts"] == 0
        await _until(lambda: all(b["mark"] is not None for b in _pairs(hm, vip.id)), 5,
                     "pairs remade with marks")
        assert {b["probe_address"] for b in _pairs(hm, vip.id)} == {"198.18.0.10"}, \
            "tunnelled probes go to the VIP, never directly to the backends"

    _run(cp, body, tunnel=source, tunnel_retry_s=0.05)
    cp.close()
    assert len(attempts) == 3
    assert any(s["state"] == "failed" and s["retry_in_s"] is not None for s in seen)


def test_loading_tunnel_holds_up_neither_the_sync_nor_the_health(
    tmp_path: Path, pool: Pool
) -> None:
    cp = ControlPlane(StateSettings(tmp_path), None, loopback_backends=True)
    tunnelled = cp.create_vip(_vip(pool.port, n=2, mode="tunnel"))
    gate = threading.Event()

    def source() -> FakeTunnel:
        gate.wait(20)  # a BCC compile on a loaded machine
        return FakeTunnel()

    async def body(hm: HealthManager) -> None:
        try:
            await _until(lambda: hm.snapshot()["tunnel"]["state"] == "loading", 3, "loading")
            direct = cp.create_vip(_vip(pool.port, n=2).model_copy(update={"port": 81}))
            await _until(lambda: all(b["probes"] >= 2 for b in _pairs(hm, direct.id))
                         and len(_pairs(hm, direct.id)) == 2, 5,
                         "a direct check is synced and probed while the tunnel loads")
            pending = _pairs(hm, tunnelled.id)
            assert len(pending) == 2
            assert all(b["probes"] == 0 and b["status"] == "up"
                       and b["last_error"] == TUNNEL_LOADING for b in pending), \
                "pending pairs are neither probed nor judged"
            assert _out(hm, tunnelled.id) == set()
        finally:
            gate.set()
        await _until(lambda: all(b["mark"] is not None for b in _pairs(hm, tunnelled.id)),
                     5, "tunnelled once loaded")

    _run(cp, body, tunnel=source)
    cp.close()
