"""The per-CPU VIP lookup cache (vip_cache under vip_gen, xdp/balancer/balancer.c's
lb_vip_lookup), proven through BPF_PROG_TEST_RUN: a change written the control plane's way
(lb.dataplane.mapio.MapIO, which moves vip_gen on after each vip_map write) reaches the very
next packet; a write behind its back does not, which is what shows the cache is in use; a
start (MapIO.reset_vip_cache) invalidates what every CPU cached.
The exact VIP and the port-0 VIP of one address stay apart in it. The tests pin the process
to one CPU: the cache is per CPU, and a test run executes on the CPU of the calling thread.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from lb.consts import F_ENCAP_GUE, XDP_PASS, XDP_TX
from lb.dataplane.mapio import MapIO
from tests.dataplane import packets as P
from tests.dataplane.lab import Lab
from tests.dataplane.packets import REAL4, VIP4

pytestmark = pytest.mark.bpf

KEY80 = (4, VIP4.packed + bytes(12), 80, 6)


@pytest.fixture
def io(lab: Lab, one_cpu: int) -> Iterator[MapIO]:
    """One VIP (VIP4:80/tcp, number 0, one backend), the cache armed as a start arms it."""
    lab.vip(VIP4, 80)
    lab.real(1, REAL4[0])
    lab.ring(0, 1)
    io = MapIO(lab.b)
    io.reset_vip_cache()
    yield io
    io.close()


def _is_gue(frame: bytes) -> bool:
    # IPv4 outer header (no options) carrying UDP: GUE; protocol 4 (IPIP) otherwise.
    return frame[23] == 17


def test_a_vip_deleted_through_the_control_plane_is_gone_for_the_next_packet(
    lab: Lab, io: MapIO
) -> None:
    assert lab.run(P.tcp4()).verdict == XDP_TX
    # Behind the control plane's back: the cached lookup still answers...
    del lab.b.vip_map[lab.b.vip_key(VIP4, 80, "tcp")]
    assert lab.run(P.tcp4()).verdict == XDP_TX, "the VIP lookup is not cached"
    # ...until the generation moves, as MapIO.del_vip moves it.
    io.del_vip(KEY80)
    assert lab.run(P.tcp4()).verdict == XDP_PASS
    io.set_vip(KEY80, 0, 0)
    assert lab.run(P.tcp4()).verdict == XDP_TX


def test_new_flags_reach_the_next_packet(lab: Lab, io: MapIO) -> None:
    res = lab.run(P.tcp4())
    assert res.verdict == XDP_TX and not _is_gue(res.packet)
    io.set_vip(KEY80, 0, F_ENCAP_GUE)
    res = lab.run(P.tcp4(flags="A"))
    assert res.verdict == XDP_TX and _is_gue(res.packet), "the old flags were used"


def test_a_start_invalidates_the_cache(lab: Lab, io: MapIO) -> None:
    """A process that died between a vip_map write and its bump: the next start's reset
    moves the generation on, and the entry cached before it is no longer trusted."""
    assert lab.run(P.tcp4()).verdict == XDP_TX
    del lab.b.vip_map[lab.b.vip_key(VIP4, 80, "tcp")]
    assert lab.run(P.tcp4()).verdict == XDP_TX
    io.reset_vip_cache()
    assert lab.run(P.tcp4()).verdict == XDP_PASS


def test_without_a_generation_nothing_is_cached(lab: Lab, one_cpu: int) -> None:
    """vip_gen at 0 (never written: a map an upgrade just created, or a lab seeding vip_map
    directly): every packet looks vip_map up."""
    lab.vip(VIP4, 80)
    lab.real(1, REAL4[0])
    lab.ring(0, 1)
    assert lab.run(P.tcp4()).verdict == XDP_TX
    del lab.b.vip_map[lab.b.vip_key(VIP4, 80, "tcp")]
    assert lab.run(P.tcp4()).verdict == XDP_PASS


def test_the_exact_vip_and_the_port_0_vip_of_an_address_stay_apart(lab: Lab, io: MapIO) -> None:
    lab.vip(VIP4, 0, num=1)
    lab.real(2, REAL4[1])
    lab.ring(1, 2)
    io.reset_vip_cache()
    for _ in range(3):
        for dport in (80, 81, 81, 80):
            assert lab.run(P.tcp4(dport=dport)).verdict == XDP_TX
    assert lab.vip_counters(0)[0] == 6
    assert lab.vip_counters(1)[0] == 6
    assert lab.real_counters(1)[0] == 6
    assert lab.real_counters(2)[0] == 6


def _set_seq(lab: Lab, seq: int) -> None:
    """Write every CPU's cache entry's `seq`, as a run cut short in its write leaves it."""
    t = lab.b.vip_cache
    k = t.Key(0)
    values = t.getvalue(k)
    for v in values:
        v.seq = seq
    t[k] = values


def test_an_entry_being_written_is_not_trusted(lab: Lab, io: MapIO) -> None:
    """A run interrupted on its CPU (a NAPI softirq over BPF_PROG_TEST_RUN) halfway through
    writing the entry leaves `seq` odd: a run nested there looks vip_map up instead."""
    assert lab.run(P.tcp4()).verdict == XDP_TX
    del lab.b.vip_map[lab.b.vip_key(VIP4, 80, "tcp")]
    _set_seq(lab, 7)
    assert lab.run(P.tcp4()).verdict == XDP_PASS, "a half-written entry was used"
    # Once the write is done (seq even again) the entry is what it was.
    _set_seq(lab, 8)
    assert lab.run(P.tcp4()).verdict == XDP_TX


def test_a_new_generation_map_starts_from_an_empty_cache(lab: Lab, one_cpu: int) -> None:
    """vip_gen at 0 beside entries of generation 1 (a vip_gen pin removed by hand): the start
    empties them before it moves vip_gen to 1, or they would be trusted."""
    lab.real(1, REAL4[0])
    lab.ring(0, 1)
    t = lab.b.vip_cache
    k = t.Key(0)
    values = t.getvalue(k)
    probe = lab.b.vip_key(VIP4, 80, "tcp")
    for v in values:
        v.gen = 1
        ctypes.memmove(ctypes.addressof(v.key), ctypes.addressof(probe), ctypes.sizeof(probe))
        v.meta.vip_num = 0
        v.seq = 0
    t[k] = values
    io = MapIO(lab.b)
    try:
        io.reset_vip_cache()
        assert int(lab.b.vip_gen[lab.b.vip_gen.Key(0)].value) == 1
        assert lab.run(P.tcp4()).verdict == XDP_PASS, "an entry from before vip_gen was used"
    finally:
        io.close()
