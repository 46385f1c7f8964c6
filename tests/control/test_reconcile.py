"""Reconciliation on the real maps: exact contents, order, stable indices, drift."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from typing import Any

import pytest

from lb.consts import F_ENCAP_GUE, F_SRC_LB, FAMILY_V4, FAMILY_V6, REAL_F_V6
from lb.control import maglev
from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, BackendUpdate, VipSpec
from lb.dataplane.mapio import MapIO

pytestmark = pytest.mark.bpf

CP = Callable[..., ControlPlane]
V4 = "tcp:198.18.0.10:80"


def vip(port: int = 80, *backends: str, address: str = "198.18.0.10", **kw: object) -> VipSpec:
    return VipSpec.model_validate(
        {"protocol": "tcp", "address": address, "port": port,
         "backends": [{"address": a} for a in backends], **kw}
    )


def raw(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed.ljust(16, b"\0")


def expected_ring(cp: ControlPlane, spec: VipSpec) -> list[int]:
    ring = maglev.build_ring(
        [maglev.Endpoint(b.identity, b.weight) for b in spec.backends if b.in_ring],
        cp.limits.ring_size,
    )
    index = {i: cp.backend_index(i) for i in ring.endpoints}
    return list(maglev.ring_to_values(ring, index))


def test_maps_hold_exactly_the_state(control: ControlPlane, maps: Any) -> None:
    cp = control
    a = cp.create_vip(vip(80, "198.18.1.1", "198.18.1.2", "198.18.1.3", "2001:db8::4"))
    b = cp.create_vip(vip(443, "198.18.1.2", "198.18.1.5", encap="gue"))
    c = cp.create_vip(vip(53, "2001:db8::4", address="2001:db8::10", lru_bypass=True))
    cp.update_backend(a.id, "198.18.1.1", BackendUpdate(state="draining"))
    cp.update_backend(a.id, "198.18.1.3", BackendUpdate(state="disabled"))
    a = cp.get_vip(a.id)
    io = MapIO(maps)

    assert io.read_vip_map() == {
        (FAMILY_V4, raw("198.18.0.10"), 80, 6): (cp.vip_number(a.id), 0),
        (FAMILY_V4, raw("198.18.0.10"), 443, 6): (cp.vip_number(b.id), F_ENCAP_GUE | F_SRC_LB),
        (FAMILY_V6, raw("2001:db8::10"), 53, 6): (cp.vip_number(c.id), c.flags),
    }
    assert io.read_vip_addrs() == {(FAMILY_V4, raw("198.18.0.10")): 2,
                                   (FAMILY_V6, raw("2001:db8::10")): 1}
    # Draining stays in reals (tracked flows go on); disabled leaves it.
    assert io.read_reals() == {
        cp.backend_index(x): (raw(x), REAL_F_V6 if ":" in x else 0)
        for x in ("198.18.1.1", "198.18.1.2", "198.18.1.5", "2001:db8::4")
    }
    for spec in (a, b, c):
        assert list(io.read_ring(cp.vip_number(spec.id))) == expected_ring(cp, spec), spec.id
    ring_a = set(io.read_ring(cp.vip_number(a.id)))
    assert cp.backend_index("198.18.1.1") not in ring_a, "a draining backend is in the ring"
    assert cp.verify() == []


def test_shared_backend_has_one_index_and_indices_survive_a_restart(
    control: ControlPlane, make_control: CP, maps: Any
) -> None:
    control.create_vip(vip(80, "198.18.1.1", "198.18.1.2"))
    control.create_vip(vip(443, "198.18.1.2", "198.18.1.3"))
    shared = control.backend_index("198.18.1.2")
    indices = {a: control.backend_index(a) for a in ("198.18.1.1", "198.18.1.2", "198.18.1.3")}
    nums = {v: control.vip_number(v) for v in (V4, "tcp:198.18.0.10:443")}
    assert len(set(indices.values())) == 3 and 0 not in indices.values()
    assert sorted(MapIO(maps).read_reals()) == sorted(indices.values())
    control.close()
    again = make_control(maps)
    assert again.backend_index("198.18.1.2") == shared
    assert {a: again.backend_index(a) for a in indices} == indices
    assert {v: again.vip_number(v) for v in nums} == nums
    assert again.verify() == []


def test_a_freed_backend_index_is_not_reused_at_once(control: ControlPlane) -> None:
    control.create_vip(vip(80, "198.18.1.1", "198.18.1.2"))
    gone = control.backend_index("198.18.1.1")
    control.remove_backend(V4, "198.18.1.1")
    control.add_backend(V4, BackendSpec.model_validate({"address": "198.18.1.9"}))
    assert control.backend_index("198.18.1.9") != gone
    control.add_backend(V4, BackendSpec.model_validate({"address": "198.18.1.1"}))
    assert control.backend_index("198.18.1.1") != gone


class Recorder:
    """Wraps the reconciler's map writers and records the order of writes."""

    METHODS = ("set_real", "write_ring", "set_vip_addr", "del_vip_addr", "set_vip", "del_vip",
               "purge_conns")

    def __init__(self, io: MapIO, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in self.METHODS:
            orig = getattr(io, name)

            def wrapped(*args: Any, _n: str = name, _o: Any = orig) -> Any:
                what = _n
                if _n == "set_real" and args[1] is None:
                    what = "clear_real"
                self.calls.append(what)
                return _o(*args)

            monkeypatch.setattr(io, name, wrapped)

    def first(self, name: str) -> int:
        return self.calls.index(name)

    def last(self, name: str) -> int:
        return len(self.calls) - 1 - self.calls[::-1].index(name)


def test_create_writes_reals_then_ring_then_vip(
    control: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert control._reconciler is not None
    rec = Recorder(control._reconciler.io, monkeypatch)
    control.create_vip(vip(80, "198.18.1.1", "198.18.1.2"))
    assert rec.last("set_real") < rec.first("write_ring") < rec.first("set_vip_addr") \
        < rec.first("set_vip"), rec.calls


def test_delete_removes_vip_then_ring_then_reals_then_their_conn_slots(
    control: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    control.create_vip(vip(80, "198.18.1.1", "198.18.1.2"))
    control.create_vip(vip(81, "198.18.1.2"))
    assert control._reconciler is not None
    rec = Recorder(control._reconciler.io, monkeypatch)
    control.delete_vip(V4)
    assert rec.calls == ["del_vip", "set_vip_addr", "write_ring", "clear_real",
                         "purge_conns"], rec.calls


def test_backend_changes_program_reals_before_and_clear_after_the_ring(
    control: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    control.create_vip(vip(80, "198.18.1.1", "198.18.1.2"))
    assert control._reconciler is not None
    rec = Recorder(control._reconciler.io, monkeypatch)
    control.add_backend(V4, BackendSpec.model_validate({"address": "198.18.1.3"}))
    assert rec.calls == ["set_real", "write_ring"]
    rec.calls.clear()
    control.update_backend(V4, "198.18.1.3", BackendUpdate(state="disabled"))
    assert rec.calls == ["write_ring", "clear_real"]  # its index is kept: no purge
    rec.calls.clear()
    control.update_backend(V4, "198.18.1.1", BackendUpdate(weight=0))
    assert rec.calls == ["write_ring"]  # weight 0: out of the ring, still in reals


def test_only_changed_ring_slots_are_written(
    control: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    addrs = [f"198.18.1.{i}" for i in range(1, 21)]
    control.create_vip(vip(80, *addrs))
    assert control._reconciler is not None
    io = control._reconciler.io
    written: list[int] = []
    orig = io.write_ring

    def spy(num: int, slots: Any, values: Any) -> None:
        written.append(len(slots))
        orig(num, slots, values)

    monkeypatch.setattr(io, "write_ring", spy)
    control.remove_backend(V4, addrs[0])
    size = control.limits.ring_size
    assert len(written) == 1 and size / 40 < written[0] < size / 10  # about 1/20 of 4099
    assert control.verify() == []


def test_verify_reports_and_repair_fixes_drift(control: ControlPlane, maps: Any) -> None:
    a = control.create_vip(vip(80, "198.18.1.1", "198.18.1.2"))
    control.create_vip(vip(81, "198.18.1.2"))
    io = MapIO(maps)
    num = control.vip_number(a.id)
    t = maps.ch_rings
    base = num * control.limits.ring_size
    t[t.Key(base + 7)] = t.Leaf(63)  # corrupt one ring slot
    io.del_vip((FAMILY_V4, raw("198.18.0.10"), 81, 6))  # lose one VIP entry
    io.set_vip((FAMILY_V4, raw("198.18.9.9"), 80, 17), 5, 0)  # a stray VIP
    io.set_real(60, (raw("198.18.9.8"), 0))  # a stray backend

    drifts = control.verify()
    kinds = sorted((d.map, d.key) for d in drifts)
    assert kinds == [("ch_rings", a.id), ("reals", "60"),
                     ("vip_map", "tcp:198.18.0.10:81"), ("vip_map", "udp:198.18.9.9:80")]
    ring = next(d for d in drifts if d.map == "ch_rings")
    assert ring.actual is not None and "1 slots differ (slot 7" in ring.actual
    lost = next(d for d in drifts if d.key == "tcp:198.18.0.10:81")
    assert lost.actual is None and lost.expected is not None

    assert control.repair() == drifts
    assert control.verify() == []


def test_verify_holds_no_write_back_while_it_reads_the_maps(
    control: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    control.create_vip(vip(80, "198.18.1.1"))
    rec = control._reconciler
    assert rec is not None
    read, reading, release = rec.read, threading.Event(), threading.Event()

    def slow_read(want: Any) -> Any:
        if not reading.is_set():
            reading.set()
            assert release.wait(10)
        return read(want)

    monkeypatch.setattr(rec, "read", slow_read)
    found: list[Any] = []
    checker = threading.Thread(target=lambda: found.append(control.verify()), daemon=True)
    checker.start()
    assert reading.wait(10)
    writer = threading.Thread(target=lambda: control.add_backend(
        V4, BackendSpec.model_validate({"address": "198.18.1.2"})), daemon=True)
    writer.start()
    writer.join(5)
    assert not writer.is_alive(), "a write waited for verify's read of the maps"
    release.set()
    checker.join(10)
    # The read the write overlapped is not trusted: verify read again, and found nothing.
    assert found == [[]]
    assert control.drift_report is not None and control.drift_report.generation == 2


def test_failed_apply_is_counted_kept_and_retried(
    control: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    control.create_vip(vip(80, "198.18.1.1"))
    assert control._reconciler is not None
    io = control._reconciler.io

    def broken(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "write_ring", broken)
    control.add_backend(V4, BackendSpec.model_validate({"address": "198.18.1.2"}))
    assert control.reconcile_errors == 1 and not control.in_sync
    assert control.generation == 2 and len(control.list_backends(V4)) == 2  # kept
    monkeypatch.undo()
    assert [d.map for d in control.verify()] == ["ch_rings"]
    control.add_backend(V4, BackendSpec.model_validate({"address": "198.18.1.3"}))
    assert control.in_sync and control.verify() == []


def test_start_brings_maps_to_the_stored_state(
    control: ControlPlane, make_control: CP, maps: Any
) -> None:
    control.create_vip(vip(80, "198.18.1.1", "198.18.1.2"))
    control.create_vip(vip(81, "198.18.1.3"))
    control.close()
    from tests.control.conftest import clear_maps

    clear_maps(maps)  # a freshly loaded program
    io = MapIO(maps)
    io.set_vip((FAMILY_V4, raw("198.18.9.9"), 80, 6), 9, 0)  # and a stale entry
    io.write_ring(9, [0], maglev.ring_to_values(
        maglev.build_ring([maglev.Endpoint("x")], control.limits.ring_size), {"x": 1}))
    again = make_control(maps)
    assert again.in_sync and again.verify() == []
    assert (FAMILY_V4, raw("198.18.9.9"), 80, 6) not in io.read_vip_map()
    assert not any(io.read_ring(9)), "the stale VIP's ring was not cleared"


def test_per_slot_fallback_writes_the_same_ring(control: ControlPlane) -> None:
    assert control._reconciler is not None
    io = control._reconciler.io
    control.create_vip(vip(80, "198.18.1.1", "198.18.1.2"))
    io.batched = False  # as on a kernel without BPF_MAP_*_BATCH
    control.add_backend(V4, BackendSpec.model_validate({"address": "198.18.1.3"}))
    spec = control.get_vip(V4)
    assert list(io.read_ring(control.vip_number(V4))) == expected_ring(control, spec)
    assert control.verify() == []


def test_fresh_indices_start_with_zero_counters(control: ControlPlane, maps: Any) -> None:
    vs, rs = maps.vip_stats, maps.real_stats
    stale_v = vs.Leaf()
    stale_v[0].packets = 7
    vs[vs.Key(0)] = stale_v
    stale_r = rs.Leaf()
    stale_r[0].packets = 9
    rs[rs.Key(1)] = stale_r
    control.create_vip(vip(80, "198.18.1.1"))
    assert control.vip_number(V4) == 0 and control.backend_index("198.18.1.1") == 1
    assert sum(c.packets for c in vs[vs.Key(0)]) == 0
    assert sum(c.packets for c in rs[rs.Key(1)]) == 0


def test_full_table_swaps_one_vip_for_another_in_one_change(control: ControlPlane) -> None:
    from lb.control.model import State

    full = [vip(1000 + i, f"198.18.1.{i + 1}") for i in range(control.limits.max_vips)]
    control.apply_state(State(vips=full))
    gone = control.vip_number(full[0].id)
    swapped = [vip(2000, "198.18.2.1"), *full[1:]]
    control.apply_state(State(vips=swapped))
    assert control.vip_number("tcp:198.18.0.10:2000") == gone  # the only free number
    assert control.verify() == []


def test_paused_holds_writes_and_resyncs_after(control: ControlPlane, maps: Any) -> None:
    import threading

    from tests.control.conftest import clear_maps

    control.create_vip(vip(80, "198.18.1.1"))
    done = threading.Event()

    def writer() -> None:
        control.add_backend(V4, BackendSpec.model_validate({"address": "198.18.1.2"}))
        done.set()

    with control.paused():
        t = threading.Thread(target=writer)
        t.start()
        assert not done.wait(0.2), "a write went through while paused"
        clear_maps(maps)  # as if the program came back with new, empty maps
    t.join(timeout=30)
    assert done.is_set() and control.verify() == []
