"""The data plane's flow hashes in Python, bit for bit (xdp/common/hash.h).

`hash_flow` is the hash whose value modulo the ring size picks a Maglev slot; `conn_hash3`
is the same hash with another initval, returning all three words of lookup3's final state
(c, b, a) from one pass, from which the connection table takes a flow's set index and tag
(docs/conn-table.md). Both read a 5-tuple the way the program reads `struct flow_key`: every
word is the u32 of the packet's network-order bytes in host order (little-endian), and
`ports` is the word holding the source port then the destination port.

Each hash has a vectorised twin over `Flows` (numpy arrays of many flows of one family), for
filling or scanning millions of connection-table entries; tests check the two agree.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from lb.consts import (
    CONN_SEED,
    CONN_TAG_SET,
    FAMILY_V4,
    FAMILY_V6,
    VIP_FILTER_LOG2,
    VIP_FILTER_MULT,
)
from lb.dataplane.keys import IPAddress, addr16, family_of, proto_number

U32 = NDArray[np.uint32]
U64 = NDArray[np.uint64]

# Named as in xdp/common/hash.h (tests/kernel/test_conntab.py parses the header and compares).
HASH_SEED = 0x786C6221
HASH_JHASH_INITVAL = 0xDEADBEEF

_M = 0xFFFFFFFF


@dataclass(frozen=True)
class Flow5:
    """A flow's 5-tuple as the client sends it: addresses of one family, host-order ports."""

    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    proto: int

    def __post_init__(self) -> None:
        if self.src.version != self.dst.version:
            raise ValueError(f"{self.src} and {self.dst} are of different address families")
        for name in ("sport", "dport"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if not 0 <= self.proto <= 0xFF:
            raise ValueError(f"proto must be in 0..255, got {self.proto}")

    @classmethod
    def of(cls, src: str | IPAddress, dst: str | IPAddress, sport: int, dport: int,
           proto: str | int) -> Flow5:
        """A flow from address strings (or objects) and a protocol name ("tcp") or number."""
        return cls(ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport,
                   proto_number(proto))

    @property
    def family(self) -> int:
        """FAMILY_V4 or FAMILY_V6, as `struct flow_key.family` holds it."""
        return family_of(self.src)


# --- lookup3 (the kernel's include/linux/jhash.h), on Python ints ---------------------------


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = ((a - c) & _M) ^ _rol(c, 4)
    c = (c + b) & _M
    b = ((b - a) & _M) ^ _rol(a, 6)
    a = (a + c) & _M
    c = ((c - b) & _M) ^ _rol(b, 8)
    b = (b + a) & _M
    a = ((a - c) & _M) ^ _rol(c, 16)
    c = (c + b) & _M
    b = ((b - a) & _M) ^ _rol(a, 19)
    a = (a + c) & _M
    c = ((c - b) & _M) ^ _rol(b, 4)
    b = (b + a) & _M
    return a, b, c


def _final3(a: int, b: int, c: int) -> tuple[int, int, int]:
    """lookup3's final(): (c, b, a), the primary result, the second one, the third word."""
    c = ((c ^ b) - _rol(b, 14)) & _M
    a = ((a ^ c) - _rol(c, 11)) & _M
    b = ((b ^ a) - _rol(a, 25)) & _M
    c = ((c ^ b) - _rol(b, 16)) & _M
    a = ((a ^ c) - _rol(c, 4)) & _M
    b = ((b ^ a) - _rol(a, 14)) & _M
    c = ((c ^ b) - _rol(b, 24)) & _M
    return c, b, a


def jhash_3words3(a: int, b: int, c: int, initval: int) -> tuple[int, int, int]:
    """The kernel's jhash_3words(), and the final state's other words: (c, b, a)."""
    iv = (initval + HASH_JHASH_INITVAL + (3 << 2)) & _M
    return _final3((a + iv) & _M, (b + iv) & _M, (c + iv) & _M)


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    """The kernel's jhash_3words()."""
    return jhash_3words3(a, b, c, initval)[0]


def jhash2_3(words: list[int], initval: int) -> tuple[int, int, int]:
    """The kernel's jhash2() over any number of u32 words, and the final state's other
    words: (c, b, a)."""
    a = b = c = (HASH_JHASH_INITVAL + (len(words) << 2) + initval) & _M
    k = list(words)
    while len(k) > 3:
        a, b, c = _mix((a + k[0]) & _M, (b + k[1]) & _M, (c + k[2]) & _M)
        k = k[3:]
    if not k:
        return c, b, a
    k += [0] * (3 - len(k))
    return _final3((a + k[0]) & _M, (b + k[1]) & _M, (c + k[2]) & _M)


def jhash2(words: list[int], initval: int) -> int:
    """The kernel's jhash2() over any number of u32 words."""
    return jhash2_3(words, initval)[0]


def addr_words(addr: IPAddress) -> tuple[int, int, int, int]:
    """The four words of `__be32 addr[4]` as the program reads them (IPv4 in word 0)."""
    w = struct.unpack("<4I", addr16(addr))
    return w[0], w[1], w[2], w[3]


def ports_word(sport: int, dport: int) -> int:
    """The u32 holding sport then dport in network order, read in host order."""
    word: int = struct.unpack("<I", struct.pack("!HH", sport, dport))[0]
    return word


def _hash5_3(flow: Flow5, ports: int, initval: int) -> tuple[int, int, int]:
    if flow.src.version == 4:
        return jhash_3words3(addr_words(flow.src)[0], addr_words(flow.dst)[0], ports, initval)
    return jhash2_3([*addr_words(flow.src), *addr_words(flow.dst), ports], initval)


def _hash5(flow: Flow5, ports: int, initval: int) -> int:
    return _hash5_3(flow, ports, initval)[0]


def hash_flow(flow: Flow5, *, src_only: bool = False) -> int:
    """The flow hash that picks a ring slot (hash.h `hash_flow`; F_HASH_SRC_ONLY: no ports)."""
    ports = 0 if src_only else ports_word(flow.sport, flow.dport)
    return _hash5(flow, ports, (HASH_SEED + flow.proto) & _M)


def conn_hash3(flow: Flow5, seed: int) -> tuple[int, int, int]:
    """hash.h `conn_hash3`: the full 5-tuple hashed with initval seed + proto + (family << 8);
    (c, b, a), the three words of lookup3's final state (one pass)."""
    initval = (seed + flow.proto + (flow.family << 8)) & _M
    return _hash5_3(flow, ports_word(flow.sport, flow.dport), initval)


def conn_index(flow: Flow5, sets: int) -> int:
    """The flow's set in a connection table of `sets` sets (a power of two)."""
    return conn_hash3(flow, CONN_SEED)[0] & (sets - 1)


#: hash.h PAIR_SLOT_MULT.
PAIR_SLOT_MULT = 0x9E3779B1


def pair_slot(vip_num: int, real_idx: int, slots_log2: int) -> int:
    """hash.h `hash_pair_slot`: the pair_cache slot of (VIP number, backend index)."""
    return ((((vip_num << 16) ^ real_idx) * PAIR_SLOT_MULT) & _M) >> (32 - slots_log2)


def conn_tag(flow: Flow5) -> int:
    """The flow's 64-bit tag in the connection table (never CONN_TAG_EMPTY or _BUSY)."""
    _, hi, lo = conn_hash3(flow, CONN_SEED)
    return (hi << 32 | lo) | CONN_TAG_SET


# --- the same hashes over numpy arrays ------------------------------------------------------


@dataclass(frozen=True)
class Flows:
    """Many flows of one family as arrays: the vectorised twin of `Flow5`.

    `src` and `dst` are (n, 4) words as `addr_words` gives them (IPv4: word 0, the rest 0);
    ports are host order; `proto` is one protocol number for all or one per flow.
    """

    version: int
    src: U32
    dst: U32
    sport: NDArray[np.uint16]
    dport: NDArray[np.uint16]
    proto: NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.sport)

    @classmethod
    def v4(cls, src: Any, dst: Any, sport: Any, dport: Any, proto: Any) -> Flows:
        """IPv4 flows from addresses as integers (`int(IPv4Address)`), ports, protocols.

        Every argument is an array-like or a scalar broadcast to the others' length.
        """
        s, d, sp, dp, pr = np.broadcast_arrays(
            np.asarray(src, np.uint32), np.asarray(dst, np.uint32),
            np.asarray(sport, np.uint16), np.asarray(dport, np.uint16),
            np.asarray(proto, np.uint8),
        )  # fmt: skip
        return cls(4, _v4_words(s), _v4_words(d), sp.ravel(), dp.ravel(), pr.ravel())

    @classmethod
    def of(cls, flows: list[Flow5]) -> Flows:
        """Flows from a list of `Flow5` (all of one family)."""
        versions = {f.src.version for f in flows}
        if len(versions) > 1:
            raise ValueError("Flows holds flows of one address family")
        return cls(
            versions.pop() if versions else 4,
            np.array([addr_words(f.src) for f in flows], np.uint32).reshape(-1, 4),
            np.array([addr_words(f.dst) for f in flows], np.uint32).reshape(-1, 4),
            np.array([f.sport for f in flows], np.uint16),
            np.array([f.dport for f in flows], np.uint16),
            np.array([f.proto for f in flows], np.uint8),
        )


def _v4_words(addrs: U32) -> U32:
    out = np.zeros((addrs.size, 4), np.uint32)
    out[:, 0] = addrs.ravel().byteswap()  # host-order integer -> network bytes read LE
    return out


def _rol_np(x: U32, k: int) -> U32:
    return (x << np.uint32(k)) | (x >> np.uint32(32 - k))


def _mix_np(a: U32, b: U32, c: U32) -> tuple[U32, U32, U32]:
    a = (a - c) ^ _rol_np(c, 4)
    c = c + b
    b = (b - a) ^ _rol_np(a, 6)
    a = a + c
    c = (c - b) ^ _rol_np(b, 8)
    b = b + a
    a = (a - c) ^ _rol_np(c, 16)
    c = c + b
    b = (b - a) ^ _rol_np(a, 19)
    a = a + c
    c = (c - b) ^ _rol_np(b, 4)
    b = b + a
    return a, b, c


def _final3_np(a: U32, b: U32, c: U32) -> tuple[U32, U32, U32]:
    c = (c ^ b) - _rol_np(b, 14)
    a = (a ^ c) - _rol_np(c, 11)
    b = (b ^ a) - _rol_np(a, 25)
    c = (c ^ b) - _rol_np(b, 16)
    a = (a ^ c) - _rol_np(c, 4)
    b = (b ^ a) - _rol_np(a, 14)
    return (c ^ b) - _rol_np(b, 24), b, a


def _ports_np(flows: Flows) -> U32:
    sport = flows.sport.byteswap().astype(np.uint32)
    dport = flows.dport.byteswap().astype(np.uint32)
    return sport | (dport << np.uint32(16))


def _hash5_3_np(flows: Flows, ports: U32, initval: U32) -> tuple[U32, U32, U32]:
    s, d = flows.src, flows.dst
    if flows.version == 4:
        iv = initval + np.uint32((HASH_JHASH_INITVAL + (3 << 2)) & _M)
        return _final3_np(s[:, 0] + iv, d[:, 0] + iv, ports + iv)
    a = b = c = initval + np.uint32((HASH_JHASH_INITVAL + (9 << 2)) & _M)
    a, b, c = _mix_np(a + s[:, 0], b + s[:, 1], c + s[:, 2])
    a, b, c = _mix_np(a + s[:, 3], b + d[:, 0], c + d[:, 1])
    return _final3_np(a + d[:, 2], b + d[:, 3], c + ports)


def _hash5_np(flows: Flows, ports: U32, initval: U32) -> U32:
    return _hash5_3_np(flows, ports, initval)[0]


def _initval_np(flows: Flows, seed: int) -> U32:
    family = FAMILY_V4 if flows.version == 4 else FAMILY_V6
    return flows.proto.astype(np.uint32) + np.uint32((seed + (family << 8)) & _M)


def hash_flow_many(flows: Flows, *, src_only: bool = False) -> U32:
    """`hash_flow` of every flow."""
    ports = np.zeros(len(flows), np.uint32) if src_only else _ports_np(flows)
    return _hash5_np(flows, ports, flows.proto.astype(np.uint32) + np.uint32(HASH_SEED))


def conn_hash3_many(flows: Flows, seed: int) -> tuple[U32, U32, U32]:
    """`conn_hash3` of every flow."""
    return _hash5_3_np(flows, _ports_np(flows), _initval_np(flows, seed))


def conn_index_many(flows: Flows, sets: int) -> U32:
    """`conn_index` of every flow."""
    return conn_hash3_many(flows, CONN_SEED)[0] & np.uint32(sets - 1)


def conn_tag_many(flows: Flows) -> U64:
    """`conn_tag` of every flow."""
    _, b, a = conn_hash3_many(flows, CONN_SEED)
    hi, lo = b.astype(np.uint64), a.astype(np.uint64)
    return (hi << np.uint64(32)) | lo | np.uint64(CONN_TAG_SET)


def vip_filter_bit(family: int, raw: bytes) -> int:
    """The bit of an address in the VIP address filter (balancer.c `lb_maybe_vip`): the xor of
    the four words of `__be32 addr[4]` (16 bytes from keys.addr16) and the family, times
    VIP_FILTER_MULT, top VIP_FILTER_LOG2 bits."""
    w = struct.unpack("<4I", raw)
    h: int = ((w[0] ^ w[1] ^ w[2] ^ w[3] ^ family) * VIP_FILTER_MULT) & _M
    return h >> (32 - VIP_FILTER_LOG2)
