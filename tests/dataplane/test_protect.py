"""Protection in the balancer, proven through BPF_PROG_TEST_RUN: per-VIP source ranges, the
token buckets of the replies the LB sends, and the SYN-flood guard (docs/protection.md).

Source ranges are seeded the way the control plane writes them (lb.control.reconcile's
`src_ranges_of` and the VIP's flags from `VipSpec.flags`), so a row also proves the model's
translation. The rate-limit and guard tests pin the process to one CPU: both keep their state
per CPU, and a test run executes on the CPU of the calling thread.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.packet import Raw

from lb.config import ProtectConfig
from lb.consts import GUARD_WINDOW_SHIFT, XDP_DROP, XDP_TX
from lb.control.model import VipSpec
from lb.control.reconcile import src_ranges_of
from lb.dataplane import protect
from lb.dataplane.flowhash import Flows
from tests.dataplane import packets as P
from tests.dataplane.lab import Flow, Lab
from tests.dataplane.packets import CLIENT4, REAL4, REAL6, VIP4, VIP6, ether

pytestmark = pytest.mark.bpf

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
A = ipaddress.ip_address


def _outer_dst(frame: bytes) -> IPAddress:
    if frame[12:14] == b"\x08\x00":
        return ipaddress.IPv4Address(frame[30:34])
    return ipaddress.IPv6Address(frame[38:54])


def _seed_vip(lab: Lab, spec: VipSpec, num: int = 0) -> None:
    lab.vip(spec.address, spec.port, spec.protocol, num=num, flags=spec.flags)
    backend = REAL4[0] if spec.address.version == 4 else REAL6[0]
    lab.real(1, backend)
    lab.ring(num, 1)
    for key, verdict in src_ranges_of(spec, num).items():
        protect.set_src_range(lab.b, key, verdict)
    if spec.allow or spec.deny:
        protect.mark_src_changed(lab.b, [num])  # last, as the control plane does


def _spec(vip: IPAddress, allow: list[str], deny: list[str]) -> VipSpec:
    return VipSpec.model_validate({"protocol": "tcp", "address": str(vip), "port": 80,
                                   "allow": allow, "deny": deny})


# --- source ranges --------------------------------------------------------------------------

# (description, VIP, allow, deny, client source, verdict)
RANGE_CASES: list[tuple[str, IPAddress, list[str], list[str], str, int]] = [
    ("a VIP without ranges lets every source in", VIP4, [], [], "198.18.2.1", XDP_TX),
    ("a source in the allow list is forwarded", VIP4, ["198.18.2.0/24"], [], "198.18.2.1",
     XDP_TX),
    ("a source outside the allow list is dropped", VIP4, ["198.18.2.0/24"], [], "198.18.3.1",
     XDP_DROP),
    ("a source in the deny list is dropped", VIP4, [], ["198.18.2.0/24"], "198.18.2.9",
     XDP_DROP),
    ("a source outside the deny list is forwarded", VIP4, [], ["198.18.2.0/24"], "198.18.4.1",
     XDP_TX),
    ("a deny inside an allow wins for its sources", VIP4, ["198.18.0.0/16"], ["198.18.2.0/24"],
     "198.18.2.1", XDP_DROP),
    ("the rest of the allow around a deny is forwarded", VIP4, ["198.18.0.0/16"],
     ["198.18.2.0/24"], "198.18.5.1", XDP_TX),
    ("an allow inside a deny wins for its sources", VIP4, ["198.18.2.0/25"], ["198.18.0.0/16"],
     "198.18.2.1", XDP_TX),
    ("outside both an allow and its deny is dropped (allow list)", VIP4, ["198.18.2.0/25"],
     ["198.18.0.0/16"], "198.18.2.200", XDP_DROP),
    ("a /32 allow lets exactly that source in", VIP4, ["198.18.2.1/32"], [], "198.18.2.1",
     XDP_TX),
    ("a /32 allow keeps its neighbour out", VIP4, ["198.18.2.1/32"], [], "198.18.2.2", XDP_DROP),
    ("0.0.0.0/0 in the deny list drops everyone", VIP4, [], ["0.0.0.0/0"], "198.18.2.1",
     XDP_DROP),
    ("an IPv6 source in the allow list is forwarded", VIP6, ["2001:db8:2::/48"], [],
     "2001:db8:2::1", XDP_TX),
    ("an IPv6 source outside the allow list is dropped", VIP6, ["2001:db8:2::/48"], [],
     "2001:db8:3::1", XDP_DROP),
    ("an IPv6 source in the deny list is dropped", VIP6, [], ["2001:db8:2::/64"],
     "2001:db8:2::77", XDP_DROP),
]


@pytest.mark.parametrize(("vip", "allow", "deny", "src", "verdict"),
                         [c[1:] for c in RANGE_CASES], ids=[c[0] for c in RANGE_CASES])
def test_source_ranges(lab: Lab, vip: IPAddress, allow: list[str], deny: list[str], src: str,
                       verdict: int) -> None:
    spec = _spec(vip, allow, deny)
    _seed_vip(lab, spec)
    frame = P.tcp4(src=A(src)) if vip.version == 4 else P.tcp6(src=A(src))
    res = lab.run(frame)
    assert res.verdict == verdict, f"verdict {res.verdict}, expected {verdict}"
    denied = protect.src_denied(lab.b, 0)
    counters = lab.counters()
    if verdict == XDP_DROP:
        assert counters["STAT_SRC_DENIED"] == 1, "the drop is not counted by its reason"
        assert denied == 1, "the drop is not counted for the VIP"
        assert lab.conn_count() == 0, "a denied source got a connection-table entry"
    else:
        assert counters["STAT_SRC_DENIED"] == 0 and denied == 0
        assert _outer_dst(res.packet) == (REAL4[0] if vip.version == 4 else REAL6[0])


def test_ranges_of_one_vip_do_not_apply_to_another(lab: Lab) -> None:
    _seed_vip(lab, _spec(VIP4, ["198.18.9.0/24"], []), num=0)
    other = _spec(P.VIP4B, [], [])
    lab.vip(other.address, 80, "tcp", num=1, flags=other.flags)
    lab.ring(1, 1)
    assert lab.run(P.tcp4(dst=P.VIP4B)).verdict == XDP_TX, "VIP 1 took VIP 0's allow list"
    assert lab.run(P.tcp4()).verdict == XDP_DROP


# A wait after a change of the ranges past which the next stamp is trusted.
NEXT_UNIT_S = protect.SRC_TRUST_WAIT_S


def test_an_established_flow_is_dropped_once_its_source_is_denied(lab: Lab) -> None:
    # The flow was in the table before the deny: its stamp is older than the change.
    lab.conn(Flow(CLIENT4, VIP4, 40000, 80), 1, age_s=1.0)
    _seed_vip(lab, _spec(VIP4, [], ["198.18.2.0/24"]))
    assert lab.run(P.tcp4(flags="A", payload=b"x")).verdict == XDP_DROP
    assert protect.src_denied(lab.b, 0) == 1


def test_an_established_flow_skips_the_trie_until_the_ranges_change(lab: Lab) -> None:
    ack = P.tcp4(flags="A", payload=b"x")
    _seed_vip(lab, _spec(VIP4, ["198.18.2.0/24"], []))
    time.sleep(NEXT_UNIT_S)
    assert lab.run(P.tcp4(flags="S")).verdict == XDP_TX  # checked, then its entry written
    # The allow leaves the trie behind the control plane's back (no src_changed stamp): the
    # flow's entry, stamped after the last change, keeps forwarding without a lookup...
    for key in src_ranges_of(_spec(VIP4, ["198.18.2.0/24"], []), 0):
        protect.del_src_range(lab.b, key)
    assert lab.run(ack).verdict == XDP_TX, "an established flow looked its source up again"
    # ...a new flow is looked up (and refused: the allow list is empty now)...
    assert lab.run(P.tcp4(flags="S", sport=40001)).verdict == XDP_DROP
    # ...and once the change is stamped, the established flow is checked again too.
    protect.mark_src_changed(lab.b, [0])
    assert lab.run(ack).verdict == XDP_DROP
    assert protect.src_denied(lab.b, 0) == 2


def test_a_vip_whose_ranges_were_never_stamped_checks_every_packet(lab: Lab) -> None:
    # src_changed all zero (a map an upgrade just created): no entry's verdict is trusted.
    spec = _spec(VIP4, ["198.18.2.0/24"], [])
    lab.vip(spec.address, spec.port, spec.protocol, num=0, flags=spec.flags)
    lab.real(1, REAL4[0])
    lab.ring(0, 1)
    keys = src_ranges_of(spec, 0)
    for key, verdict in keys.items():
        protect.set_src_range(lab.b, key, verdict)
    assert lab.run(P.tcp4(flags="S")).verdict == XDP_TX
    for key in keys:
        protect.del_src_range(lab.b, key)
    assert lab.run(P.tcp4(flags="A", payload=b"x")).verdict == XDP_DROP


# --- reply rate limits ----------------------------------------------------------------------

ECHO4 = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4)) / ICMP(id=7, seq=3))


def _limits(lab: Lab, **kw: Any) -> None:
    base: dict[str, Any] = {"syn_guard": "off", "echo_rate": 0, "too_big_rate": 0}
    base.update(kw)
    lab.config(protect=ProtectConfig(**base))


def test_echo_replies_stop_when_the_bucket_is_empty(lab: Lab, one_cpu: int) -> None:
    _seed_vip(lab, _spec(VIP4, [], []))
    _limits(lab, echo_rate=1, echo_burst=3)
    verdicts = [lab.run(ECHO4).verdict for _ in range(5)]
    assert verdicts == [XDP_TX] * 3 + [XDP_DROP] * 2, f"burst 3 gave {verdicts}"
    c = lab.counters()
    assert c["STAT_ICMP_ECHO"] == 3 and c["STAT_ICMP_ECHO_LIMITED"] == 2


def test_the_echo_bucket_refills_at_its_rate(lab: Lab, one_cpu: int) -> None:
    _seed_vip(lab, _spec(VIP4, [], []))
    _limits(lab, echo_rate=100, echo_burst=1)
    assert lab.run(ECHO4).verdict == XDP_TX
    assert lab.run(ECHO4).verdict == XDP_DROP
    time.sleep(0.05)  # 100/s: 5 tokens' worth, capped at the depth of 1
    assert [lab.run(ECHO4).verdict for _ in range(2)] == [XDP_TX, XDP_DROP]


def test_too_big_replies_stop_when_the_bucket_is_empty(lab: Lab, one_cpu: int) -> None:
    _seed_vip(lab, _spec(VIP4, [], []))
    _limits(lab, too_big_rate=1, too_big_burst=2)
    big = bytes(ether() / IP(src=str(CLIENT4), dst=str(VIP4), flags="DF")
                / TCP(sport=40000, dport=80, flags="A") / Raw(b"x" * 1460))
    verdicts = [lab.run(big).verdict for _ in range(3)]
    assert verdicts == [XDP_TX, XDP_TX, XDP_DROP], f"burst 2 gave {verdicts}"
    c = lab.counters()
    assert c["STAT_TOO_BIG"] == 2 and c["STAT_TOO_BIG_LIMITED"] == 1


def test_a_zero_rate_is_no_limit(lab: Lab, one_cpu: int) -> None:
    _seed_vip(lab, _spec(VIP4, [], []))
    _limits(lab, echo_rate=0, echo_burst=1)
    assert all(lab.run(ECHO4).verdict == XDP_TX for _ in range(200))


# --- the SYN-flood guard --------------------------------------------------------------------

F4 = Flow(CLIENT4, VIP4, 40000, 80)


def _guard(lab: Lab, mode: str, rate: int = 50_000) -> None:
    lab.config(protect=ProtectConfig(syn_guard=mode, syn_flood_rate=rate))  # type: ignore[arg-type]


def _full_set(lab: Lab, flow: Flow) -> tuple[Flow, ...]:
    """Fill `flow`'s set with 8 live (established) flows to backend 1 and return them."""
    mates = lab.set_mates(flow, 8)
    for m in mates:
        lab.conn(m, 1, age_s=1.0)
    return mates


def _syn(flow: Flow) -> bytes:
    return P.tcp4(src=flow.src, sport=flow.sport)


def _ack(flow: Flow) -> bytes:
    return P.tcp4(src=flow.src, sport=flow.sport, flags="A", payload=b"x")


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_a_syn_never_evicts_an_established_flow(lab: Lab, mode: str, one_cpu: int) -> None:
    _seed_vip(lab, _spec(VIP4, [], []))
    _guard(lab, mode)
    mates = _full_set(lab, F4)
    assert lab.run(_syn(F4)).verdict == XDP_TX, "the SYN did not follow the ring"
    assert all(lab.lookup_conn(m) is not None for m in mates), "a SYN evicted a live entry"
    assert lab.lookup_conn(F4) is None
    c = lab.counters()
    assert c["STAT_CONN_EVICT"] == 0
    assert c["STAT_GUARD_NO_EVICT"] + c["STAT_GUARD_SYN_STATELESS"] == 1


def test_without_the_guard_a_syn_evicts(lab: Lab, one_cpu: int) -> None:
    _seed_vip(lab, _spec(VIP4, [], []))
    _guard(lab, "off")
    mates = _full_set(lab, F4)
    lab.run(_syn(F4))
    assert sum(lab.lookup_conn(m) is None for m in mates) == 1
    assert lab.counters()["STAT_CONN_EVICT"] == 1


def test_outside_a_flood_the_handshakes_ack_may_evict(lab: Lab, one_cpu: int) -> None:
    # The SYN found its set full; the flow's second packet is the proof of a real client.
    _seed_vip(lab, _spec(VIP4, [], []))
    _guard(lab, "auto")
    _full_set(lab, F4)
    lab.run(_syn(F4))
    assert lab.run(_ack(F4)).verdict == XDP_TX
    assert lab.lookup_conn(F4) is not None, "the ACK did not track the flow"
    assert lab.counters()["STAT_CONN_EVICT"] == 1


def test_in_flood_mode_a_syn_leaves_the_table_alone_and_the_ack_tracks(
    lab: Lab, one_cpu: int
) -> None:
    _seed_vip(lab, _spec(VIP4, [], []))
    _guard(lab, "always")
    assert lab.run(_syn(F4)).verdict == XDP_TX
    assert lab.conn_count() == 0, "a SYN inserted in flood mode"
    res = lab.run(_ack(F4))
    assert res.verdict == XDP_TX and _outer_dst(res.packet) == REAL4[0]
    e = lab.lookup_conn(F4)
    assert e is not None and e.real_idx == 1, "the ACK did not track the flow"
    assert lab.counters()["STAT_GUARD_SYN_STATELESS"] == 1


def test_in_flood_mode_no_packet_evicts(lab: Lab, one_cpu: int) -> None:
    _seed_vip(lab, _spec(VIP4, [], []))
    _guard(lab, "always")
    mates = _full_set(lab, F4)
    lab.run(_ack(F4))
    assert all(lab.lookup_conn(m) is not None for m in mates)
    c = lab.counters()
    assert c["STAT_CONN_EVICT"] == 0 and c["STAT_GUARD_NO_EVICT"] == 1


def _next_window() -> None:
    # Start right after a window boundary, so a short burst stays in one window.
    w = protect.guard_window_now()
    while protect.guard_window_now() == w:
        time.sleep(0.002)


def test_auto_mode_enters_flood_mode_above_the_threshold(lab: Lab, one_cpu: int) -> None:
    _seed_vip(lab, _spec(VIP4, [], []))
    rate = 3 * 1_000_000_000 // (1 << GUARD_WINDOW_SHIFT) + 1  # 3 SYNs per window
    _guard(lab, "auto", rate=rate)
    assert protect.guard_status(lab.b)["syn_per_window"] == 3
    # The six SYNs must run within one guard window (~134 ms). On a busy machine a burst may
    # straddle two: it is tried again with fresh flows from a window two or more later,
    # where the CPU's guard state starts afresh (guard.h).
    for attempt in range(5):
        flows = [Flow(CLIENT4, VIP4, 41000 + 10 * attempt + i, 80) for i in range(6)]
        before = lab.counters()
        _next_window()
        window = protect.guard_window_now()
        verdicts = [lab.run(_syn(f)).verdict for f in flows]
        if protect.guard_window_now() == window:
            break
    else:
        raise AssertionError("6 SYNs never ran within one guard window in 5 tries")
    assert verdicts == [XDP_TX] * 6
    tracked = [lab.lookup_conn(f) is not None for f in flows]
    assert tracked == [True] * 3 + [False] * 3, f"tracked {tracked}"
    c = lab.counters()
    assert c["STAT_GUARD_FLOOD"] - before["STAT_GUARD_FLOOD"] == 1
    assert c["STAT_GUARD_SYN_STATELESS"] - before["STAT_GUARD_SYN_STATELESS"] == 3
    status = protect.guard_status(lab.b)
    assert status["mode"] == "auto" and status["flood"] and one_cpu in status["flood_cpus"]


def _spoofed_syns(n: int, seed: int) -> list[bytes]:
    """`n` SYNs to VIP4:80 from random sources in 198.18.128.0/17 and random ports."""
    rng = np.random.default_rng(seed)
    template = bytearray(P.tcp4())
    out = []
    for src, sport in zip(rng.integers(0, 1 << 15, n), rng.integers(1024, 65536, n),
                          strict=True):
        f = bytearray(template)
        f[26:30] = (int(ipaddress.IPv4Address("198.18.128.0")) + int(src)).to_bytes(4, "big")
        f[34:36] = int(sport).to_bytes(2, "big")
        out.append(bytes(f))
    return out


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_a_spoofed_syn_flood_evicts_no_established_flow(lab: Lab, mode: str,
                                                         one_cpu: int) -> None:
    # Three quarters of the table hold established flows (many sets full), then 20,000
    # spoofed SYNs: every established entry stays, and still forwards to its backend.
    _seed_vip(lab, _spec(VIP4, [], []))
    lab.real(2, REAL4[1])
    _guard(lab, mode, rate=1000)
    n = lab.conns.capacity * 3 // 4
    rng = np.random.default_rng(7)
    src = int(ipaddress.IPv4Address("198.18.64.0")) + rng.integers(0, 1 << 14, n)
    flows = Flows.v4(src, int(VIP4), rng.integers(1024, 65536, n), 80, 6)
    written = lab.conns.insert_many(flows, 2, 0, age_s=1.0)
    before = lab.conn_count()
    assert before == written > n // 2
    for frame in _spoofed_syns(20_000, seed=11):
        assert lab.run(frame).verdict == XDP_TX
    c = lab.counters()
    assert c["STAT_CONN_EVICT"] == 0, "spoofed SYNs evicted established flows"
    assert lab.conn_count() <= before + 20_000
    e = lab.conns.entries()
    assert int((e.real_idx == 2).sum()) == written, "an established entry was lost"
    # A sample of the established flows still goes to backend 2 (the ring says backend 1).
    for i in range(0, n, n // 50):
        a = ipaddress.IPv4Address(int(src[i]))
        sport = int(flows.sport[i])
        if lab.lookup_conn(Flow(a, VIP4, sport, 80)) is None:
            continue  # one of the flows insert_many found no free slot for
        res = lab.run(P.tcp4(src=a, sport=sport, flags="A", payload=b"x"))
        assert _outer_dst(res.packet) == REAL4[1], "an established flow left its backend"


def test_guard_counters_and_ranges_are_reset_between_tests(lab: Lab) -> None:
    assert lab.counters()["STAT_GUARD_FLOOD"] == 0
    assert len(list(lab.b.src_v4.items())) == 0
