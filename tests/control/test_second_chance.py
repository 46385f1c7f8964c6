"""Second chance in the control plane (docs/second-chance.md): a ring change of a GUE VIP
opens a stored window on the previous ring; the ring words of the slots that moved carry
their previous backend; the window closes by time (later while a drain goes on), and what
it writes is what verify expects."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lb.consts import RING_PREV_SHIFT, RING_REAL_MASK
from lb.control import maglev
from lb.control.facade import ControlPlane
from lb.control.model import (
    SECOND_CHANCE_WINDOW_S,
    BackendSpec,
    BackendUpdate,
    State,
    VipSpec,
    VipUpdate,
)
from lb.dataplane.mapio import MapIO
from lb.errors import InvalidInput

pytestmark = [pytest.mark.bpf]

A, B, C = "198.18.1.1", "198.18.1.2", "198.18.1.3"


def gue_vip(*backends: str, **kw: object) -> VipSpec:
    return VipSpec.model_validate({"protocol": "tcp", "address": "198.18.0.10", "port": 80,
                                   "encap": "gue", "backends": [{"address": a} for a in backends],
                                   **kw})


def ring_words(cp: ControlPlane, maps: object, vid: str) -> np.ndarray:
    return np.frombuffer(MapIO(maps).read_ring(cp.vip_number(vid)), np.uint32)


def old_ring(cp: ControlPlane, *backends: str) -> np.ndarray:
    """The ring these backends build, as backend indices of `cp`."""
    ring = maglev.build_ring([maglev.Endpoint(a, 1) for a in sorted(backends)], cp.limits.ring_size)
    idx = np.array([cp.backend_index(a) for a in ring.endpoints], np.uint32)
    return idx[np.frombuffer(ring.slots, np.uint32)]


def test_adding_a_backend_gives_moved_slots_their_previous_backend(control: ControlPlane,
                                                                   maps: object) -> None:
    spec = control.create_vip(gue_vip(A, B))
    assert control.get_vip(spec.id).second_window is None
    plan = control.plan(State(vips=[gue_vip(A, B, C)]))
    t0 = time.time()
    control.add_backend(spec.id, BackendSpec.model_validate({"address": C}))
    stored = control.get_vip(spec.id)
    w = stored.second_window
    assert w is not None and w.members() == ((A, 1), (B, 1))
    assert t0 - 1 <= w.until - SECOND_CHANCE_WINDOW_S <= time.time() + 1
    words = ring_words(control, maps, spec.id)
    cur, prev = words & RING_REAL_MASK, words >> RING_PREV_SHIFT
    before = old_ring(control, A, B)
    moved = cur != before
    # Every slot that moved (mostly to C: Maglev moves a few between A and B too) names
    # the backend it had; the others carry nothing.
    assert (cur[moved] == control.backend_index(C)).sum() > 0.9 * moved.sum()
    assert (prev[moved] == before[moved]).all() and not prev[~moved].any()
    # The dry run counted exactly these slots.
    assert plan.changed_vips[0].second_hop_slots == int(moved.sum())
    assert control.verify() == []


def test_no_window_for_ipip_or_when_switched_off(control: ControlPlane, maps: object) -> None:
    with pytest.raises(InvalidInput):
        control.create_vip(gue_vip(A, encap="ipip", second_chance=True))
    ipip = control.create_vip(gue_vip(A, B, encap="ipip"))
    off = control.create_vip(gue_vip(A, B, port=81, second_chance=False))
    for v in (ipip, off):
        control.add_backend(v.id, BackendSpec.model_validate({"address": C}))
        assert control.get_vip(v.id).second_window is None
        assert not (ring_words(control, maps, v.id) >> RING_PREV_SHIFT).any()


def test_window_closes_by_time_and_waits_for_a_drain(control: ControlPlane, maps: object) -> None:
    spec = control.create_vip(gue_vip(A, B, C))
    # B drains: its slots move to A and C, each keeping B as its second hop.
    control.update_backend(spec.id, B, BackendUpdate(state="draining"))
    w = control.get_vip(spec.id).second_window
    assert w is not None
    prev = ring_words(control, maps, spec.id) >> RING_PREV_SHIFT
    hops = prev[prev != 0]
    assert (hops == control.backend_index(B)).sum() > 0.9 * len(hops) > 0
    # Past its time, but B still drains: open.
    assert control.close_second_windows(now=w.until + 1) == []
    control.update_backend(spec.id, B, BackendUpdate(state="disabled"))
    # Disabled: B is no usable hop any more (out of reals), and the window can close.
    prev = ring_words(control, maps, spec.id) >> RING_PREV_SHIFT
    assert not (prev == control.backend_index(B)).any()
    assert control.close_second_windows(now=w.until + 1) == [spec.id]
    assert not (ring_words(control, maps, spec.id) >> RING_PREV_SHIFT).any()
    assert control.get_vip(spec.id).second_window is None
    assert control.verify() == []


def test_switching_off_closes_the_window_and_declarative_state_keeps_it(
        control: ControlPlane, maps: object) -> None:
    spec = control.create_vip(gue_vip(A, B))
    control.add_backend(spec.id, BackendSpec.model_validate({"address": C}))
    window = control.get_vip(spec.id).second_window
    assert window is not None
    # Putting back the same VIPs (no windows in a declarative state) keeps the window.
    plan = control.apply_state(State(vips=[gue_vip(A, B, C)]))
    assert plan.empty and control.get_vip(spec.id).second_window == window
    control.update_vip(spec.id, VipUpdate(second_chance=False))
    assert control.get_vip(spec.id).second_window is None
    assert not (ring_words(control, maps, spec.id) >> RING_PREV_SHIFT).any()
