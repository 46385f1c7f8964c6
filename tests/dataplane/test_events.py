"""Events and capture from the balancer's ring (xdp/balancer/events.h), through BPF_PROG_TEST_RUN.

Every row of the packet table (tests/dataplane/test_balancer.py) runs again with every event
type on: each frame gives one record whose verdict is the row's and whose reason is a counter
the row moves, and together the rows report every reason they produce. Then the sampling
settings of ev_cfg (1 in N, one type, one VIP), a full ring (records lost, counted), the
flood guard's change and capture (the frame as received and as sent).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

from lb.config import ProtectConfig
from lb.consts import XDP_DROP, XDP_PASS, XDP_TX
from lb.dataplane import protect
from lb.dataplane.events import (
    ALL_TYPES,
    EV_CAPTURE,
    EV_F_FLOOD,
    EV_F_GUARD,
    EV_K_EVENT,
    EV_K_RX,
    EV_K_TX,
    EV_SNAPLEN,
    EV_T_DROP,
    EV_T_FLOW,
    EV_T_GUARD,
    EventsControl,
    RingReader,
)
from tests.dataplane import packets as P
from tests.dataplane.lab import Lab
from tests.dataplane.packets import NONVIP4, REAL4, VIP4B
from tests.dataplane.test_balancer import CASES, SYN4, V4, Case, vip_with

pytestmark = pytest.mark.bpf

# Counted slots that name no verdict (a table entry's fate, the guard's bookkeeping, the
# totals): no record carries them as its reason.
NOT_REASONS = {"STAT_XDP_PASS", "STAT_XDP_DROP", "STAT_XDP_TX", "STAT_LRU_EXPIRED",
               "STAT_LRU_REAL_GONE", "STAT_CONN_EVICT", "STAT_SECOND_SKIP", "STAT_GUARD_FLOOD",
               "STAT_GUARD_SYN_STATELESS", "STAT_GUARD_NO_EVICT"}


@pytest.fixture(scope="module")
def ring(wiped_balancer: object) -> Iterator[tuple[EventsControl, RingReader]]:
    """The shared balancer's event controls and its one ring reader; events off after."""
    ctl = EventsControl(wiped_balancer)
    reader = RingReader.of(wiped_balancer)
    try:
        yield ctl, reader
    finally:
        ctl.off()
        reader.drain()


@pytest.fixture
def events(lab: Lab, ring: tuple[EventsControl, RingReader]) -> Iterator[
        tuple[EventsControl, RingReader]]:
    """Events on for every type, the ring empty; off again after the test."""
    ctl, reader = ring
    reader.drain()
    ctl.set(ALL_TYPES)
    try:
        yield ctl, reader
    finally:
        ctl.off()
        reader.drain()


SEEN: set[str] = set()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_packet_case_reports_its_verdict_and_reason(
    lab: Lab, events: tuple[EventsControl, RingReader], case: Case
) -> None:
    _, reader = events
    case.seed(lab)
    steps = case.steps(lab) if callable(case.steps) else case.steps
    for step in steps:
        res = lab.run(step.frame)
        recs = [r for r in reader.drain() if r.kind == EV_K_EVENT]
        assert len(recs) == 1, f"{len(recs)} records for one frame"
        rec = recs[0]
        assert rec.action == res.verdict, "the record's action is not the verdict"
        moved = set(case.counters) | {"STAT_LRU_MISS_SYN", "STAT_LRU_MISS_OTHER"}
        assert rec.reason in moved, f"reason {rec.reason} is none of the counters {moved}"
        assert rec.data == res.packet[:EV_SNAPLEN], "the snapshot is not the frame as sent"
        SEEN.add(rec.reason)


def test_the_packet_cases_report_every_reason_they_count() -> None:
    if len(SEEN) == 0:
        pytest.skip("the packet cases did not run in this session")
    counted = {name for c in CASES for name in c.counters} - NOT_REASONS
    assert counted <= SEEN, f"reasons counted but never reported: {sorted(counted - SEEN)}"


def test_a_new_flow_names_its_backend_and_the_ring(
    lab: Lab, events: tuple[EventsControl, RingReader]
) -> None:
    V4(lab)
    lab.run(SYN4)
    lab.run(P.tcp4(flags="A"))
    new, known = events[1].drain()
    assert new.reason == "STAT_LRU_MISS_SYN" and new.types == EV_T_FLOW and new.vip_num == 0
    assert Ether(new.data)[IP].dst == str(REAL4[0]), "the snapshot is not the encapsulated frame"
    assert known.reason == "STAT_LRU_HIT", "the ACK did not come from the table"


def test_sampling_reports_one_in_n(lab: Lab, events: tuple[EventsControl, RingReader]) -> None:
    ctl, reader = events
    ctl.set(ALL_TYPES, sample=10)
    for _ in range(100):
        lab.run(P.tcp4(dst=NONVIP4))
    assert len(reader.drain()) == 10


def test_only_drops(lab: Lab, events: tuple[EventsControl, RingReader]) -> None:
    ctl, reader = events
    ctl.set(EV_T_DROP)
    V4(lab)
    assert lab.run(SYN4).verdict == XDP_TX
    assert lab.run(P.tcp4(dst=NONVIP4)).verdict == XDP_PASS
    lab.remove_real(1)
    assert lab.run(P.tcp4(sport=40999)).verdict == XDP_DROP
    recs = reader.drain()
    assert [r.reason for r in recs] == ["STAT_NO_BACKEND"]


def test_only_one_vip(lab: Lab, events: tuple[EventsControl, RingReader]) -> None:
    ctl, reader = events
    V4(lab)
    vip_with(vip=VIP4B, num=1, backends=(REAL4[1],))(lab)
    ctl.set(ALL_TYPES, vip_num=1)
    lab.run(SYN4)
    lab.run(P.tcp4(dst=VIP4B))
    lab.run(P.tcp4(dst=NONVIP4))
    assert [r.vip_num for r in reader.drain()] == [1]


def test_off_reports_nothing(lab: Lab, events: tuple[EventsControl, RingReader]) -> None:
    ctl, reader = events
    ctl.off()
    V4(lab)
    lab.run(SYN4)
    assert reader.drain() == []


def test_a_full_ring_counts_what_it_lost(
    lab: Lab, events: tuple[EventsControl, RingReader]
) -> None:
    ctl, reader = events
    sent0, lost0 = ctl.counters()
    # A pass to the stack leaves the frame as it was: repeat it in the kernel.
    res = lab.runner.run(P.tcp4(dst=NONVIP4), repeat=20_000)
    assert res.verdict == XDP_PASS
    sent, lost = ctl.counters()
    got = reader.drain()
    assert lost - lost0 > 0, "a ring 20,000 records too small lost none"
    assert len(got) == sent - sent0, "records counted sent are not the ones read"


def test_a_flood_guard_change_is_reported(
    lab: Lab, events: tuple[EventsControl, RingReader], one_cpu: int
) -> None:
    ctl, reader = events
    ctl.set(EV_T_GUARD)
    V4(lab)
    lab.config(protect=ProtectConfig(syn_guard="auto", syn_flood_rate=8))
    w = protect.guard_window_now()
    while protect.guard_window_now() == w:
        pass
    for i in range(6):
        lab.run(P.tcp4(sport=42000 + i))
    recs = reader.drain()
    assert [bool(r.code & EV_F_GUARD) for r in recs] == [True], f"{len(recs)} records"
    assert recs[0].code & EV_F_FLOOD, "the change is not into flood mode"


def test_capture_has_the_frame_as_received_and_as_sent(
    lab: Lab, events: tuple[EventsControl, RingReader]
) -> None:
    ctl, reader = events
    ctl.set(ALL_TYPES | EV_CAPTURE)
    V4(lab)
    res = lab.run(SYN4)
    rx, tx = reader.drain()
    assert (rx.kind, tx.kind) == (EV_K_RX, EV_K_TX)
    assert rx.data == SYN4 and rx.frame_len == len(SYN4), "not the frame as received"
    assert tx.data == res.packet, "not the frame as sent"
    assert ipaddress.ip_address(Ether(tx.data)[IP].dst) == REAL4[0]
