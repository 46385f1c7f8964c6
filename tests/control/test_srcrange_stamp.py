"""Source ranges through the control plane and the live program: an established flow trusts
the verdict its connection-table entry caches only until the VIP's ranges change
(xdp/balancer/srcrange.h). Each change through the API must make live flows check again.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from lb.consts import XDP_DROP, XDP_TX
from lb.control.facade import ControlPlane
from lb.control.model import VipSpec, VipUpdate
from lb.dataplane.protect import SRC_TRUST_WAIT_S
from lb.dataplane.testrun import TestRunner
from tests.control.conftest import StateSettings

pytestmark = pytest.mark.bpf

VIP = "198.18.0.10"
VID = f"tcp:{VIP}:80"
NEXT_UNIT_S = SRC_TRUST_WAIT_S  # from then on the next stamp is trusted


def _frame(src: str, flags: str) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(Ether(src="02:00:00:00:00:aa", dst="02:00:00:00:00:01")
                 / IP(src=src, dst=VIP) / TCP(sport=40000, dport=80, flags=flags))


# One backend, and an allow list holding the test clients (198.18.2.x).
ALLOW_2 = VipSpec.model_validate({"protocol": "tcp", "address": VIP, "port": 80,
                                  "backends": [{"address": "198.18.1.1"}],
                                  "allow": ["198.18.2.0/24"]})


def test_every_range_change_reaches_established_flows(live: Any, tmp_path: Any) -> None:
    cp = ControlPlane(StateSettings(tmp_path / "state"), live)
    try:
        run = TestRunner(live.prog_fd).run
        cp.create_vip(ALLOW_2)
        num = cp.vip_number(VID)

        def stamp() -> int:
            return int(live.src_changed[live.src_changed.Key(num)].value)

        # The create stamped the VIP (0 would mean "check every packet": nothing cached).
        assert stamp() != 0
        time.sleep(NEXT_UNIT_S)
        a, b = "198.18.2.1", "198.18.2.2"
        for src in (a, b):
            assert run(_frame(src, "S")).verdict == XDP_TX
            time.sleep(NEXT_UNIT_S)
            assert run(_frame(src, "A")).verdict == XDP_TX  # stamped after the create
        # A deny of one client: its live flow stops at once, the other's goes on.
        before = stamp()
        cp.update_vip(VID, VipUpdate(deny=[f"{a}/32"]))
        assert stamp() != before, "the change was not stamped"
        assert run(_frame(a, "A")).verdict == XDP_DROP
        assert run(_frame(b, "A")).verdict == XDP_TX
        # The allow list narrowed past the other client: its flow stops too.
        time.sleep(NEXT_UNIT_S)
        cp.update_vip(VID, VipUpdate(allow=["198.18.3.0/24"]))
        assert run(_frame(b, "A")).verdict == XDP_DROP
        # Every list emptied: both flows are forwarded again (their entries are still there).
        cp.update_vip(VID, VipUpdate(allow=[], deny=[]))
        assert run(_frame(a, "A")).verdict == XDP_TX
        assert run(_frame(b, "A")).verdict == XDP_TX
        # A deny of everyone on a VIP that had no list: the flags turn the check on.
        time.sleep(NEXT_UNIT_S)
        assert run(_frame(a, "A")).verdict == XDP_TX
        cp.update_vip(VID, VipUpdate(deny=["0.0.0.0/0"]))
        assert run(_frame(a, "A")).verdict == XDP_DROP
        assert cp.verify() == []
    finally:
        cp.close()


def test_a_range_change_cut_short_by_a_failed_write_still_reaches_established_flows(
    live: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = ControlPlane(StateSettings(tmp_path / "state"), live)
    try:
        run = TestRunner(live.prog_fd).run
        cp.create_vip(ALLOW_2)
        time.sleep(NEXT_UNIT_S)
        a = "198.18.2.1"
        assert run(_frame(a, "S")).verdict == XDP_TX
        time.sleep(NEXT_UNIT_S)
        assert run(_frame(a, "A")).verdict == XDP_TX  # its entry trusts the verdict now
        assert cp._reconciler is not None
        io = cp._reconciler.io
        real, calls = io.set_src_range, []

        def second_fails(key: Any, verdict: int) -> None:
            calls.append(key)
            if len(calls) > 1:
                raise OSError(12, "Cannot allocate memory")
            real(key, verdict)

        monkeypatch.setattr(io, "set_src_range", second_fails)
        # Two denies that both hold the client: whichever is written first is live when the
        # second fails; the change is kept and counted, and the flow must stop now.
        cp.update_vip(VID, VipUpdate(deny=[f"{a}/32", "198.18.2.0/30"]))
        assert cp.reconcile_errors == 1 and not cp.in_sync
        assert run(_frame(a, "A")).verdict == XDP_DROP
        monkeypatch.undo()
    finally:
        cp.close()
