"""Connection-table slots go with the VIP numbers and backend indices the control plane frees.

Packets run through the live balancer (BPF_PROG_TEST_RUN) create the slots. A VIP is deleted
or a backend removed, and the store hands its number or index to a new VIP or backend (the
only one free: the tables are full). A packet of an old flow must then take the new VIP's
ring, not the backend its stale slot named, and drain must count no flow of the new owner.
A draining or disabled backend keeps its index, and so its slots.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from lb.consts import XDP_TX
from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, BackendUpdate, State, VipSpec
from lb.dataplane.conntab import ConnTable
from lb.dataplane.flowhash import Flow5
from lb.dataplane.testrun import TestRunner
from lb.ops.drain import count_flows

pytestmark = pytest.mark.bpf

CP = Callable[..., ControlPlane]
VIP, CLIENT = "198.18.0.10", "198.18.2.1"
V80 = f"tcp:{VIP}:80"
X, Y, W = "198.18.1.1", "198.18.1.2", "198.18.1.9"
SPORTS = range(40000, 40040)


def _vip(port: int, *active: str, draining: tuple[str, ...] = ()) -> VipSpec:
    backends = [{"address": a} for a in active]
    backends += [{"address": a, "state": "draining"} for a in draining]
    return VipSpec.model_validate({"protocol": "tcp", "address": VIP, "port": port,
                                   "backends": backends})


class Net:
    """Client packets to the VIP through the live program."""

    def __init__(self, balancer: Any) -> None:
        self.runner = TestRunner(balancer.prog_fd)

    def send(self, port: int, sport: int, flags: str = "A") -> str | None:
        """Run one TCP packet; the backend it was encapsulated to (None: not forwarded)."""
        frame = bytes(Ether(src="02:00:00:00:00:aa", dst="02:00:00:00:00:01")
                      / IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=port, flags=flags))
        r = self.runner.run(frame)
        if r.verdict != XDP_TX:
            return None
        return str(ipaddress.IPv4Address(r.packet[30:34]))  # outer destination (IPIP)


def _slots(b: Any, *, vip_num: int | None = None, real_idx: int | None = None) -> int:
    """Slots naming this VIP number and/or backend index."""
    with ConnTable(b) as t:
        e = t.entries()
    hit = np.ones(len(e), np.bool_)
    if vip_num is not None:
        hit &= e.vip_num == vip_num
    if real_idx is not None:
        hit &= e.real_idx == real_idx
    return int(hit.sum())


@pytest.fixture
def net(live: Any) -> Net:
    """Packets through the live program, on emptied maps."""
    return Net(live)


def test_a_reused_vip_number_neither_steers_nor_counts_the_deleted_vips_flows(
    live: Any, net: Net, make_control: CP
) -> None:
    cp = make_control(live)
    # Every VIP number taken, so the one the delete frees is the next handed out. The other
    # VIPs list X too, which keeps X's index, and so the backend the stale slots name.
    others = [_vip(1000 + i, X) for i in range(cp.limits.max_vips - 1)]
    cp.apply_state(State(vips=[_vip(80, X), *others]))
    num, ix = cp.vip_number(V80), cp.backend_index(X)
    for sport in SPORTS:
        assert net.send(80, sport, "S") == X
    assert net.send(1000, 40000, "S") == X
    assert _slots(live, vip_num=num, real_idx=ix) == len(SPORTS)

    cp.delete_vip(V80)
    assert _slots(live, vip_num=num) == 0, "the deleted VIP's slots stayed"
    assert _slots(live, vip_num=cp.vip_number(others[0].id)) == 1, "another VIP's slot went"
    new = cp.create_vip(_vip(80, Y, draining=(X,)))
    assert cp.vip_number(V80) == num, "the test needs the number handed out again"
    assert count_flows(live, new, ix) == 0, "drain counts the deleted VIP's flows as X's"
    for sport in SPORTS:
        assert net.send(80, sport) == Y, "an old flow followed its stale slot to X"


def test_a_reused_backend_index_neither_steers_nor_counts_the_removed_backends_flows(
    live: Any, net: Net, make_control: CP
) -> None:
    cp = make_control(live)
    # Every backend index taken (the draining ones stay out of the ring, so any number
    # fits), so the one the removal frees is the next handed out.
    rest = tuple(f"198.18.5.{i}" for i in range(1, cp.limits.max_backends - 1))
    cp.apply_state(State(vips=[_vip(80, X, Y), _vip(81, draining=rest)]))
    num, ix, iy = cp.vip_number(V80), cp.backend_index(X), cp.backend_index(Y)
    went = {sport: net.send(80, sport, "S") for sport in SPORTS}
    to_x = [s for s, dst in went.items() if dst == X]
    to_y = [s for s, dst in went.items() if dst == Y]
    assert to_x and to_y and len(to_x) + len(to_y) == len(SPORTS)

    cp.remove_backend(V80, X)
    assert _slots(live, real_idx=ix) == 0, "the removed backend's slots stayed"
    assert _slots(live, vip_num=num, real_idx=iy) == len(to_y), "Y's slots went"
    cp.add_backend(V80, BackendSpec.model_validate({"address": W, "state": "draining"}))
    assert cp.backend_index(W) == ix, "the test needs the index handed out again"
    assert count_flows(live, cp.get_vip(V80), ix) == 0, "W's drain counts X's old flows"
    for sport in to_x:
        assert net.send(80, sport) == Y, "an old flow of X followed its stale slot to W"
    for sport in to_y[:3]:
        assert net.send(80, sport) == Y


def test_a_draining_backend_keeps_its_slots_and_a_disabled_one_its_index(
    live: Any, net: Net, make_control: CP
) -> None:
    cp = make_control(live)
    cp.create_vip(_vip(80, X, Y))
    ix = cp.backend_index(X)
    to_x = [s for s in SPORTS if net.send(80, s, "S") == X]
    assert to_x

    cp.update_backend(V80, X, BackendUpdate(state="draining"))
    assert _slots(live, real_idx=ix) == len(to_x), "draining purged the backend's slots"
    assert count_flows(live, cp.get_vip(V80), ix) == len(to_x)
    assert net.send(80, to_x[0]) == X, "a draining backend lost a tracked flow"
    # Health takes a backend out the same way (an overlay): nothing is freed.
    drained = _vip(80, X, draining=(Y,))
    cp.set_overlay(lambda v: drained if v.id == V80 else v)
    assert _slots(live, real_idx=cp.backend_index(Y)) == len(SPORTS) - len(to_x)
    cp.set_overlay(None)
    # Disabled: out of the VIP's set, so its slots go (they must not steer to it again if
    # another VIP programs it), but its index is still its own.
    cp.update_backend(V80, X, BackendUpdate(state="disabled"))
    assert cp.backend_index(X) == ix and _slots(live, real_idx=ix) == 0


@pytest.mark.parametrize("how", ["removed", "disabled"])
def test_a_backend_leaving_one_vip_but_kept_by_another_loses_that_vips_flows(
    live: Any, net: Net, make_control: CP, how: str
) -> None:
    cp = make_control(live)
    cp.create_vip(_vip(80, X, Y))
    cp.create_vip(_vip(81, X))  # keeps X's index programmed in reals
    n80, n81, ix = cp.vip_number(V80), cp.vip_number(f"tcp:{VIP}:81"), cp.backend_index(X)
    to_x = [s for s in SPORTS if net.send(80, s, "S") == X]
    assert to_x and len(to_x) < len(SPORTS)
    assert net.send(81, 40000, "S") == X

    if how == "removed":
        cp.remove_backend(V80, X)
    else:
        cp.update_backend(V80, X, BackendUpdate(state="disabled"))
    assert _slots(live, vip_num=n80, real_idx=ix) == 0, "80's slots naming X stayed"
    assert _slots(live, vip_num=n81, real_idx=ix) == 1, "81's flow to X went"
    assert _slots(live, vip_num=n80) == len(SPORTS) - len(to_x), "80's flows to Y went"
    for sport in to_x:
        assert net.send(80, sport) == Y, "an old flow of 80 still went to X"
    assert net.send(81, 40000) == X


def test_a_backend_draining_in_one_vip_and_kept_by_another_keeps_its_flows(
    live: Any, net: Net, make_control: CP
) -> None:
    cp = make_control(live)
    cp.create_vip(_vip(80, X, Y))
    cp.create_vip(_vip(81, X))
    ix = cp.backend_index(X)
    to_x = [s for s in SPORTS if net.send(80, s, "S") == X]
    assert to_x
    cp.update_backend(V80, X, BackendUpdate(state="draining"))
    assert _slots(live, vip_num=cp.vip_number(V80), real_idx=ix) == len(to_x)
    for sport in to_x:
        assert net.send(80, sport) == X, "a draining backend lost a tracked flow"


def test_a_number_handed_over_in_one_change_is_purged_before_the_new_vip_is_written(
    live: Any, net: Net, make_control: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = make_control(live)
    others = [_vip(1000 + i, X) for i in range(cp.limits.max_vips - 1)]
    cp.apply_state(State(vips=[_vip(80, X), *others]))
    num, ix = cp.vip_number(V80), cp.backend_index(X)
    for sport in SPORTS:
        assert net.send(80, sport, "S") == X
    assert _slots(live, vip_num=num, real_idx=ix) == len(SPORTS)
    assert cp._reconciler is not None
    io = cp._reconciler.io
    calls: list[str] = []
    for name in ("del_vip", "purge_conns", "set_vip"):
        orig = getattr(io, name)

        def spy(*args: Any, _n: str = name, _f: Any = orig) -> Any:
            calls.append(_n)
            return _f(*args)

        monkeypatch.setattr(io, name, spy)

    cp.apply_state(State(vips=[_vip(2000, X), *others]))  # one VIP for another, one change
    assert cp.vip_number(f"tcp:{VIP}:2000") == num
    assert calls == ["del_vip", "purge_conns", "set_vip"], calls
    assert count_flows(live, cp.get_vip(f"tcp:{VIP}:2000"), ix) == 0
    assert _slots(live, vip_num=num) == 0


def test_an_index_handed_over_in_one_change_is_emptied_and_purged_before_it_is_written(
    live: Any, net: Net, make_control: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = make_control(live)
    rest = _vip(81, draining=tuple(f"198.18.5.{i}" for i in range(1, cp.limits.max_backends - 1)))
    cp.apply_state(State(vips=[_vip(80, X, Y), rest]))
    ix = cp.backend_index(X)
    to_x = [s for s in SPORTS if net.send(80, s, "S") == X]
    assert to_x
    assert cp._reconciler is not None
    io = cp._reconciler.io
    calls: list[tuple[str, Any]] = []
    orig_set, orig_purge = io.set_real, io.purge_conns

    def set_real(idx: int, val: Any) -> None:
        calls.append(("set_real" if val else "clear_real", idx))
        orig_set(idx, val)

    def purge_conns(nums: Any, idx: Any) -> int:
        calls.append(("purge_conns", sorted(idx)))
        return int(orig_purge(nums, idx))

    monkeypatch.setattr(io, "set_real", set_real)
    monkeypatch.setattr(io, "purge_conns", purge_conns)
    cp.apply_state(State(vips=[_vip(80, Y, draining=(W,)), rest]))  # X out, W in: one change
    assert cp.backend_index(W) == ix
    assert calls[:3] == [("clear_real", ix), ("purge_conns", [ix]), ("set_real", ix)], calls
    assert count_flows(live, cp.get_vip(V80), ix) == 0
    for sport in to_x:
        assert net.send(80, sport) == Y, "an old flow of X followed its stale slot to W"


def test_a_failed_purge_is_made_good_by_the_next_apply(
    maps: Any, make_control: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = make_control(maps)
    cp.create_vip(_vip(80, X))
    cp.create_vip(_vip(81, Y))
    num, ix = cp.vip_number(V80), cp.backend_index(X)
    other, iy = cp.vip_number(f"tcp:{VIP}:81"), cp.backend_index(Y)
    with ConnTable(maps) as t:
        for sport in SPORTS:
            t.insert(Flow5.of(CLIENT, VIP, sport, 80, "tcp"), ix, num)
            t.insert(Flow5.of(CLIENT, VIP, sport, 81, "tcp"), iy, other)
    assert cp._reconciler is not None

    def broken(*_: Any) -> int:
        raise OSError(14, "Bad address")

    monkeypatch.setattr(cp._reconciler.io, "purge_conns", broken)
    cp.delete_vip(V80)
    assert cp.reconcile_errors == 1 and not cp.in_sync
    assert _slots(maps, vip_num=num) == len(SPORTS)
    monkeypatch.undo()
    cp.create_vip(_vip(82, W))  # reads the maps back: the stale slots go first
    assert cp.in_sync and cp.verify() == []
    assert _slots(maps, vip_num=num) == 0 and _slots(maps, real_idx=ix) == 0
    assert _slots(maps, vip_num=other, real_idx=iy) == len(SPORTS)


def test_a_start_frees_the_slots_of_numbers_and_indices_the_maps_do_not_hold(
    maps: Any, make_control: CP
) -> None:
    cp = make_control(maps)
    cp.create_vip(_vip(80, X))
    num, ix = cp.vip_number(V80), cp.backend_index(X)
    cp.close()
    with ConnTable(maps) as t:
        for sport in SPORTS:
            t.insert(Flow5.of(CLIENT, VIP, sport, 80, "tcp"), ix, num)
        # Left by a process that died between taking them out of the maps and its purge.
        t.insert(Flow5.of(CLIENT, VIP, 1, 81, "tcp"), ix, 7)
        t.insert(Flow5.of(CLIENT, VIP, 2, 81, "tcp"), 33, num)
    again = make_control(maps)
    assert again.in_sync
    assert _slots(maps) == len(SPORTS), "a stale slot survived the start, or a live one went"


def test_a_start_frees_the_slots_of_a_backend_its_vip_no_longer_has(
    maps: Any, make_control: CP
) -> None:
    cp = make_control(maps)
    cp.create_vip(_vip(80, Y))
    cp.create_vip(_vip(81, X))
    n80, n81, ix = cp.vip_number(V80), cp.vip_number(f"tcp:{VIP}:81"), cp.backend_index(X)
    cp.close()
    with ConnTable(maps) as t:
        # Left by a process that died between taking X out of 80's ring and its purge.
        t.insert(Flow5.of(CLIENT, VIP, 1, 80, "tcp"), ix, n80)
        t.insert(Flow5.of(CLIENT, VIP, 2, 81, "tcp"), ix, n81)
    again = make_control(maps)
    assert again.in_sync
    assert _slots(maps, vip_num=n80, real_idx=ix) == 0, "80's stale slot naming X survived"
    assert _slots(maps, vip_num=n81, real_idx=ix) == 1, "81's live flow to X went"
