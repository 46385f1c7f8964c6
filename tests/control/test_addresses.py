"""Addresses and ids the model refuses: IPv6 zone ids, non-ASCII digits, unusable ranges.

Plain Python (no root): the rules live in lb.control.model, which the API, the store and
every whole-state change go through.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lb.config import RuntimeConfig
from lb.control.facade import ControlPlane
from lb.control.model import (
    BackendSpec,
    VipSpec,
    canonical_address,
    parse_address,
    parse_vip_id,
    validate_vip,
)
from lb.errors import InvalidInput
from tests.control.conftest import StateSettings


def test_a_zone_id_is_refused_in_vip_and_backend_addresses() -> None:
    with pytest.raises(ValidationError, match=r"zone id \(%x\).*alias 2001:db8::10"):
        VipSpec(protocol="tcp", address="2001:db8::10%x", port=80)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"zone id \(%zz\)"):
        BackendSpec(address="2001:db8:11::8%zz")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text", ["tcp:[2001:db8::10%x]:80", "tcp:[2001:db8::10%25x]:80"], ids=["raw", "encoded"]
)
def test_a_zone_id_is_refused_in_vip_ids(text: str) -> None:
    with pytest.raises(InvalidInput, match="zone id") as e:
        parse_vip_id(text)
    assert e.value.field == "vip_id"


def test_a_zone_id_is_refused_in_backend_and_explain_addresses() -> None:
    with pytest.raises(InvalidInput, match="zone id") as e:
        canonical_address("2001:db8:11::8%zz", field="address")
    assert e.value.field == "address"
    with pytest.raises(InvalidInput, match="zone id"):
        parse_address("fe80::1%eth0", field="dst")


@pytest.mark.parametrize(
    "text",
    ["tcp:198.18.0.10:\u00b2", "tcp:198.18.0.10:\u0668\u0660", "tcp:198.18.0.10:\uff18\uff10",
     "tcp:198.18.0.1\u0660:80", "tcp:[2001:db8::\u0661]:80", "tcp:198.18.0.10:99999999999"],
    ids=["superscript-two", "arabic-indic-80", "fullwidth-80", "arabic-indic-octet",
         "arabic-indic-hextet", "long-port"],
)
def test_vip_ids_are_parsed_as_ascii_only(text: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_vip_id(text)
    assert e.value.field == "vip_id"


def test_non_ascii_digits_never_alias_a_real_port() -> None:
    assert parse_vip_id("tcp:198.18.0.10:80").port == 80
    with pytest.raises(InvalidInput):
        parse_vip_id("tcp:198.18.0.10:\u0668\u0660")  # Arabic-Indic 80


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.1.2.3", "0.0.0.0/8"),
        ("240.0.0.1", "240.0.0.0/4"),
        ("255.255.255.255", "broadcast"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:198.18.0.10", "IPv4-mapped"),
    ],
)
def test_unusable_addresses_are_refused_as_vips_and_backends_with_the_reason(
    address: str, reason: str
) -> None:
    with pytest.raises(InvalidInput, match=reason) as e:
        validate_vip(VipSpec(protocol="tcp", address=address, port=80))  # type: ignore[arg-type]
    assert e.value.field == "address"
    family = "2001:db8::10" if ":" in address else "198.18.0.10"
    vip = VipSpec.model_validate({"protocol": "tcp", "address": family, "port": 80,
                                  "backends": [{"address": address}]})
    with pytest.raises(InvalidInput, match=reason) as e:
        validate_vip(vip)
    assert e.value.field == "backends[0].address"


def test_lab_and_global_addresses_stay_usable() -> None:
    for address in ("198.18.0.10", "2001:db8::10", "10.0.0.1", "192.0.2.1", "2a00::1"):
        validate_vip(VipSpec(protocol="tcp", address=address, port=80))  # type: ignore[arg-type]


def _cp(tmp_path: Path, **runtime: object) -> ControlPlane:
    return ControlPlane(StateSettings(tmp_path), None, runtime=RuntimeConfig(**runtime))  # type: ignore[arg-type]


def _gue(*backends: str, **kw: object) -> VipSpec:
    return VipSpec.model_validate({"protocol": "udp", "address": "198.18.0.10", "port": 53,
                                   "encap": "gue", "backends": [{"address": a} for a in backends],
                                   **kw})


def test_outer_source_lb_without_an_lb_source_is_refused_naming_the_setting(
    tmp_path: Path,
) -> None:
    cp = _cp(tmp_path)  # src_v4 0.0.0.0, src_v6 ::
    try:
        with pytest.raises(InvalidInput, match=r"XLB_RUNTIME__SRC_V4 / XLB_RUNTIME__SRC_V6") as e:
            cp.create_vip(_gue())
        assert e.value.field == "outer_source"
        ipip_lb = _gue("198.18.1.2", encap="ipip", outer_source="lb")
        with pytest.raises(InvalidInput, match="outer_source lb"):
            cp.create_vip(ipip_lb)
        # RSS-friendly sources need no LB address.
        cp.create_vip(_gue("198.18.1.2", outer_source="rss"))
    finally:
        cp.close()


def test_outer_source_lb_needs_the_source_of_the_backends_family(tmp_path: Path) -> None:
    import ipaddress

    cp = _cp(tmp_path, src_v4=ipaddress.IPv4Address("198.18.0.1"))
    try:
        vip = cp.create_vip(_gue("198.18.1.2"))
        with pytest.raises(InvalidInput, match=r"IPv6 backend 2001:db8::2.*XLB_RUNTIME__SRC_V6"):
            cp.add_backend(vip.id, BackendSpec(address="2001:db8::2"))  # type: ignore[arg-type]
        assert [b.identity for b in cp.get_vip(vip.id).backends] == ["198.18.1.2"]
    finally:
        cp.close()
