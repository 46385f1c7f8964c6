"""Maglev consistent hashing (Eisenbud et al., NSDI 2016) with proportional weights.

A VIP's ring is a table of ``ring_size`` slots (a prime, 65537 by default, like Katran); the
data plane sends a new flow to ``ring[flow_hash % ring_size]``. This module builds rings:

- Endpoints are named by a stable ``identity`` string (a backend address in canonical form,
  e.g. ``"198.18.1.2"`` or ``"2001:db8::2"``; compared code point by code point).
- Endpoints are sorted by identity first, so a ring depends only on the set of
  (identity, weight), the ring size and the seed: never on input order or history (Cilium).
- Each endpoint's preference list is a permutation of the slots: its j-th choice is
  ``(inverse[(offset + j * skip) % M] + shift) % M``, with ``inverse[x] = x**-1 mod M``
  (``inverse[0] = 0``). ``offset``, ``skip`` and ``shift`` come from three seeded 64-bit
  hashes of the identity: the little-endian thirds of a keyed BLAKE2b-192 digest (key = the
  seed as 8 little-endian bytes, person = ``PERSON``), reduced as ``offset = h1 % M``,
  ``skip = h2 % (M - 1) + 1``, ``shift = h3 % M``. Stable across processes, machines and
  Python versions (never Python's ``hash()``).
- Why not the paper's plain ``(offset + j * skip) % M`` (Katran, Cilium): two endpoints with
  the same skip (a 1 in 65536 chance per pair, so 7% of 100-endpoint pools) walk the same
  cycle of slots and trade runs of slots whenever any other endpoint changes; removing one
  of 16 endpoints then moved up to 1/16 + 3.9% of the slots (1/16 + 7% if the offsets match
  too). The inverse table breaks that link: over 3000 random pools each of 8, 16, 24, 100
  and 300 endpoints at 65537, the worst case fell from 1/N + 4.1% to 1/N + 1.0%. It costs a
  table load per try: the fill takes 1.6 ms instead of 1.1 ms for 1000 endpoints.
- Turns follow Katran's MaglevV2: every round each endpoint adds its weight to a credit and
  takes one turn per ``max weight`` of credit. Slot counts come out proportional to the
  weights without normalising them to the ring size (Katran's v1 only weighs the first
  round, katran#35): for some common ``t`` each endpoint holds ``weight * t`` slots minus
  less than ``1 + weight / max_weight``. So a weight-2 endpoint gets twice the slots of a
  weight-1 endpoint to within 1% once both hold a few hundred slots (at 65537: 43691 and
  21846); equal weights give counts that differ by at most 1.
- Weight 0 means "no new flows": the endpoint gets no slot and is left out of the ring.
- Removing one of N equal endpoints moves about 1/N of the slots, plus an excess that grows
  with N / M (measured over 300 to 3000 random pools each): at 65537 it averages 0.3% for
  N = 10, 0.6% for 100, 0.75% for 200 and 0.85 to 0.95% for 300 to 500 (worst seen 1.06%
  at 400); at 16381, 0.6% for 10 and 1.3% for 100; at 4099, 1.2% for 10. Adding one is the
  same change backwards.

Balance needs ``ring_size > 100 * endpoints`` (1% imbalance at most): with more endpoints
``build_ring`` raises ``MaglevError`` unless ``strict=False``, which only warns
(``MaglevBalanceWarning``) so benchmarks and very large pools can still build.

Speed: the fill loop, the translation to backend ids and the ring diff run in the C extension
``lb.control._maglev``: 65537 slots for 1000 endpoints in about 2.5 ms, 3.5 ms when the identities
were never hashed before (2-CPU Xeon VM; ``bench/bench_maglev.py``).
When it is missing, the pure-Python reference below runs instead (130 ms instead of 2 ms
for 100 endpoints); the tests check that both produce byte-identical rings.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

try:
    from lb.control import _maglev
except ImportError:  # pragma: no cover - the package always builds it
    _maglev = None  # type: ignore[assignment]

__all__ = [
    "ACCELERATED",
    "DEFAULT_RING_SIZE",
    "DEFAULT_SEED",
    "MAX_RING_SIZE",
    "MAX_WEIGHT",
    "NO_BACKEND",
    "PERSON",
    "SLOTS_PER_ENDPOINT",
    "Endpoint",
    "MaglevBalanceWarning",
    "MaglevError",
    "Ring",
    "build_ring",
    "changed_slots",
    "fingerprint",
    "inverse_table",
    "is_prime",
    "ring_to_values",
]

#: Katran's ring size: the smallest prime above 2**16.
DEFAULT_RING_SIZE: Final = 65537
#: Largest ring accepted: 16 Mi slots (64 MiB per VIP in the data plane).
MAX_RING_SIZE: Final = 1 << 24
#: Seed of the offset/skip hashes. Every node of a cluster must use the same one; change it
#: only to decorrelate the rings of different clusters.
DEFAULT_SEED: Final = 0
#: Highest endpoint weight. Weights are relative, so 1000 leaves room for 0.1% steps.
MAX_WEIGHT: Final = 1000
#: Slots each endpoint needs for 1% balance (Maglev paper: M > 100 * N).
SLOTS_PER_ENDPOINT: Final = 100
#: Value meaning "no backend" in the data plane's ring, whose backend indices start at 1.
NO_BACKEND: Final = 0
#: BLAKE2b personalisation of the offset/skip hash, so it never collides with other uses.
PERSON: Final = b"xlb-maglev-v1"

#: True when the C extension is loaded (it always is in an installed package).
ACCELERATED: Final = _maglev is not None

_U32_MAX: Final = 0xFFFFFFFF

if array("I").itemsize != 4:  # pragma: no cover - true on every platform CPython supports
    raise ImportError("lb.control.maglev needs array('I') to hold 32-bit items")


class MaglevError(ValueError):
    """A ring cannot be built from these endpoints or parameters."""


class MaglevBalanceWarning(UserWarning):
    """A ring has fewer than ``SLOTS_PER_ENDPOINT`` slots per endpoint (imbalance over 1%)."""


@dataclass(frozen=True)
class Endpoint:
    """One backend of a ring: a stable identity and a weight in 0..MAX_WEIGHT."""

    identity: str
    weight: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.identity, str) or not self.identity or "\0" in self.identity:
            raise MaglevError(
                f"endpoint identity must be a non-empty string without NUL; got {self.identity!r}"
            )
        if (
            not isinstance(self.weight, int)
            or isinstance(self.weight, bool)
            or not 0 <= self.weight <= MAX_WEIGHT
        ):
            raise MaglevError(
                f"endpoint {self.identity!r}: weight must be an integer in 0..{MAX_WEIGHT}; "
                f"got {self.weight!r}"
            )


@dataclass(frozen=True)
class Ring:
    """A built ring: ``slots[k]`` indexes ``endpoints``, the sorted identities of weight > 0.

    An empty ring (no endpoint of weight > 0) has no slots: every flow finds no backend.
    ``slots`` is shared, never mutate it.
    """

    size: int
    seed: int
    endpoints: tuple[str, ...]
    slots: array[int]

    @property
    def empty(self) -> bool:
        """True when no endpoint takes new flows."""
        return not self.endpoints

    def lookup(self, flow_hash: int) -> str | None:
        """Identity a flow with this hash goes to, as the data plane picks it (or None)."""
        if not self.endpoints:
            return None
        return self.endpoints[self.slots[flow_hash % self.size]]

    def slot_counts(self) -> dict[str, int]:
        """Number of slots each endpoint holds."""
        counts = [0] * len(self.endpoints)
        for index in self.slots:
            counts[index] += 1
        return dict(zip(self.endpoints, counts, strict=True))

    def fingerprint(self) -> str:
        """SHA-256 hex of the size, the endpoint identities and the slots.

        Two rings with the same fingerprint send every flow to the same identity. The
        encoding is the size as 4 little-endian bytes, each identity in UTF-8 followed by a
        NUL, one more NUL, then the slots as little-endian uint32.
        """
        h = hashlib.sha256(self.size.to_bytes(4, "little"))
        for identity in self.endpoints:
            h.update(identity.encode() + b"\0")
        h.update(b"\0")
        h.update(_le_bytes(self.slots))
        return h.hexdigest()


def is_prime(n: int) -> bool:
    """Deterministic primality test (Miller-Rabin with the first 12 prime bases, exact below
    3.3e24)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in bases:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@lru_cache(maxsize=16)
def _keyed_blake2b(seed: int) -> hashlib.blake2b:
    # Copying a keyed state is cheaper than keying a new one (0.5 vs 0.75 us per identity).
    return hashlib.blake2b(digest_size=24, key=seed.to_bytes(8, "little"), person=PERSON)


@lru_cache(maxsize=1 << 16)
def _hashes(identity: str, seed: int) -> tuple[int, int, int]:
    """The three seeded 64-bit hashes of an identity (offset, skip, shift before reduction)."""
    h = _keyed_blake2b(seed).copy()
    h.update(identity.encode())
    digest = h.digest()
    return (
        int.from_bytes(digest[:8], "little"),
        int.from_bytes(digest[8:16], "little"),
        int.from_bytes(digest[16:], "little"),
    )


@lru_cache(maxsize=8)
def inverse_table(ring_size: int) -> array[int]:
    """``x**-1 mod ring_size`` for each x (0 for 0): the non-linear step of every permutation.

    Cached per size; never mutate the result. ``ring_size`` must be a prime.
    """
    if _maglev is not None:
        table = array("I")
        table.frombytes(_maglev.inverses(ring_size))
        return table
    return inverse_table_reference(ring_size)


def inverse_table_reference(ring_size: int) -> array[int]:
    """Pure-Python ``inverse_table``: ``x**-1 = -(M // x) * (M % x)**-1 mod M``."""
    inverse = array("I", [0, 1]) + array("I", [0]) * (ring_size - 2)
    for x in range(2, ring_size):
        inverse[x] = (ring_size - ring_size // x) * inverse[ring_size % x] % ring_size
    return inverse


def _check_ring_size(ring_size: int) -> None:
    if not isinstance(ring_size, int) or isinstance(ring_size, bool):
        raise MaglevError(f"ring size must be an integer; got {ring_size!r}")
    if not 2 <= ring_size <= MAX_RING_SIZE:
        raise MaglevError(f"ring size must be in 2..{MAX_RING_SIZE}; got {ring_size}")
    if not is_prime(ring_size):
        raise MaglevError(f"ring size must be a prime (e.g. 65537); got {ring_size}")


def _check_balance(ring_size: int, count: int, strict: bool) -> None:
    limit = ring_size // SLOTS_PER_ENDPOINT
    if count <= limit:
        return
    if count > ring_size:
        raise MaglevError(f"ring size {ring_size} cannot hold {count} backends")
    message = (
        f"ring size {ring_size} needs at most {limit} backends ({SLOTS_PER_ENDPOINT} slots "
        f"each) for 1% balance; got {count}"
    )
    if strict:
        raise MaglevError(message)
    warnings.warn(message, MaglevBalanceWarning, stacklevel=3)


def build_ring(
    endpoints: Iterable[Endpoint],
    ring_size: int = DEFAULT_RING_SIZE,
    *,
    seed: int = DEFAULT_SEED,
    strict: bool = True,
    accelerated: bool = True,
) -> Ring:
    """Build the Maglev ring of these endpoints.

    Raises ``MaglevError`` for a non-prime or out-of-range ring size, a seed outside
    0..2**64-1, a duplicate identity, or more than ``ring_size // 100`` endpoints of weight
    > 0 (1% balance); ``strict=False`` turns the last one into a ``MaglevBalanceWarning``.
    ``accelerated=False`` forces the pure-Python reference (for tests).
    """
    _check_ring_size(ring_size)
    if not isinstance(seed, int) or not 0 <= seed <= 0xFFFFFFFFFFFFFFFF:
        raise MaglevError(f"seed must be an integer in 0..2**64-1; got {seed!r}")
    by_identity: dict[str, Endpoint] = {}
    for endpoint in endpoints:
        if not isinstance(endpoint, Endpoint):
            raise MaglevError(f"expected an Endpoint; got {endpoint!r}")
        if endpoint.identity in by_identity:
            raise MaglevError(f"duplicate endpoint identity {endpoint.identity!r}")
        by_identity[endpoint.identity] = endpoint
    active = sorted(e.identity for e in by_identity.values() if e.weight > 0)
    if not active:
        return Ring(ring_size, seed, (), array("I"))
    _check_balance(ring_size, len(active), strict)

    offsets, skips, shifts = array("I"), array("I"), array("I")
    for identity in active:
        h1, h2, h3 = _hashes(identity, seed)
        offsets.append(h1 % ring_size)
        skips.append(h2 % (ring_size - 1) + 1)
        shifts.append(h3 % ring_size)
    weights = array("I", [by_identity[i].weight for i in active])
    inverse = inverse_table(ring_size)
    if accelerated and _maglev is not None:
        slots = array("I")
        slots.frombytes(_maglev.populate(offsets, skips, shifts, weights, inverse))
    else:
        slots = populate_reference(offsets, skips, shifts, weights, inverse)
    return Ring(ring_size, seed, tuple(active), slots)


def populate_reference(
    offsets: Sequence[int],
    skips: Sequence[int],
    shifts: Sequence[int],
    weights: Sequence[int],
    inverse: Sequence[int],
) -> array[int]:
    """Pure-Python ring fill (Katran's MaglevV2 loop), the reference for ``lb.control._maglev``.

    Fills ``len(inverse)`` slots with endpoint indices; see the module docstring.
    """
    ring_size = len(inverse)
    n = len(offsets)
    max_weight = max(weights)
    ring = array("I", [0]) * ring_size
    taken = bytearray(ring_size)
    position = [0] * n
    credit = [0] * n
    filled = 0
    while True:
        for i in range(n):
            credit[i] += weights[i]
            if credit[i] < max_weight:
                continue
            credit[i] -= max_weight
            while True:
                choice = (offsets[i] + position[i] * skips[i]) % ring_size
                slot = (inverse[choice] + shifts[i]) % ring_size
                position[i] += 1
                if not taken[slot]:
                    break
            taken[slot] = 1
            ring[slot] = i
            filled += 1
            if filled == ring_size:
                return ring


def ring_to_values(ring: Ring, index_of: Mapping[str, int]) -> array[int]:
    """The ring as the data plane stores it: ``index_of[identity]`` per slot.

    An empty ring gives ``ring.size`` times ``NO_BACKEND`` (0), so indices in ``index_of``
    must be in 1..2**32-1. 65537 slots take about 0.1 ms with the C extension.
    """
    if not ring.endpoints:
        return array("I", [NO_BACKEND]) * ring.size
    table = array("I")
    for identity in ring.endpoints:
        try:
            value = index_of[identity]
        except KeyError:
            raise MaglevError(f"no backend index for endpoint {identity!r}") from None
        if not 1 <= value <= _U32_MAX:
            raise MaglevError(
                f"endpoint {identity!r}: backend index must be in 1..{_U32_MAX} "
                f"({NO_BACKEND} means no backend); got {value}"
            )
        table.append(value)
    if _maglev is not None:
        values = array("I")
        values.frombytes(_maglev.translate(ring.slots, table))
        return values
    return array("I", map(table.__getitem__, ring.slots))


def changed_slots(old: Sequence[int], new: Sequence[int]) -> list[int]:
    """Positions where two rings of values differ, to write only those slots.

    Both must have the same length. About 0.05 ms for 65537 slots with the C extension when
    1% of them changed (``array('I')`` inputs avoid a conversion).
    """
    if len(old) != len(new):
        raise MaglevError(f"rings differ in size: {len(old)} and {len(new)} slots")
    if _maglev is not None:
        return _maglev.changed(_as_u32(old), _as_u32(new))
    return [k for k, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]


def fingerprint(values: Sequence[int] | Ring) -> str:
    """SHA-256 hex of ring values as little-endian uint32 (a ``Ring`` uses ``Ring.fingerprint``).

    Lets a caller compare the values it wrote with what it reads back from the data plane.
    """
    if isinstance(values, Ring):
        return values.fingerprint()
    return hashlib.sha256(_le_bytes(_as_u32(values))).hexdigest()


def _as_u32(values: Sequence[int]) -> array[int]:
    if isinstance(values, array) and values.typecode == "I":
        return values
    return array("I", values)


def _le_bytes(values: array[int]) -> bytes:
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array("I", values)  # pragma: no cover - big-endian hosts only
    swapped.byteswap()  # pragma: no cover
    return swapped.tobytes()  # pragma: no cover
