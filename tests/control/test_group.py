"""Group commit: concurrent writes share one transaction, each keeps its own outcome.

A group is formed on purpose by holding the control plane (`paused()`) while writers queue,
in a known order; then every change must be checked against the state the changes before it
left, get its own generation or its own error, and return only once the group is on disk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from lb.config import DataplaneConfig
from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, BackendUpdate, Plan, State, VipSpec
from lb.control.store import StoreError
from lb.errors import Conflict, LimitReached, NotFound, PreconditionFailed

CP = Callable[..., ControlPlane]
#: Five backend slots: the group below fills them.
SMALL = DataplaneConfig(ring_size=4099, max_vips=4, max_reals=6, conn_table_size=1024)
V80, V81 = "tcp:198.18.0.10:80", "tcp:198.18.0.10:81"


def vip(port: int, *backends: str | tuple[str, int]) -> VipSpec:
    rows = [{"address": b} if isinstance(b, str) else {"address": b[0], "weight": b[1]}
            for b in backends]
    return VipSpec.model_validate(
        {"protocol": "tcp", "address": "198.18.0.10", "port": port, "backends": rows})


def be(address: str) -> BackendSpec:
    return BackendSpec.model_validate({"address": address})


class Writes:
    """Counts the store's writes (one per group) and whether one has finished."""

    def __init__(self, cp: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
        self.groups: list[tuple[int, int]] = []  # (generation before, after)
        self.done = threading.Event()
        store = cp._store
        real = store.write

        def write() -> None:
            before, after = store.generation, store.staged_generation
            self.done.clear()
            real()
            self.groups.append((before, after))
            self.done.set()

        monkeypatch.setattr(store, "write", write)


def _in_one_group(cp: ControlPlane, writes: Writes, calls: list[Callable[[], Any]]
                  ) -> list[tuple[str, Any]]:
    """Run `calls` from one thread each, queued in this order while the lock is held."""
    out: list[tuple[str, Any]] = [("pending", None)] * len(calls)

    def run(i: int) -> None:
        try:
            res = calls[i]()
        except Exception as e:
            out[i] = ("error", e)
        else:
            out[i] = ("ok", res)
            if not writes.done.is_set():
                out[i] = ("acknowledged before its group was on disk", res)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with cp.paused():
        for i, t in enumerate(threads):
            t.start()
            deadline = time.monotonic() + 10
            while len(cp._queue) < i + 1:
                assert time.monotonic() < deadline, "writer did not queue"
                time.sleep(0.001)
    for t in threads:
        t.join(30)
    return out


def test_a_group_checks_each_change_against_the_ones_before_it(
    make_control: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = make_control(config=SMALL)
    cp.create_vip(vip(80, "198.18.1.1"))
    cp.create_vip(vip(81))
    writes = Writes(cp, monkeypatch)
    full = State(vips=[vip(80, "198.18.1.1", ("198.18.1.2", 5)),
                       vip(81, "198.18.1.3", "198.18.1.4", "198.18.1.5")])
    out = _in_one_group(cp, writes, [
        lambda: cp.add_backend(V80, be("198.18.1.2")),  # generation 3
        lambda: cp.add_backend(V80, be("198.18.1.2")),  # Conflict: the change before added it
        lambda: cp.update_backend(V80, "198.18.1.2", BackendUpdate(weight=5)),  # 4
        lambda: cp.remove_backend(V81, "198.18.9.9"),  # NotFound
        lambda: cp.apply_state(full, if_generation=4),  # 5: the generation staged before it
        lambda: cp.add_backend(V81, be("198.18.1.6")),  # LimitReached: five slots in use
        lambda: cp.update_backend(V81, "198.18.1.3", BackendUpdate(weight=2)),  # 6
        lambda: cp.apply_state(full, if_generation=4),  # PreconditionFailed: now 6
    ])
    kinds = [type(r).__name__ if k == "error" else k for k, r in out]
    assert kinds == ["ok", "Conflict", "ok", "NotFound", "ok", "LimitReached", "ok",
                     "PreconditionFailed"]
    assert isinstance(out[1][1], Conflict) and isinstance(out[3][1], NotFound)
    assert isinstance(out[5][1], LimitReached) and isinstance(out[7][1], PreconditionFailed)
    plan = out[4][1]
    assert isinstance(plan, Plan) and (plan.from_generation, plan.to_generation) == (4, 5)
    assert writes.groups == [(2, 6)], "the four changes were not stored in one write"
    assert cp.generation == 6
    want = [vip(80, "198.18.1.1", ("198.18.1.2", 5)),
            vip(81, ("198.18.1.3", 2), "198.18.1.4", "198.18.1.5")]
    assert cp.get_state() == State(vips=want, generation=6)
    cp.close()
    again = make_control(config=SMALL)
    assert again.get_state() == State(vips=want, generation=6)


def test_a_failed_group_write_fails_every_change_that_saw_it(
    make_control: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = make_control()
    cp.create_vip(vip(80, "198.18.1.1"))
    before = cp.get_state()
    writes = Writes(cp, monkeypatch)
    cp._store._db.execute("CREATE TRIGGER boom BEFORE UPDATE ON vips BEGIN "
                          "SELECT RAISE(ABORT, 'disk says no'); END")
    out = _in_one_group(cp, writes, [
        lambda: cp.update_backend(V80, "198.18.1.1", BackendUpdate(weight=3)),
        lambda: cp.update_backend(V80, "198.18.1.1", BackendUpdate(weight=3)),  # no-op on it
        lambda: cp.remove_backend(V81, "198.18.1.1"),  # its own NotFound
    ])
    assert [type(r).__name__ for _, r in out] == ["StoreError", "StoreError", "NotFound"]
    assert cp.get_state() == before
    cp._store._db.execute("DROP TRIGGER boom")
    assert cp.update_backend(V80, "198.18.1.1", BackendUpdate(weight=3)).weight == 3
    assert cp.generation == before.generation + 1
    assert not isinstance(out[2][1], StoreError)


def test_a_write_inside_paused_runs_at_once(make_control: CP) -> None:
    cp = make_control()
    with cp.paused():
        cp.create_vip(vip(80))
        assert cp.generation == 1


def test_concurrent_writers_get_contiguous_generations_and_the_maps_match(
    control: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers, each = 8, 12
    control.apply_state(State(vips=[vip(80 + t, f"198.18.1.{t + 1}") for t in range(writers)]))
    g0 = control.generation
    writes = Writes(control, monkeypatch)
    gens: list[int] = []
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for k in range(each):
                # Every writer's state differs from every other's: no change is empty.
                vips = [vip(80 + u, (f"198.18.1.{u + 1}", 2 + k if u == t else 1))
                        for u in range(writers)]
                plan = control.apply_state(State(vips=vips))
                assert plan.to_generation is not None
                gens.append(plan.to_generation)
                control.update_backend(f"tcp:198.18.0.10:{80 + t}", f"198.18.1.{t + 1}",
                                       BackendUpdate(weight=500 + k))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    changes = 2 * writers * each
    assert control.generation == g0 + changes, "a change was lost or counted twice"
    assert len(set(gens)) == len(gens) and max(gens) <= g0 + changes
    assert len(writes.groups) < changes, "no two writers ever shared a group"
    assert sum(after - before for before, after in writes.groups) == changes
    assert control.reconcile_errors == 0 and control.verify() == []
