"""The health state machine: rise/fall, flap damping, slow start, the safety floor."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lb.control import maglev
from lb.control.model import MAX_WEIGHT as MODEL_MAX_WEIGHT
from lb.health.policy import (
    MAX_WEIGHT,
    HealthCheck,
    Member,
    Target,
    VipDecision,
    decide,
)


def _target(**kw: object) -> Target:
    return Target(HealthCheck.model_validate(kw))


def _feed(t: Target, results: str, start: float = 0.0, step: float = 1.0) -> list[str | None]:
    out = []
    for i, r in enumerate(results):
        out.append(t.record(r == "+", start + i * step))
    return out


def test_max_weight_matches_the_model() -> None:
    assert MAX_WEIGHT == MODEL_MAX_WEIGHT == maglev.MAX_WEIGHT


def test_goes_down_after_fall_failures_in_a_row() -> None:
    t = _target(fall=3, rise=2)
    assert _feed(t, "--+---") == [None, None, None, None, None, "down"]
    assert t.status == "down"
    assert t.transitions["down"] == 1


def test_comes_back_after_rise_successes_in_a_row() -> None:
    t = _target(fall=1, rise=3, flap_threshold=0)
    assert _feed(t, "-++-+++") == ["down", None, None, None, None, None, "up"]


def test_starts_up_so_a_restart_keeps_the_pool() -> None:
    t = _target()
    assert t.status == "up" and not t.wants_out


def test_flapping_backend_is_held_down_until_the_penalty_decays() -> None:
    t = _target(fall=1, rise=1, flap_threshold=1.5, flap_half_life_s=10)
    assert t.record(False, 0) == "down"
    assert t.record(True, 1) == "up"
    assert t.record(False, 2) == "down"  # penalty 0.87 + 1 >= 1.5: suppressed
    assert t.suppressed
    assert t.record(True, 3) is None
    assert t.status == "down"
    # The penalty halves every 10 s: below 0.75 (half the threshold) after ~15 s.
    assert t.record(True, 10) is None
    assert t.record(True, 20) == "up"
    assert not t.suppressed


def test_no_damping_when_threshold_is_zero() -> None:
    t = _target(fall=1, rise=1, flap_threshold=0)
    for i in range(10):
        assert t.record(False, 2 * i) == "down"
        assert t.record(True, 2 * i + 1) == "up"


def test_slow_start_ramps_in_steps_then_stops() -> None:
    t = _target(fall=1, rise=1, slow_start_s=10, flap_threshold=0)
    t.record(False, 0)
    t.record(True, 100)
    assert t.ramp(100) == pytest.approx(0.1)
    assert t.ramp(104.9) == pytest.approx(0.5)
    assert t.ramp(109.99) == pytest.approx(1.0) or t.ramp(109.99) is None
    assert t.ramp(110) is None
    assert t.ramp(111) is None


def test_timeout_above_interval_is_refused() -> None:
    with pytest.raises(ValidationError, match="timeout_s"):
        HealthCheck(interval_s=1, timeout_s=2)


def test_bad_hex_and_status_are_refused() -> None:
    with pytest.raises(ValidationError):
        HealthCheck(type="udp", udp_payload_hex="zz")
    with pytest.raises(ValidationError):
        HealthCheck(type="http", expect_status=[700])


def _m(name: str, down: float | None = None, weight: int = 1, ramp: float | None = None,
       in_ring: bool = True) -> Member:
    return Member(name, weight, in_ring, down, ramp)


def test_one_down_backend_leaves_the_ring() -> None:
    d = decide([_m("a", down=1.0), _m("b"), _m("c")], 0.5)
    assert d.out == {"a"} and not d.held and not d.all_down


def test_floor_keeps_at_most_half_the_weight_out() -> None:
    d = decide([_m("a", 1.0), _m("b", 2.0), _m("c", 3.0), _m("d")], 0.5)
    assert d.out == {"a", "b"}, "earliest failures leave first"
    assert d.held == {"c"}


def test_floor_counts_weight_not_backends() -> None:
    d = decide([_m("a", 1.0, weight=3), _m("b", weight=1), _m("c", weight=1)], 0.5)
    assert d.out == frozenset(), "weight 3 of 5 is more than half"
    assert d.held == {"a"}


def test_already_out_stays_out_before_earlier_failures() -> None:
    prev = VipDecision(out=frozenset({"b"}))
    d = decide([_m("a", 1.0), _m("b", 5.0), _m("c"), _m("d")], 0.25, prev)
    assert d.out == {"b"}, "no churn: the backend already out keeps the budget"


def test_every_backend_down_keeps_the_last_healthy_set() -> None:
    prev = decide([_m("a", 1.0), _m("b")], 0.5)
    assert prev.out == {"a"}
    d = decide([_m("a", 1.0), _m("b", 2.0)], 0.5, prev)
    assert d.all_down
    assert d.out == {"a"} and d.held == {"b"}, "b, the last healthy backend, stays"


def test_every_backend_down_from_the_start_takes_nothing_out() -> None:
    d = decide([_m("a", 1.0), _m("b", 1.0)], 1.0)
    assert d.all_down and d.out == frozenset()


def test_backends_out_of_the_ring_by_desire_do_not_count() -> None:
    d = decide([_m("a", 1.0), _m("b"), _m("c", 1.0, in_ring=False)], 0.5)
    assert d.out == {"a"}
    assert "c" not in d.held


def test_ramp_scales_every_weight_and_ramps_the_returning_one() -> None:
    d = decide([_m("a", ramp=0.3), _m("b"), _m("c", weight=2)], 0.5)
    assert dict(d.weights) == {"a": 3, "b": 10, "c": 20}


def test_ramp_scale_stays_within_max_weight() -> None:
    d = decide([_m("a", ramp=0.5, weight=600), _m("b", weight=1000)], 0.5)
    assert dict(d.weights) == {"a": 300, "b": 1000}


def test_no_ramp_no_weights() -> None:
    assert decide([_m("a"), _m("b")], 0.5).weights == ()


def test_scaling_every_weight_leaves_the_ring_unchanged() -> None:
    eps = [maglev.Endpoint("198.18.11.2", 1), maglev.Endpoint("198.18.12.2", 2),
           maglev.Endpoint("198.18.13.2", 3)]
    scaled = [maglev.Endpoint(e.identity, e.weight * 10) for e in eps]
    a = maglev.build_ring(eps, 4099)
    b = maglev.build_ring(scaled, 4099)
    assert a.slots == b.slots, "slow start relies on rings depending on weight ratios only"
