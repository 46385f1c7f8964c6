"""The ControlPlane facade on its store alone (no maps): errors, plans, whole-state writes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, BackendUpdate, State, VipSpec, VipUpdate
from lb.errors import Conflict, InvalidInput, LimitReached, NotFound, PreconditionFailed

CP = Callable[..., ControlPlane]


def vip(port: int = 80, *backends: str, address: str = "198.18.0.10") -> VipSpec:
    return VipSpec.model_validate(
        {"protocol": "tcp", "address": address, "port": port,
         "backends": [{"address": a} for a in backends]}
    )


def be(address: str, **kw: object) -> BackendSpec:
    return BackendSpec.model_validate({"address": address, **kw})


def ten(prefix: str = "198.18.1") -> list[str]:
    return [f"{prefix}.{i}" for i in range(1, 11)]


def test_create_duplicate_vip_is_conflict(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip())
    with pytest.raises(Conflict):
        cp.create_vip(vip(80, "198.18.1.1"))
    assert cp.generation == 1


def test_unknown_vip_and_backend_are_not_found(make_control: CP) -> None:
    cp = make_control()
    with pytest.raises(NotFound):
        cp.get_vip("tcp:198.18.0.10:80")
    cp.create_vip(vip(80, "198.18.1.1"))
    with pytest.raises(NotFound) as e:
        cp.remove_backend("tcp:198.18.0.10:80", "198.18.1.2")
    assert e.value.field == "address"
    with pytest.raises(InvalidInput):
        cp.get_vip("tcp:nowhere:80")


def test_vip_ids_and_backend_addresses_accept_any_spelling(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip(53, "2001:db8::1", address="2001:db8::10"))
    assert cp.get_vip("TCP:[2001:DB8:0::10]:53").id == "tcp:[2001:db8::10]:53"
    cp.update_backend("tcp:[2001:db8::10]:53", "2001:DB8::0001", BackendUpdate(weight=5))
    assert cp.list_backends("tcp:[2001:db8::10]:53")[0].weight == 5


def test_add_backend_checks_the_vip_rules(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip(53, address="2001:db8::10"))
    with pytest.raises(InvalidInput) as e:
        cp.add_backend("tcp:[2001:db8::10]:53", be("198.18.1.1"))
    assert e.value.field == "backend.address"
    cp.add_backend("tcp:[2001:db8::10]:53", be("2001:db8::1"))
    with pytest.raises(Conflict):
        cp.add_backend("tcp:[2001:db8::10]:53", be("2001:db8:0::1"))
    assert cp.generation == 2


def test_update_vip_changes_only_given_fields(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip(80, "198.18.1.1"))
    v = cp.update_vip("tcp:198.18.0.10:80", VipUpdate(encap="gue"))
    assert (v.encap, v.effective_outer_source, v.hash_src_only) == ("gue", "lb", False)
    v = cp.update_vip("tcp:198.18.0.10:80", VipUpdate(outer_source="rss", lru_bypass=True))
    assert (v.encap, v.outer_source, v.lru_bypass) == ("gue", "rss", True)
    v = cp.update_vip("tcp:198.18.0.10:80", VipUpdate(outer_source=None))
    assert v.outer_source is None and v.backends == [be("198.18.1.1")]
    assert cp.generation == 4


def test_backend_limit_is_limit_reached(make_control: CP) -> None:
    from lb.config import DataplaneConfig

    cp = make_control(config=DataplaneConfig(ring_size=4099, max_vips=4, max_reals=3))
    cp.create_vip(vip(80, "198.18.1.1", "198.18.1.2"))
    with pytest.raises(LimitReached, match=r"max_reals - 1"):
        cp.add_backend("tcp:198.18.0.10:80", be("198.18.1.3"))
    cp.create_vip(vip(81, "198.18.1.2"))  # a shared backend takes no new slot
    assert cp.generation == 2


def test_state_survives_a_restart(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip(80, *ten()))
    cp.update_backend("tcp:198.18.0.10:80", "198.18.1.3", BackendUpdate(state="draining"))
    cp.close()
    again = make_control()
    assert again.get_state() == cp.get_state()
    assert again.generation == 2


def test_plan_reports_added_removed_changed_and_moved_fraction(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip(80, *ten()))
    cp.create_vip(vip(443, "198.18.1.1"))
    target = State(vips=[
        vip(80, *ten()[:-1], "198.18.9.9"),  # one of ten swapped: about 1/10 moves... twice
        vip(8080, "198.18.1.1"),
    ])
    plan = cp.plan(target)
    assert plan.added_vips == ["tcp:198.18.0.10:8080"]
    assert plan.removed_vips == ["tcp:198.18.0.10:443"]
    [changed] = plan.changed_vips
    assert changed.vip_id == "tcp:198.18.0.10:80"
    assert changed.added_backends == ["198.18.9.9"]
    assert changed.removed_backends == ["198.18.1.10"]
    assert 0.1 < changed.moved_fraction < 0.3
    assert plan.from_generation == 2 and plan.to_generation is None
    assert cp.generation == 2  # a plan changes nothing


def test_plan_of_a_weight_change(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip(80, *ten()))
    heavier = [be(a, weight=2 if a == "198.18.1.1" else 1) for a in ten()]
    target = State(vips=[vip(80).model_copy(update={"backends": heavier})])
    [changed] = cp.plan(target).changed_vips
    assert [c.address for c in changed.changed_backends] == ["198.18.1.1"]
    assert 0.05 < changed.moved_fraction < 0.15  # its share goes from 1/10 to 2/11


def test_apply_state_is_one_change_and_honours_if_generation(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip(80, "198.18.1.1"))
    target = State(vips=[vip(80, "198.18.1.2"), vip(81, "198.18.1.2")])
    with pytest.raises(PreconditionFailed):
        cp.apply_state(target, if_generation=0)
    plan = cp.apply_state(target, if_generation=1)
    assert plan.to_generation == 2 == cp.generation
    assert cp.get_state().vips == target.vips
    again = cp.apply_state(target)
    assert again.empty and again.to_generation is None
    assert cp.generation == 2  # nothing to change, nothing bumped


def test_apply_state_refuses_an_invalid_state_whole(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip(80, "198.18.1.1"))
    bad = State(vips=[vip(81), vip(53, "198.18.1.1", address="2001:db8::1")])
    with pytest.raises(InvalidInput) as e:
        cp.apply_state(bad)
    assert e.value.field == "vips[1].backends[0].address"
    assert [v.id for v in cp.list_vips()] == ["tcp:198.18.0.10:80"]


def test_without_maps_verify_is_empty(make_control: CP) -> None:
    cp = make_control()
    cp.create_vip(vip(80, "198.18.1.1"))
    assert cp.verify() == [] and cp.repair() == [] and cp.reconcile_errors == 0


def test_a_change_computes_identities_of_new_specs_only(
    make_control: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Identities are cached per spec and a change keeps the specs it does not touch: no
    # per-change work proportional to the VIP's backends (was ~11 per backend per change).
    import lb.control.model

    cp = make_control()
    cp.create_vip(vip(80, *[f"198.18.{i // 250}.{i % 250 + 1}" for i in range(100)]))
    made: list[object] = []
    text = lb.control.model._text
    monkeypatch.setattr(lb.control.model, "_text", lambda a: made.append(a) or text(a))
    cp.add_backend("tcp:198.18.0.10:80", be("198.18.9.1"))
    cp.update_backend("tcp:198.18.0.10:80", "198.18.0.5", BackendUpdate(weight=7))
    cp.remove_backend("tcp:198.18.0.10:80", "198.18.9.1")
    assert len(made) <= 3, f"{len(made)} identities computed for 3 changes"
