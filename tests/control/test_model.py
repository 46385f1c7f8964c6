"""Desired-state rules: each refusal names the field and the rule or limit."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from lb.config import DataplaneConfig
from lb.consts import F_ENCAP_GUE, F_HASH_SRC_ONLY, F_LRU_BYPASS, F_SRC_LB
from lb.control import maglev
from lb.control.model import (
    MAX_WEIGHT,
    BackendSpec,
    Limits,
    VipSpec,
    invalid_from_validation,
    parse_vip_id,
    validate_state,
    validate_vip,
)
from lb.errors import InvalidInput, LimitReached

LIMITS = Limits.from_config(DataplaneConfig(ring_size=4099, max_vips=2, max_reals=4))


def vip(address: str = "198.18.0.10", port: int = 80, *backends: str, **kw: object) -> VipSpec:
    return VipSpec.model_validate(
        {"protocol": "tcp", "address": address, "port": port,
         "backends": [{"address": a} for a in backends], **kw}
    )


def test_weight_bound_is_maglevs() -> None:
    assert MAX_WEIGHT == maglev.MAX_WEIGHT


def test_limits_leave_index_zero_unused() -> None:
    assert Limits(max_vips=2, max_backends=3, ring_size=4099, max_src_ranges=16384) == LIMITS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:198.18.0.10:80", ("tcp", ipaddress.ip_address("198.18.0.10"), 80)),
        ("udp:[2001:db8::10]:53", ("udp", ipaddress.ip_address("2001:db8::10"), 53)),
        ("TCP:198.18.0.10:0", ("tcp", ipaddress.ip_address("198.18.0.10"), 0)),
    ],
)
def test_parse_vip_id(text: str, expected: tuple[object, ...]) -> None:
    assert tuple(parse_vip_id(text)) == expected


@pytest.mark.parametrize(
    "text", ["sctp:198.18.0.10:80", "tcp:2001:db8::10:53", "tcp:198.18.0.10", "tcp:1.2.3:80",
             "tcp:198.18.0.10:65536", "tcp:[198.18.0.10]:80", ""],
)
def test_parse_vip_id_refuses_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_vip_id(text)
    assert e.value.field == "vip_id"


def test_vip_id_round_trips_and_brackets_ipv6() -> None:
    v6 = vip("2001:db8:0::10", 53)
    assert v6.id == "tcp:[2001:db8::10]:53"
    assert parse_vip_id(v6.id).address == v6.address
    assert vip().id == "tcp:198.18.0.10:80"


@pytest.mark.parametrize(
    ("kw", "flags"),
    [
        ({}, 0),
        ({"hash_src_only": True}, F_HASH_SRC_ONLY),
        ({"lru_bypass": True}, F_LRU_BYPASS),
        ({"encap": "gue"}, F_ENCAP_GUE | F_SRC_LB),
        ({"encap": "gue", "outer_source": "rss"}, F_ENCAP_GUE),
        ({"outer_source": "lb"}, F_SRC_LB),
    ],
    ids=["plain", "hash-src-only", "lru-bypass", "gue-defaults-to-lb-source",
         "gue-with-rss-source", "ipip-with-lb-source"],
)
def test_flags(kw: dict[str, object], flags: int) -> None:
    assert vip(**kw).flags == flags


def test_ipv6_vip_with_ipv4_backend_is_refused_naming_the_rule() -> None:
    with pytest.raises(InvalidInput) as e:
        validate_vip(vip("2001:db8::10", 80, "2001:db8::1", "198.18.1.1"))
    assert e.value.field == "backends[1].address"
    assert "IPv6 VIP cannot have an IPv4 backend" in e.value.detail


def test_ipv4_vip_with_ipv6_backend_is_fine() -> None:
    validate_vip(vip("198.18.0.10", 80, "2001:db8::1"))


def test_duplicate_backend_in_another_spelling_names_both_positions() -> None:
    with pytest.raises(InvalidInput) as e:
        validate_vip(vip("198.18.0.10", 80, "2001:db8::1", "198.18.1.2", "2001:DB8:0:0::1"))
    assert e.value.field == "backends[2].address"
    assert "backends[0]" in e.value.detail


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"address": "0.0.0.0"}, "address"),
        ({"address": "224.0.0.1"}, "address"),
        ({"backends": [{"address": "255.255.255.255"}]}, "backends[0].address"),
    ],
)
def test_unusable_addresses(spec: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as e:
        validate_vip(VipSpec.model_validate({"protocol": "udp", "address": "198.18.0.1",
                                             "port": 53, **spec}))
    assert e.value.field == field


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"port": 65536}, "port"),
        ({"protocol": "icmp"}, "protocol"),
        ({"backends": [{"address": "198.18.1.1", "weight": MAX_WEIGHT + 1}]},
         "backends[0].weight"),
        ({"backends": [{"address": "198.18.1.1", "state": "gone"}]}, "backends[0].state"),
        ({"address": "not-an-address"}, "address"),
    ],
)
def test_field_constraints_name_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        VipSpec.model_validate({"protocol": "tcp", "address": "198.18.0.1", "port": 80, **spec})
    assert invalid_from_validation(e.value).field == field


def test_too_many_vips_names_max_vips() -> None:
    with pytest.raises(LimitReached) as e:
        validate_state([vip(port=p) for p in (1, 2, 3)], LIMITS)
    assert e.value.field == "vips"
    assert "max_vips" in e.value.detail and "2" in e.value.detail


def test_shared_backends_count_once_against_max_reals() -> None:
    shared = ["198.18.1.1", "198.18.1.2", "198.18.1.3"]
    validate_state([vip("198.18.0.10", 80, *shared), vip("198.18.0.10", 443, *shared)], LIMITS)
    with pytest.raises(LimitReached) as e:
        validate_state([vip("198.18.0.10", 80, *shared), vip("198.18.0.11", 80, "198.18.1.4")],
                       LIMITS)
    assert e.value.field == "backends"
    assert "max_reals - 1" in e.value.detail


def test_duplicate_vip_in_state() -> None:
    with pytest.raises(InvalidInput) as e:
        validate_state([vip(), vip()], LIMITS)
    assert e.value.field == "vips[1]"


def test_state_rule_names_the_vip() -> None:
    with pytest.raises(InvalidInput) as e:
        validate_state([vip(), vip("2001:db8::1", 80, "198.18.1.1")], LIMITS)
    assert e.value.field == "vips[1].backends[0].address"


def test_ring_balance_limit() -> None:
    many = [f"198.18.1.{i}" for i in range(1, 42)]  # 4099 // 100 = 40 in the ring at most
    with pytest.raises(LimitReached) as e:
        validate_vip(vip("198.18.0.10", 80, *many), LIMITS)
    assert e.value.field == "backends"


def test_backend_states_decide_ring_and_reals() -> None:
    active = BackendSpec.model_validate({"address": "198.18.1.1"})
    zero = active.model_copy(update={"weight": 0})
    draining = active.model_copy(update={"state": "draining"})
    disabled = active.model_copy(update={"state": "disabled"})
    assert [(b.in_ring, b.in_reals) for b in (active, zero, draining, disabled)] == [
        (True, True), (False, True), (False, True), (False, False)]


def test_identity_is_canonical_text_computed_once_per_spec(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    import lb.control.model

    made: list[object] = []
    text = lb.control.model._text
    monkeypatch.setattr(lb.control.model, "_text", lambda a: made.append(a) or text(a))
    b = BackendSpec.model_validate({"address": "2001:DB8:0::2"})
    assert [b.identity for _ in range(3)] == ["2001:db8::2"] * 3
    assert len(made) == 1


def test_model_copy_with_another_address_has_that_identity() -> None:
    b = BackendSpec.model_validate({"address": "198.18.1.1"})
    assert b.identity == "198.18.1.1"
    moved = b.model_copy(update={"address": ipaddress.ip_address("198.18.1.2")})
    assert moved.identity == "198.18.1.2"
    assert b.model_copy(update={"weight": 3}).identity == "198.18.1.1"
    assert moved == BackendSpec.model_validate({"address": "198.18.1.2"})  # cache not compared


def _ranged(allow: list[str], deny: list[str], address: str = "198.18.0.10") -> VipSpec:
    return VipSpec.model_validate({"protocol": "tcp", "address": address, "port": 80,
                                   "allow": allow, "deny": deny})


def test_source_ranges_over_the_compiled_limit_are_422_naming_the_list() -> None:
    limits = LIMITS._replace(max_src_ranges=2)
    validate_vip(_ranged(["198.18.0.0/16", "198.18.1.0/24"], []), limits)
    with pytest.raises(InvalidInput) as e:
        validate_vip(_ranged(["198.18.0.0/16"], ["198.18.1.0/24", "198.18.2.0/24"]), limits)
    assert e.value.field == "deny" and e.value.status == 422


def test_source_ranges_of_all_vips_must_fit_each_familys_trie() -> None:
    limits = LIMITS._replace(max_src_ranges=2)
    a = _ranged(["198.18.0.0/16"], [])
    b = _ranged([], ["198.18.1.0/24", "198.18.2.0/24"], address="198.18.0.11")
    v6 = _ranged(["2001:db8::/32", "2001:db8:1::/48"], [], address="2001:db8::10")
    validate_state([a, v6], limits)  # two IPv4 entries, two IPv6 entries
    with pytest.raises(InvalidInput) as e:
        validate_state([a, b], limits)
    assert e.value.field == "vips" and "3 IPv4 source prefixes" in e.value.detail


def test_source_ranges_set_the_flags_and_round_trip_as_json() -> None:
    from lb.consts import F_SRC_ALLOW, F_SRC_RANGES

    v = _ranged(["198.18.0.0/16"], ["198.18.1.1"])
    assert v.flags & (F_SRC_RANGES | F_SRC_ALLOW) == F_SRC_RANGES | F_SRC_ALLOW
    assert _ranged([], ["198.18.1.0/24"]).flags & F_SRC_ALLOW == 0
    again = VipSpec.model_validate_json(v.model_dump_json())
    assert again == v and [str(n) for n in again.deny] == ["198.18.1.1/32"]
