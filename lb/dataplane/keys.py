"""How addresses, families and protocols sit in the maps' keys and values (xdp/common/structs.h).

Every address field is `__be32 addr[4]`: 16 bytes in network order, an IPv4 address in the
first word and zeros after it. The family travels beside it as FAMILY_V4 / FAMILY_V6 (the
C constants, not AF_*), the protocol as its IP number. These helpers are the only place that
packs and unpacks them; everything else passes `ipaddress` objects or the 16 raw bytes.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from typing import Any

from lb.consts import FAMILY_V4, FAMILY_V6

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: IP protocol numbers of the protocols a VIP can carry, by the name the API uses.
PROTO_NUMBERS: dict[str, int] = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
#: The API's protocol name of each IP protocol number.
PROTO_NAMES: dict[int, str] = {n: p for p, n in PROTO_NUMBERS.items()}

ADDR_BYTES = 16


def proto_number(proto: str | int) -> int:
    """A protocol's IP number, from its name ("tcp") or already a number."""
    return PROTO_NUMBERS[proto] if isinstance(proto, str) else proto


def proto_name(number: int) -> str:
    """The API's name of an IP protocol number (the number itself when it has none)."""
    return PROTO_NAMES.get(number, str(number))


def family_of(addr: IPAddress) -> int:
    """FAMILY_V4 or FAMILY_V6, as the maps' keys hold it."""
    return FAMILY_V4 if addr.version == 4 else FAMILY_V6


def socket_family(address: str | IPAddress) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for an address (text or object), to open a socket to it."""
    version = ipaddress.ip_address(address).version
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def addr16(addr: IPAddress) -> bytes:
    """The 16 bytes of `__be32 addr[4]` for an address (IPv4 in the first word)."""
    return addr.packed.ljust(ADDR_BYTES, b"\0")


def addr_from16(raw: bytes, family: int) -> IPAddress:
    """The address 16 bytes of `__be32 addr[4]` hold, read as `family`."""
    if family == FAMILY_V4:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw[:ADDR_BYTES])


def set_addr(field: Any, addr: IPAddress) -> None:
    """Store an address in a ctypes `__be32 addr[4]` field."""
    ctypes.memmove(ctypes.addressof(field), addr16(addr), ADDR_BYTES)


def get_addr(field: Any, family: int) -> IPAddress:
    """Read an address back from a ctypes `__be32 addr[4]` field."""
    return addr_from16(ctypes.string_at(ctypes.addressof(field), ADDR_BYTES), family)


def raw_addr(field: Any) -> bytes:
    """The 16 raw bytes of a ctypes `__be32 addr[4]` field."""
    return ctypes.string_at(ctypes.addressof(field), ADDR_BYTES)


def set_raw_addr(field: Any, raw: bytes) -> None:
    """Store 16 raw bytes in a ctypes `__be32 addr[4]` field."""
    ctypes.memmove(ctypes.addressof(field), raw, ADDR_BYTES)


def put_field(value: Any, field: str, raw: bytes) -> None:
    """Copy exactly a field's size of bytes into one field of a ctypes struct value."""
    desc = getattr(type(value), field)
    if len(raw) != desc.size:
        raise ValueError(f"{type(value).__name__}.{field} is {desc.size} bytes, got {len(raw)}")
    ctypes.memmove(ctypes.addressof(value) + desc.offset, raw, desc.size)


def get_field(value: Any, field: str) -> bytes:
    """The raw bytes of one field of a ctypes struct value."""
    desc = getattr(type(value), field)
    return ctypes.string_at(ctypes.addressof(value) + desc.offset, desc.size)


def mac_bytes(mac: str) -> bytes:
    """`02:aa:bb:cc:dd:ee` as 6 bytes."""
    return bytes.fromhex(mac.replace(":", ""))


def mac_text(raw: bytes) -> str:
    """6 bytes as `02:aa:bb:cc:dd:ee`."""
    return ":".join(f"{b:02x}" for b in raw)
