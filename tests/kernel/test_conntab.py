"""lb.dataplane.flowhash and lb.dataplane.conntab against the real program: packets run through
the loaded balancer with BPF_PROG_TEST_RUN create exactly the slots Python predicts, and what Python
writes steers the program's next packet (docs/conn-table.md)."""

from __future__ import annotations

import array
import ctypes
import ipaddress
import mmap
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from lb.config import RuntimeConfig
from lb.consts import (
    CONN_TAG_BUSY,
    CONN_TAG_EMPTY,
    CONN_WAYS,
    GLOB_STATS,
    REAL_F_V6,
    XDP_TX,
)
from lb.dataplane import _conntab, conntab, flowhash
from lb.dataplane.conntab import STAMP_S, ConnTable
from lb.dataplane.flowhash import (
    Flow5,
    Flows,
    conn_hash3,
    conn_index,
    conn_index_many,
    conn_tag,
    hash_flow,
)
from lb.dataplane.keys import set_addr
from lb.dataplane.loader import write_runtime_config
from lb.dataplane.testrun import TestRunner

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

VIP4, VIP6 = ipaddress.ip_address("198.18.0.10"), ipaddress.ip_address("2001:db8::10")
CLIENT4, CLIENT6 = ipaddress.ip_address("198.18.2.1"), ipaddress.ip_address("2001:db8:2::1")
LB_MAC, PEER_MAC, GW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:aa", "02:00:00:00:00:fe"
# Backends: every ring slot names RING[v]; Python's entries name CONN[v].
RING = {4: (1, ipaddress.ip_address("198.18.1.1")), 6: (3, ipaddress.ip_address("2001:db8:1::1"))}
CONN = {4: (2, ipaddress.ip_address("198.18.1.2")), 6: (4, ipaddress.ip_address("2001:db8:1::2"))}
# VIP numbers: (version, proto) -> vip_num.
VIP_NUMS = {(4, "tcp"): 1, (4, "udp"): 2, (6, "tcp"): 3, (6, "udp"): 4}
PORT = 80
CASES = [pytest.param(v, p, id=f"ipv{v}-{p}") for v in (4, 6) for p in ("tcp", "udp")]
TIMEOUT_S = 30.0

pytestmark = pytest.mark.bpf
_U64 = np.uint64


@dataclass
class Bed:
    """The shared balancer programmed with four VIPs (v4/v6 x tcp/udp) and four backends."""

    b: Any
    table: ConnTable
    runner: TestRunner

    def flow(self, version: int, proto: str, sport: int = 40000,
             client: IPAddress | None = None) -> Flow5:
        """A client->VIP flow."""
        src = client or (CLIENT4 if version == 4 else CLIENT6)
        return Flow5.of(src, VIP4 if version == 4 else VIP6, sport, PORT, proto)

    def send(self, flow: Flow5, flags: str = "A") -> str | None:
        """Run one packet of `flow` (TCP with `flags`); the backend it went to, or None."""
        ip = IP if flow.src.version == 4 else IPv6
        l4 = TCP(sport=flow.sport, dport=flow.dport, flags=flags) if flow.proto == 6 else \
            UDP(sport=flow.sport, dport=flow.dport)
        frame = bytes(Ether(src=PEER_MAC, dst=LB_MAC) / ip(src=str(flow.src),
                                                         dst=str(flow.dst)) / l4 / b"xlb")
        res = self.runner.run(frame)
        if res.verdict != XDP_TX:
            return None
        out = Ether(res.packet)
        return str(out[IP].dst if IP in out and flow.src.version == 4 else out[IPv6].dst)

    def counter(self, name: str) -> int:
        """A global counter summed over CPUs."""
        t = self.b.glob_stats
        return sum(int(v) for v in t[t.Key(GLOB_STATS.index(name))])


@pytest.fixture
def bed(balancer: Any) -> Iterator[Bed]:
    b = balancer
    write_runtime_config(b, RuntimeConfig(gateway_mac=GW_MAC, udp_timeout_s=TIMEOUT_S,
                                          src_v4=ipaddress.IPv4Address("198.18.0.1"),
                                          src_v6=ipaddress.IPv6Address("2001:db8::1")))
    for idx, addr in [*RING.values(), *CONN.values()]:
        leaf = b.reals.Leaf()
        set_addr(leaf.addr, addr)
        leaf.flags = REAL_F_V6 if addr.version == 6 else 0
        b.reals[b.reals.Key(idx)] = leaf
    ring = b.config.ring_size
    for (version, proto), num in VIP_NUMS.items():
        vip = VIP4 if version == 4 else VIP6
        meta = b.vip_map.Leaf()
        meta.vip_num = num
        b.vip_map[b.vip_key(vip, PORT, proto)] = meta
        b.vip_addrs[b.vip_addr_key(vip)] = b.vip_addrs.Leaf(2)
        keys = (b.ch_rings.Key * ring)(*range(num * ring, (num + 1) * ring))
        b.ch_rings.items_update_batch(keys, (b.ch_rings.Leaf * ring)(*[RING[version][0]] * ring))
    table = ConnTable(b)
    table.clear()
    try:
        yield Bed(b, table, TestRunner(b.prog_fd))
    finally:
        table.clear()
        table.close()
        b.vip_map.clear()
        b.vip_addrs.clear()
        for idx, _ in [*RING.values(), *CONN.values()]:
            b.reals[b.reals.Key(idx)] = b.reals.Leaf()
        for num in VIP_NUMS.values():
            keys = (b.ch_rings.Key * ring)(*range(num * ring, (num + 1) * ring))
            b.ch_rings.items_update_batch(keys, (b.ch_rings.Leaf * ring)())
        b.lb_cfg[b.lb_cfg.Key(0)] = b.lb_cfg.Leaf()


@pytest.fixture(params=["c", "libatomic"])
def free_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How purge and delete free slots: lb.dataplane._conntab's bulk compare-and-swap, or the
    fallback without it (libatomic through ctypes, one call a slot)."""
    if request.param == "libatomic":
        monkeypatch.setattr(conntab, "_conntab", None)
        assert conntab._atomic.lock_free, "libatomic is missing (scripts/setup.sh installs it)"
    else:
        assert conntab._conntab is _conntab
    return str(request.param)


def _random_flows(n: int, seed: int = 7) -> list[Flow5]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        if r.random() < 0.5:
            src: IPAddress = ipaddress.IPv4Address(r.getrandbits(32))
            dst: IPAddress = ipaddress.IPv4Address(r.getrandbits(32))
        else:
            src, dst = ipaddress.IPv6Address(r.getrandbits(128)), ipaddress.IPv6Address(
                r.getrandbits(128))
        out.append(Flow5(src, dst, r.getrandbits(16), r.getrandbits(16), r.choice((6, 17))))
    return out


# --- pure: flowhash ------------------------------------------------------------------------


def test_jhash_matches_lookup3_reference_values() -> None:
    # jhash2 of nine words is three rounds; jhash_3words equals jhash2 of three words.
    words = [0x01020304, 0x05060708, 0x090A0B0C]
    assert flowhash.jhash_3words(*words, 17) == flowhash.jhash2(words, 17)
    assert flowhash.jhash2([], 0) == 0xDEADBEEF


def test_conn_hash_is_the_flow_hash_with_the_family_in_the_initval() -> None:
    f4 = Flow5.of(CLIENT4, VIP4, 40000, 80, "tcp")
    words = flowhash.addr_words
    ports = flowhash.ports_word(40000, 80)
    assert ports == int.from_bytes((40000).to_bytes(2, "big") + (80).to_bytes(2, "big"),
                                   "little")
    assert conn_hash3(f4, 5)[0] == flowhash.jhash_3words(words(CLIENT4)[0], words(VIP4)[0],
                                                         ports, 5 + 6 + (4 << 8))
    assert hash_flow(f4) == flowhash.jhash_3words(words(CLIENT4)[0], words(VIP4)[0], ports,
                                                  flowhash.HASH_SEED + 6)
    f6 = Flow5.of(CLIENT6, VIP6, 40000, 80, "udp")
    assert conn_hash3(f6, 5)[0] == flowhash.jhash2([*words(CLIENT6), *words(VIP6), ports],
                                                   5 + 17 + (6 << 8))
    # The tag: the other two words of the same pass's final state, b then a (one hash).
    for f in (f4, f6):
        tag = conn_tag(f)
        c, b, a = conn_hash3(f, flowhash.CONN_SEED)
        assert tag & 2
        assert conn_index(f, 1 << 20) == c & ((1 << 20) - 1)
        assert tag >> 32 == b, "the tag's high word is not lookup3's second result"
        assert tag & 0xFFFFFFFD == a & 0xFFFFFFFD, "the tag's low word is not the third word"


def test_vectorised_hashes_equal_the_scalar_ones() -> None:
    flows = _random_flows(600)
    for version in (4, 6):
        fl = [f for f in flows if f.src.version == version]
        many = Flows.of(fl)
        assert list(flowhash.hash_flow_many(many)) == [hash_flow(f) for f in fl]
        assert list(flowhash.hash_flow_many(many, src_only=True)) == [
            hash_flow(f, src_only=True) for f in fl]
        assert list(flowhash.conn_tag_many(many)) == [conn_tag(f) for f in fl]
        assert list(conn_index_many(many, 1 << 20)) == [conn_index(f, 1 << 20) for f in fl]
    v4 = [f for f in flows if f.src.version == 4]
    from_ints = Flows.v4([int(f.src) for f in v4], [int(f.dst) for f in v4],
                         [f.sport for f in v4], [f.dport for f in v4], [f.proto for f in v4])
    assert list(flowhash.conn_tag_many(from_ints)) == [conn_tag(f) for f in v4]


def test_flow5_refuses_mixed_families_and_bad_ports() -> None:
    with pytest.raises(ValueError, match="different address families"):
        Flow5.of(CLIENT4, VIP6, 1, 2, "tcp")
    with pytest.raises(ValueError, match="sport"):
        Flow5.of(CLIENT4, VIP4, 70000, 2, "tcp")


# --- against the program ---------------------------------------------------------------------


@pytest.mark.parametrize(("version", "proto"), CASES)
def test_a_packet_creates_the_slot_python_predicts(bed: Bed, version: int, proto: str) -> None:
    flow = bed.flow(version, proto)
    flags = "S" if proto == "tcp" else ""
    t0 = time.monotonic()
    assert bed.send(flow, flags) == str(RING[version][1]), "the ring picks a new flow"
    entry = bed.table.lookup(flow)
    # Time passes while the test runs (minutes-slow under qemu's TCG): allow for it.
    slack = 2 * STAMP_S + (time.monotonic() - t0)
    assert entry is not None, "the packet left no entry where Python looks"
    assert entry.real_idx == RING[version][0] and entry.vip_num == VIP_NUMS[(version, proto)]
    assert entry.udp == (proto == "udp") and not entry.closing
    assert entry.age_s < slack, "the stamp is not the data plane's clock now"
    # Read back through bpf(2), independently of the mmap: the set index and tag agree.
    s = conn_index(flow, bed.table.sets)
    tags = [int(w.tag) for w in bed.b.conn_table[bed.b.conn_table.Key(s)].way]
    assert conn_tag(flow) in tags, "the C put the flow in another set or with another tag"
    assert bed.table.count() == 1 and len(bed.table.entries()) == 1


@pytest.mark.parametrize(("version", "proto"), CASES)
def test_insert_steers_the_next_packet_and_delete_makes_it_miss(
    bed: Bed, free_path: str, version: int, proto: str
) -> None:
    flow = bed.flow(version, proto, sport=40100)
    idx, addr = CONN[version]
    bed.table.insert(flow, idx, VIP_NUMS[(version, proto)], udp=proto == "udp")
    hits = bed.counter("STAT_LRU_HIT")
    assert bed.send(flow) == str(addr), "the program did not follow the entry Python wrote"
    assert bed.counter("STAT_LRU_HIT") == hits + 1
    assert bed.table.delete(flow), "delete did not find the entry"
    assert bed.table.lookup(flow) is None and bed.table.count() == 0
    assert not bed.table.delete(flow), "a second delete found something"
    assert bed.send(flow) == str(RING[version][1]), "after delete the flow still hit the table"
    assert bed.table.lookup(flow) is not None, "the miss re-inserted the flow (program)"


@pytest.mark.parametrize(("version", "proto"), CASES)
def test_count_and_entries_agree_with_what_was_written(
    bed: Bed, version: int, proto: str
) -> None:
    num = VIP_NUMS[(version, proto)]
    by_packet = [bed.flow(version, proto, sport=41000 + i) for i in range(20)]
    by_python = [bed.flow(version, proto, sport=42000 + i) for i in range(30)]
    for f in by_packet:
        bed.send(f, "S" if proto == "tcp" else "")
    t0 = time.monotonic()
    for f in by_python:
        bed.table.insert(f, CONN[version][0], num, udp=proto == "udp", age_s=5.0)
    assert bed.table.count() == 50
    e = bed.table.entries()
    assert len(e) == 50
    assert sorted(e.real_idx.tolist()) == [RING[version][0]] * 20 + [CONN[version][0]] * 30
    assert (e.vip_num == num).all() and (e.udp == (proto == "udp")).all()
    aged = e.age_s[e.real_idx == CONN[version][0]]
    late = time.monotonic() - t0  # the entries age while they are written and read
    ok = (aged >= 5.0 - 2 * STAMP_S) & (aged <= 5.0 + late + 2 * STAMP_S)
    assert ok.all(), "insert's age_s does not read back"


def test_fin_marks_the_entry_closing_and_a_packet_refreshes_its_stamp(bed: Bed) -> None:
    flow = bed.flow(4, "tcp", sport=40200)
    bed.table.insert(flow, CONN[4][0], VIP_NUMS[(4, "tcp")], age_s=10.0)
    t0 = time.monotonic()
    assert bed.send(flow, "FA") == str(CONN[4][1])
    entry = bed.table.lookup(flow)
    slack = 2 * STAMP_S + (time.monotonic() - t0)
    assert entry is not None and entry.closing, "a client FIN marks the entry closing"
    assert entry.age_s < slack, "the packet did not refresh the stamp"


def test_insert_replaces_an_expired_udp_entry_before_the_oldest_live_one(bed: Bed) -> None:
    flow = bed.flow(4, "udp", sport=40300)
    mates = _set_mates(flow, bed.table.sets, 9)
    num = VIP_NUMS[(4, "udp")]
    for i, m in enumerate(mates[:8]):  # fill the set: one expired, the others live
        bed.table.insert(m, CONN[4][0], num, udp=True,
                         age_s=TIMEOUT_S + 5 if i == 3 else 1.0 + i)
    assert bed.table.count() == 8
    bed.table.insert(flow, CONN[4][0], num, udp=True)
    assert bed.table.lookup(mates[3]) is None, "the expired entry was not the one replaced"
    assert all(bed.table.lookup(m) for m in mates[:3] + mates[4:8])
    bed.table.insert(mates[8], CONN[4][0], num, udp=True)
    assert bed.table.lookup(mates[7]) is None, "a full set evicts its least recently seen"
    assert bed.send(flow) == str(CONN[4][1])


def test_insert_many_writes_what_lookup_and_the_program_see(bed: Bed) -> None:
    n = 5000
    base = int(ipaddress.IPv4Address("198.18.16.0"))
    many = Flows.v4(base + np.arange(n) // 1000, int(VIP4), 1024 + np.arange(n) % 1000, PORT, 17)
    written = bed.table.insert_many(many, CONN[4][0], VIP_NUMS[(4, "udp")], udp=True)
    assert written == n, "a 65,536-slot table has room for 5,000 flows"
    assert bed.table.count() == n
    # Writing them again finds each flow's own slot: nothing new.
    assert bed.table.insert_many(many, CONN[4][0], VIP_NUMS[(4, "udp")], udp=True) == n
    assert bed.table.count() == n
    for i in (0, 1234, n - 1):
        f = Flow5.of(ipaddress.IPv4Address(base + i // 1000), VIP4, 1024 + i % 1000, PORT,
                     "udp")
        entry = bed.table.lookup(f)
        assert entry is not None and entry.real_idx == CONN[4][0] and entry.udp
        assert bed.send(f) == str(CONN[4][1])


def test_slot_words_are_never_left_busy(bed: Bed) -> None:
    for i in range(100):
        bed.table.insert(bed.flow(6, "tcp", sport=43000 + i), CONN[6][0], VIP_NUMS[(6, "tcp")])
    s = conn_index(bed.flow(6, "tcp", sport=43000), bed.table.sets)
    tags = [int(w.tag) for w in bed.b.conn_table[bed.b.conn_table.Key(s)].way]
    assert CONN_TAG_BUSY not in tags and any(t != CONN_TAG_EMPTY for t in tags)


def _set_mates(flow: Flow5, sets: int, n: int) -> list[Flow5]:
    """`n` other flows to the same VIP and port in `flow`'s set, from `flow`'s client and the
    next few addresses (every source port), in a fixed order."""
    ports = np.tile(np.arange(1024, 65536), 4)
    clients = int(flow.src) + np.repeat(np.arange(4), 65536 - 1024)
    cands = Flows.v4(clients, int(flow.dst), ports, flow.dport, flow.proto)
    hit = np.flatnonzero(conn_index_many(cands, sets) == conn_index(flow, sets))
    mates = [Flow5(ipaddress.IPv4Address(int(clients[i])), flow.dst, int(ports[i]), flow.dport,
                   flow.proto) for i in hit]
    mates = [m for m in mates if m != flow]
    assert len(mates) >= n
    return mates[:n]


def test_restoring_puts_back_the_flow_a_run_evicted(bed: Bed) -> None:
    flow = bed.flow(4, "udp", sport=40400)
    mates = _set_mates(flow, bed.table.sets, 8)
    num = VIP_NUMS[(4, "udp")]
    for i, m in enumerate(mates):
        bed.table.insert(m, CONN[4][0], num, udp=True, age_s=1.0 + i)
    s = conn_index(flow, bed.table.sets)
    before = [(int(w.tag), int(w.meta)) for w in bed.b.conn_table[bed.b.conn_table.Key(s)].way]
    evictions = bed.counter("STAT_CONN_EVICT")
    with bed.table.restoring(flow):
        assert bed.send(flow) == str(RING[4][1])
        assert bed.table.lookup(flow) is not None and bed.table.lookup(mates[7]) is None
    assert bed.counter("STAT_CONN_EVICT") == evictions + 1, "the run evicted the oldest"
    after = [(int(w.tag), int(w.meta)) for w in bed.b.conn_table[bed.b.conn_table.Key(s)].way]
    assert after == before, "the set is not as it was before the run"
    with bed.table.restoring(bed.flow(6, "tcp", sport=40401)):
        bed.send(bed.flow(6, "tcp", sport=40401))
    assert bed.table.count() == 8, "a run into a free slot leaves it free again"


def test_capacity_is_sets_times_ways(bed: Bed) -> None:
    assert bed.table.capacity == bed.table.sets * 8 == bed.b.config.conn_capacity


def test_compare_and_swap_with_libatomic_and_its_fallback() -> None:
    fallback = conntab._Atomic()
    fallback._cas = None
    for atomic in (conntab._atomic, fallback):
        word = ctypes.c_uint64(5)
        assert atomic.cas(ctypes.addressof(word), 5, 1 << 63) and word.value == 1 << 63
        assert not atomic.cas(ctypes.addressof(word), 5, 9) and word.value == 1 << 63
        words = (ctypes.c_uint64 * 4)(7, 8, 9, 1 << 63)
        addrs = ctypes.addressof(words) + 8 * np.arange(4, dtype=np.int64)
        expected = np.array([7, 0, 9, 1 << 63], np.uint64)
        assert atomic.cas_many(addrs, expected, 0) == 3, "one expected value was wrong"
        assert list(words) == [0, 8, 0, 0]


def _words(n: int) -> tuple[mmap.mmap, NDArray[np.uint64]]:
    """An anonymous shared mapping of `n` 64-bit words (like the table's) and its view."""
    mm = mmap.mmap(-1, 8 * n)
    return mm, np.frombuffer(mm, np.uint64)


def test_bulk_compare_and_swap_in_c_swaps_what_libatomic_swaps() -> None:
    rng = np.random.default_rng(11)
    n = 50_000
    start = rng.integers(2, 1 << 63, n, dtype=np.uint64)
    # Every other word, in random order with repeats (a second swap finds the new value).
    at = rng.choice(np.arange(0, n, 2), 30_000)
    expected = start[at].copy()
    stale = rng.random(len(at)) < 0.3  # words rewritten since they were read
    expected[stale] ^= _U64(4)
    results = []
    for path in ("c", "libatomic"):
        mm, w = _words(n)
        w[:] = start
        if path == "c":
            swapped = _conntab.cas_many(mm, at * 8, expected, 0)
        else:
            addrs = w.ctypes.data + at * 8
            swapped = conntab._atomic.cas_many(addrs, expected.copy(), 0)
        results.append((swapped, w.copy()))
        del w
        mm.close()
    (c_n, c_w), (py_n, py_w) = results
    assert c_n == py_n and np.array_equal(c_w, py_w), "the C path swapped other words"
    want = np.unique(at[~stale])
    assert c_n == len(want), "a repeated offset or a stale value was counted"
    gone = np.zeros(n, bool)
    gone[want] = True
    assert (c_w[gone] == 0).all() and np.array_equal(c_w[~gone], start[~gone])


def test_bulk_compare_and_swap_takes_numpy_arrays_and_buffers_of_8_byte_integers() -> None:
    mm, w = _words(8)
    w[:] = np.arange(10, 18, dtype=np.uint64)
    assert _conntab.cas_many(mm, np.array([0, 16], np.intp), np.array([10, 12], np.uint64),
                             1 << 63) == 2
    assert _conntab.cas_many(mm, array.array("Q", [8, 24]), array.array("q", [11, 99]), 0) == 1
    assert _conntab.cas_many(mm, np.array([], np.int64), np.array([], np.uint64), 0) == 0
    assert w.tolist() == [1 << 63, 0, 1 << 63, *range(13, 18)]
    before = w.copy()
    # Every offset is checked before any word is touched: a bad one changes nothing.
    cases: list[tuple[Any, Any, type[Exception], str]] = [
        (np.array([24, 4]), np.array([13, 0], np.uint64), ValueError, r"offsets\[1\] = 4"),
        (np.array([24, 64]), np.array([13, 0], np.uint64), ValueError, "64-byte table"),
        (np.array([24, -8]), np.array([13, 0], np.uint64), ValueError, "not an aligned word"),
        (np.array([24, 32]), np.array([13], np.uint64), ValueError, "differ in length"),
        (np.array([24], np.int32), np.array([13], np.uint64), TypeError, "8-byte integers"),
        (np.array([24.0]), np.array([13], np.uint64), TypeError, "8-byte integers"),
        (np.array([24, 0, 32])[::2], np.array([13, 14], np.uint64), ValueError, "contiguous"),
    ]
    for offsets, expected, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            _conntab.cas_many(mm, offsets, expected, 0)
    with pytest.raises(TypeError, match="read-write"):
        _conntab.cas_many(bytes(64), np.array([24]), np.array([13], np.uint64), 0)
    assert np.array_equal(w, before)
    del w
    mm.close()


# --- purge -----------------------------------------------------------------------------------

# (vip_num, real_idx) -> how many flows name the pair.
PURGE_MIX = {(1, 2): 30, (1, 3): 20, (2, 2): 25, (3, 4): 15}


def _fill_mix(bed: Bed) -> dict[tuple[int, int], list[Flow5]]:
    """Flows naming each pair of PURGE_MIX, written by insert() (UDP and TCP, some closing)."""
    out: dict[tuple[int, int], list[Flow5]] = {}
    sport = 50000
    for (num, idx), n in PURGE_MIX.items():
        flows = []
        for i in range(n):
            sport += 1
            f = bed.flow(4, "udp" if i % 2 else "tcp", sport=sport)
            bed.table.insert(f, idx, num, udp=i % 2 == 1, closing=i % 3 == 0, age_s=i)
            flows.append(f)
        out[(num, idx)] = flows
    return out


def _pairs(bed: Bed) -> dict[tuple[int, int], int]:
    e = bed.table.entries()
    pairs = zip(e.vip_num.tolist(), e.real_idx.tolist(), strict=True)
    out: dict[tuple[int, int], int] = {}
    for pair in pairs:
        out[pair] = out.get(pair, 0) + 1
    return out


@pytest.mark.parametrize(
    ("kw", "gone"),
    [
        ({"vip_num": 1}, {(1, 2), (1, 3)}),
        ({"real_idx": 2}, {(1, 2), (2, 2)}),
        ({"vip_num": 1, "real_idx": 2}, {(1, 2)}),
        ({"vip_num": 9}, set()),
    ],
    ids=["vip-number", "backend-index", "both-the-pair", "nothing-named"],
)
def test_purge_frees_exactly_the_slots_naming_what_it_is_given(
    bed: Bed, free_path: str, kw: dict[str, int], gone: set[tuple[int, int]]
) -> None:
    flows = _fill_mix(bed)
    assert bed.table.purge(**kw) == sum(PURGE_MIX[p] for p in gone), "wrong number freed"
    assert _pairs(bed) == {p: n for p, n in PURGE_MIX.items() if p not in gone}
    for pair, fs in flows.items():
        for f in fs[:3]:
            assert (bed.table.lookup(f) is None) == (pair in gone), f"{pair}: {f}"
    assert bed.table.purge(**kw) == 0, "a second purge found more"


def test_purge_any_and_purge_unless_take_sets_of_values(bed: Bed, free_path: str) -> None:
    _fill_mix(bed)
    assert bed.table.purge_any() == 0
    # Six VIP numbers: matched through a lookup table rather than comparisons.
    assert bed.table.purge_any(vip_nums=[3, 10, 11, 12, 13, 14]) == PURGE_MIX[(3, 4)]
    assert bed.table.purge_any(vip_nums=[2], real_idx=[3]) == PURGE_MIX[(2, 2)] + PURGE_MIX[
        (1, 3)]
    assert _pairs(bed) == {(1, 2): PURGE_MIX[(1, 2)]}
    _fill_mix(bed)
    assert bed.table.purge_unless(vip_nums=[1, 2, 3], real_idx=[2, 4]) == PURGE_MIX[(1, 3)]
    assert bed.table.purge_unless(vip_nums=[1], real_idx=range(1, 10)) == (
        PURGE_MIX[(2, 2)] + PURGE_MIX[(3, 4)])
    assert bed.table.purge_unless(vip_nums=[], real_idx=[]) == PURGE_MIX[(1, 2)]
    assert bed.table.count() == 0


def test_purge_covers_the_whole_table(bed: Bed, free_path: str) -> None:
    n = 20000  # about a third of the 65,536 slots, in every purge chunk of the table
    base = int(ipaddress.IPv4Address("198.18.32.0"))
    many = Flows.v4(base + np.arange(n) // 1000, int(VIP4), 1024 + np.arange(n) % 1000, PORT, 6)
    written = bed.table.insert_many(many, 5, np.arange(n) % 2)
    assert written > 0.99 * n
    sets = np.unique(conn_index_many(many, bed.table.sets) // conntab.PURGE_CHUNK_SETS)
    assert len(sets) == bed.table.sets // conntab.PURGE_CHUNK_SETS > 1
    odd = int((bed.table.entries().vip_num == 1).sum())
    assert bed.table.purge(vip_num=1) == odd
    assert bed.table.count() == written - odd
    assert bed.table.purge(real_idx=5) == written - odd and bed.table.count() == 0


def test_a_purged_flow_takes_the_ring_again(bed: Bed, free_path: str) -> None:
    flow = bed.flow(4, "tcp", sport=40500)
    idx, addr = CONN[4]
    bed.table.insert(flow, idx, VIP_NUMS[(4, "tcp")])
    assert bed.send(flow) == str(addr)
    assert bed.table.purge(real_idx=idx) == 1
    assert bed.send(flow) == str(RING[4][1]), "the purged entry still steered the flow"
    entry = bed.table.lookup(flow)
    assert entry is not None and entry.real_idx == RING[4][0], "the miss re-inserted the flow"


@pytest.mark.parametrize("claimed", [False, True], ids=["rewritten", "being-written"])
def test_purge_leaves_alone_a_slot_the_data_plane_rewrote_meanwhile(
    bed: Bed, free_path: str, monkeypatch: pytest.MonkeyPatch, claimed: bool
) -> None:
    num = VIP_NUMS[(4, "udp")]
    stale = [bed.flow(4, "udp", sport=40600 + i) for i in range(5)]
    for f in stale:
        bed.table.insert(f, CONN[4][0], num, udp=True)
    newcomer = _set_mates(stale[0], bed.table.sets, 1)[0]
    s = conn_index(stale[0], bed.table.sets)
    way = [int(t) for t in bed.table._w[s, :, 0]].index(conn_tag(stale[0]))
    real_free = bed.table._free
    raced = []

    def racing(slot: Any, tag: Any) -> int:
        # Between the purge's read of the slot and its compare-and-swap, the program puts
        # another flow there (claim, meta, tag), as conn_insert does when it evicts; or it
        # has claimed the slot and not written it yet.
        if s * CONN_WAYS + way not in slot:
            return real_free(slot, tag)
        raced.append(len(slot))
        bed.table._w[s, way, 0] = CONN_TAG_BUSY
        if not claimed:
            bed.table._w[s, way, 1] = conntab.make_meta(RING[4][0], num, udp=True,
                                                        closing=False, stamp=conntab.now_stamp())
            bed.table._w[s, way, 0] = conn_tag(newcomer)
        return real_free(slot, tag)

    monkeypatch.setattr(bed.table, "_free", racing)
    assert bed.table.purge(vip_num=num) == 4, "the rewritten slot was counted as freed"
    assert len(raced) == 1, "the purge did not select the slot"
    monkeypatch.undo()
    if claimed:
        assert int(bed.table._w[s, way, 0]) == CONN_TAG_BUSY, "a claimed slot was freed"
        bed.table._w[s, way, 0] = conn_tag(stale[0])  # the program's store of the tag
        assert bed.table.lookup(stale[0]) is not None
    else:
        entry = bed.table.lookup(newcomer)
        assert entry is not None and entry.real_idx == RING[4][0], "the newcomer was freed"
        assert bed.table.lookup(stale[0]) is None
    assert all(bed.table.lookup(f) is None for f in stale[1:])


def test_bulk_free_leaves_alone_a_tag_changed_after_the_candidates_were_read(
    bed: Bed,
) -> None:
    """lb.dataplane._conntab.cas_many on the mapped table itself: candidates read, then one
    slot's tag rewritten and one claimed (BUSY) before the call; neither is freed nor counted."""
    num = VIP_NUMS[(4, "tcp")]
    flows = [bed.flow(4, "tcp", sport=40700 + i) for i in range(20)]
    for f in flows:
        bed.table.insert(f, CONN[4][0], num)
    flat = bed.table._w.reshape(-1, 2)
    slot = np.flatnonzero(flat[:, 0] > CONN_TAG_BUSY)
    tag = flat[slot, 0].copy()
    assert len(slot) == 20
    flat[slot[3], 0] = conn_tag(bed.flow(4, "tcp", sport=40799))
    flat[slot[7], 0] = CONN_TAG_BUSY
    freed = _conntab.cas_many(bed.table._mm, slot * 16, tag, CONN_TAG_EMPTY)
    assert freed == 18
    assert flat[slot[3], 0] == conn_tag(bed.flow(4, "tcp", sport=40799))
    assert flat[slot[7], 0] == CONN_TAG_BUSY
    assert bed.table.count() == 1
    assert _conntab.cas_many(bed.table._mm, slot * 16, tag, CONN_TAG_EMPTY) == 0
    flat[slot[7], 0] = CONN_TAG_EMPTY


def test_the_c_path_and_the_fallback_free_the_same_slots(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same table purged both ways (restored in between), some slots rewritten by a
    racing writer between selection and the swap: the same slots stay, the same count."""
    n = 40_000
    base = int(ipaddress.IPv4Address("198.18.64.0"))
    many = Flows.v4(base + np.arange(n) // 1000, int(VIP4), 1024 + np.arange(n) % 1000, PORT, 6)
    written = bed.table.insert_many(many, 1 + np.arange(n) % 7, np.arange(n) % 5)
    assert written > 0.5 * bed.table.capacity
    start = bed.table._w.copy()
    rng = np.random.default_rng(3)
    flat = bed.table._w.reshape(-1, 2)
    # Slots the racing writer rewrites (another tag) or claims (BUSY) once a purge selected.
    busy = np.flatnonzero(flat[:, 0] > CONN_TAG_BUSY)
    rewrite, claim = np.split(rng.choice(busy, 600, replace=False), 2)
    real_free = ConnTable._free

    def racing(table: ConnTable, slot: Any, tag: Any) -> int:
        mine = np.isin(rewrite, slot)
        flat[rewrite[mine], 0] ^= _U64(4)
        flat[claim[np.isin(claim, slot)], 0] = CONN_TAG_BUSY
        return real_free(table, slot, tag)

    monkeypatch.setattr(ConnTable, "_free", racing)
    runs = [
        lambda: bed.table.purge(vip_num=2),
        lambda: bed.table.purge(real_idx=3),
        lambda: bed.table.purge_any(vip_nums=[0, 4], real_idx=[5]),
        lambda: bed.table.purge_unless(vip_nums=[0, 1, 2, 3], real_idx=range(1, 7)),
    ]
    results = {}
    for path in ("c", "libatomic"):
        out = []
        for run in runs:
            bed.table._w[:] = start
            if path == "libatomic":
                monkeypatch.setattr(conntab, "_conntab", None)
            freed = run()
            monkeypatch.setattr(conntab, "_conntab", _conntab)
            out.append((freed, bed.table._w[:, :, 0].copy()))
        results[path] = out
    for k, ((c_n, c_tags), (py_n, py_tags)) in enumerate(
            zip(results["c"], results["libatomic"], strict=True)):
        assert c_n == py_n, f"run {k}: C freed {c_n}, the fallback {py_n}"
        assert np.array_equal(c_tags, py_tags), f"run {k}: different slots freed"
        tags = c_tags.reshape(-1)
        assert c_n > 0 and (tags[rewrite] != start[:, :, 0].reshape(-1)[rewrite]).any(), \
            f"run {k}: the racing writer rewrote no slot the purge had selected"
        assert not (tags[rewrite] == CONN_TAG_EMPTY).any(), f"run {k}: a rewritten slot freed"
        assert (tags[claim] != CONN_TAG_EMPTY).all(), f"run {k}: a claimed slot was freed"
    bed.table._w[:] = start


def test_purge_refuses_no_field_and_values_out_of_range(bed: Bed) -> None:
    _fill_mix(bed)
    with pytest.raises(ValueError, match="vip_num, real_idx or both"):
        bed.table.purge()
    with pytest.raises(ValueError, match="vip_num must be in"):
        bed.table.purge(vip_num=1 << 16)
    with pytest.raises(ValueError, match="real_idx must be in"):
        bed.table.purge(real_idx=-1)
    # The set forms take values read from the maps: one no slot can hold names no slot.
    assert bed.table.purge_any(vip_nums=[1 << 16], real_idx=[-1, 1 << 20]) == 0
    assert bed.table.purge_unless(vip_nums=[1, 2, 3, 1 << 16], real_idx=[2, 3, 4, -1]) == 0
    assert bed.table.count() == sum(PURGE_MIX.values())
