"""Runtime and data-plane settings that cannot work are refused with the limit named
(issue 14, item 8). Plain Python, no root."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from lb.config import RuntimeConfig
from lb.control.facade import ControlPlane
from lb.control.model import VipSpec
from lb.errors import InvalidInput
from lb.settings import load_settings
from tests.control.conftest import StateSettings


@pytest.mark.parametrize("frame", [1, 67, 101])
def test_max_frame_below_ipv4s_minimum_mtu_after_ipip_is_refused(frame: int) -> None:
    with pytest.raises(InvalidInput, match=r"below IPv4's minimum of 68: use at least 102") as e:
        load_settings(runtime={"max_frame": frame})
    assert "XLB_RUNTIME__MAX_FRAME" in e.value.detail


@pytest.mark.parametrize("frame", [0, 102, 1514, 9014])
def test_max_frame_off_or_at_least_the_ipv4_minimum_is_accepted(frame: int) -> None:
    assert load_settings(runtime={"max_frame": frame}).runtime.max_frame == frame


def _vip(address: str, backend: str, encap: str = "ipip") -> VipSpec:
    return VipSpec.model_validate({"protocol": "tcp", "address": address, "port": 80,
                                   "encap": encap, "outer_source": "rss",
                                   "backends": [{"address": backend}]})


@pytest.mark.parametrize(
    ("vip", "frame", "least"),
    [
        (_vip("2001:db8::10", "2001:db8:1::2"), 1333, 1334),  # IPv6 client, IPv6 outer
        (_vip("2001:db8::10", "2001:db8:1::2", "gue"), 1341, 1342),  # + GUE's UDP
        (_vip("198.18.0.10", "2001:db8:1::2", "gue"), 129, 130),  # IPv4 client, IPv6 GUE
        (_vip("198.18.0.10", "198.18.1.2"), 101, 102),
    ],
    ids=["v6-ipip", "v6-gue", "v4-in-v6-gue", "v4-ipip"],
)
def test_a_vip_whose_clients_would_get_less_than_the_minimum_mtu_is_refused(
    tmp_path: Path, vip: VipSpec, frame: int, least: int
) -> None:
    cp = ControlPlane(StateSettings(tmp_path), None, runtime=RuntimeConfig(max_frame=frame))
    try:
        with pytest.raises(InvalidInput, match=rf"raise max_frame to at least {least} ") as e:
            cp.create_vip(vip)
        assert e.value.field == "backends[0].address"
        assert "XLB_RUNTIME__MAX_FRAME" in e.value.detail
        cp.close()
        cp = ControlPlane(StateSettings(tmp_path), None,
                          runtime=RuntimeConfig(max_frame=least))
        cp.create_vip(vip)
    finally:
        cp.close()


@pytest.mark.parametrize(
    ("runtime", "says"),
    [
        ({"gateway_mac": "ff:ff:ff:ff:ff:ff"}, "multicast/broadcast MAC"),
        ({"gateway_mac": "01:00:5e:00:00:01"}, "multicast/broadcast MAC"),
        ({"src_v4": "127.0.0.1"}, "loopback"),
        ({"src_v6": "ff02::1"}, "multicast"),
        ({"src_v4": "0.1.2.3"}, "0.0.0.0/8"),
        ({"rss_v4": "127.1.0.0/16"}, "loopback"),
        ({"rss_v4": "240.1.0.0/16"}, "240.0.0.0/4"),
        ({"rss_v6": "fe80::/64"}, "link-local"),
    ],
)
def test_runtime_addresses_that_cannot_work_are_refused(runtime: dict[str, str], says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as e:
        load_settings(runtime=runtime)
    assert e.value.field == "runtime." + next(iter(runtime))


@pytest.mark.parametrize("ring", [3, 97])
def test_a_ring_that_cannot_hold_one_backend_is_refused(ring: int) -> None:
    with pytest.raises(InvalidInput, match="between 101 and"):
        load_settings(dataplane={"ring_size": ring})


def test_usable_runtime_addresses_are_accepted() -> None:
    s = load_settings(runtime={"src_v4": "198.18.0.1", "src_v6": "2001:db8::1",
                               "rss_v4": "198.19.0.0/16", "gateway_mac": "02:00:00:00:00:fe"})
    assert s.runtime.src_v4 == ipaddress.IPv4Address("198.18.0.1")
