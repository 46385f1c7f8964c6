"""XDP attach/replace/detach on a veth pair inside a test namespace (never a host interface)."""

from __future__ import annotations

import subprocess

import pytest

from lb.dataplane import attach as xdp
from lb.dataplane.loader import prog_info
from lb.errors import Conflict, ForeignProgram, InvalidInput, KernelError
from tests.kernel.conftest import Veth

pytestmark = [pytest.mark.bpf, pytest.mark.netns]


def _id(fd: int) -> int:
    return prog_info(fd).id


def test_native_attach_reports_mode_and_prog_id(ours_fd: int, veth: Veth) -> None:
    info = xdp.attach(ours_fd, veth.a, mode="native", netns=veth.ns)
    assert (info.mode, info.prog_id, info.replaced_prog_id) == ("native", _id(ours_fd), None)
    assert "as configured" in info.reason
    now = xdp.query(veth.a, netns=veth.ns)
    assert (now.prog_id, now.mode, now.prog_name, now.ours) == (
        _id(ours_fd), "native", "xdp_balancer", True
    )


def test_generic_attach(ours_fd: int, veth: Veth) -> None:
    info = xdp.attach(ours_fd, veth.a, mode="generic", netns=veth.ns)
    assert info.mode == "generic"
    assert xdp.query(veth.a, netns=veth.ns).mode == "generic"


def test_auto_prefers_native(ours_fd: int, veth: Veth) -> None:
    info = xdp.attach(ours_fd, veth.a, mode="auto", netns=veth.ns)
    assert info.mode == "native"
    assert info.reason == "auto: native mode accepted"


def test_auto_falls_back_to_generic_and_says_why(ours_fd: int, veth: Veth) -> None:
    # A veth refuses native XDP while its peer's MTU is above 3506: a real refusal.
    veth.ip("link", "set", veth.b, "mtu", "9000")
    info = xdp.attach(ours_fd, veth.a, mode="auto", netns=veth.ns)
    assert info.mode == "generic"
    assert "native refused" in info.reason and "Peer MTU is too large" in info.reason
    assert xdp.query(veth.a, netns=veth.ns).mode == "generic"


def test_native_refusal_is_a_kernel_error_with_the_reason(
    ours_fd: int, veth: Veth
) -> None:
    veth.ip("link", "set", veth.b, "mtu", "9000")
    with pytest.raises(KernelError, match=r"Peer MTU is too large.*errno 34"):
        xdp.attach(ours_fd, veth.a, mode="native", netns=veth.ns)
    assert xdp.query(veth.a, netns=veth.ns).prog_id is None


def test_foreign_program_is_kept_unless_replace_foreign(
    ours_fd: int, veth: Veth, foreign_fd: int
) -> None:
    first = xdp.attach(foreign_fd, veth.a, mode="native", netns=veth.ns)
    with pytest.raises(ForeignProgram, match=r"'xdp_other'.*replace_foreign"):
        xdp.attach(ours_fd, veth.a, netns=veth.ns)
    assert xdp.query(veth.a, netns=veth.ns).prog_id == first.prog_id, "foreign program untouched"
    with pytest.raises(ForeignProgram, match="not detaching"):
        xdp.detach(veth.a, netns=veth.ns)

    info = xdp.attach(ours_fd, veth.a, netns=veth.ns, replace_foreign=True)
    assert (info.mode, info.prog_id, info.replaced_prog_id) == (
        "native", _id(ours_fd), first.prog_id
    )
    assert "foreign" in info.reason


def test_reattach_replaces_ours_in_its_mode(
    ours_fd: int, veth: Veth, foreign_fd: int
) -> None:
    xdp.attach(foreign_fd, veth.a, mode="generic", netns=veth.ns)
    xdp.attach(ours_fd, veth.a, netns=veth.ns, replace_foreign=True)
    again = xdp.attach(ours_fd, veth.a, mode="auto", netns=veth.ns)
    assert again.mode == "generic", "auto keeps the mode in effect rather than detaching"
    assert "atomically replaced our program" in again.reason
    with pytest.raises(Conflict, match="cannot switch modes atomically"):
        xdp.attach(ours_fd, veth.a, mode="native", netns=veth.ns)


def test_expected_prog_id_guards_against_a_concurrent_change(
    ours_fd: int, veth: Veth
) -> None:
    info = xdp.attach(ours_fd, veth.a, netns=veth.ns)
    with pytest.raises(Conflict, match="someone changed it"):
        xdp.attach(ours_fd, veth.a, netns=veth.ns, expected_prog_id=info.prog_id + 1)


def test_detach_removes_ours(ours_fd: int, veth: Veth) -> None:
    with xdp.attached(ours_fd, veth.a, mode="generic", netns=veth.ns) as info:
        assert xdp.query(veth.a, netns=veth.ns).prog_id == info.prog_id
    assert xdp.query(veth.a, netns=veth.ns).prog_id is None
    assert xdp.detach(veth.a, netns=veth.ns) is None, "detaching nothing is a no-op"


def test_unknown_namespace_or_interface_is_named(ours_fd: int, veth: Veth) -> None:
    ghost = veth.ns + "-nope"
    with pytest.raises(InvalidInput, match="does not exist") as exc:
        xdp.query(veth.a, netns=ghost)
    assert exc.value.field == "netns"
    ns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ghost not in ns_list, "a typo must not create a namespace"
    with pytest.raises(InvalidInput, match="no interface xv9") as exc:
        xdp.attach(ours_fd, "xv9", netns=veth.ns)
    assert exc.value.field == "interface"


def test_gateway_mac_comes_from_the_default_routes_neighbour(veth: Veth) -> None:
    with pytest.raises(InvalidInput, match="no default route") as exc:
        xdp.resolve_gateway_mac(veth.a, netns=veth.ns)
    assert exc.value.field == "runtime.gateway_mac"
    veth.ip("addr", "add", "198.18.0.1/24", "dev", veth.a)
    veth.ip("route", "add", "default", "via", "198.18.0.254", "dev", veth.a)
    with pytest.raises(InvalidInput, match=r"198\.18\.0\.254 .* no neighbour entry"):
        xdp.resolve_gateway_mac(veth.a, netns=veth.ns)
    veth.ip("neigh", "add", "198.18.0.254", "lladdr", "02:00:00:00:00:FE", "dev", veth.a)
    assert xdp.resolve_gateway_mac(veth.a, netns=veth.ns) == "02:00:00:00:00:fe"
