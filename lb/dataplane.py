"""Compile and load the XDP programs with BCC and hand out their maps.

This is one of the few modules that imports `bcc`. Map key/value types are the ctypes
classes BCC generates from xdp/structs.h (`table.Key`, `table.Leaf`): Python never keeps a
hand-written copy of a C layout.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lb.config import DataplaneConfig, xdp_source_dir
from lb.consts import FAMILY_V4, FAMILY_V6
from lb.errors import BccUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAP_NAMES = (
    "vip_map",
    "vip_addrs",
    "reals",
    "ch_rings",
    "conn_table",
    "lb_cfg",
    "vip_stats",
    "real_stats",
    "glob_stats",
)

PROTO_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def _bcc() -> Any:
    try:
        import bcc
    except ImportError as e:  # pragma: no cover - depends on the host
        raise BccUnavailable(
            "BCC's Python module is missing: run scripts/setup.sh (Debian package python3-bpfcc)"
        ) from e
    return bcc


def compile_program(
    source: str, cflags: list[str], *, pin_dir: Path | None = None
) -> Any:
    """Compile an xdp/ source file with BCC; returns the `bcc.BPF` object."""
    bcc = _bcc()
    src_dir = xdp_source_dir()
    flags = [f"-I{src_dir}", *cflags]
    if pin_dir is not None:
        pin_dir.mkdir(parents=True, exist_ok=True)
        flags.append(f'-DPIN_DIR="{pin_dir}"')
    try:
        return bcc.BPF(src_file=str(src_dir / source).encode(), cflags=flags)
    except Exception as e:
        raise BccUnavailable(f"BCC could not compile xdp/{source}: {e}") from e


def set_addr(field: Any, addr: IPAddress) -> None:
    """Store an address in a `__be32 addr[4]` field, network order, IPv4 in word 0."""
    raw = addr.packed.ljust(16, b"\0")
    ctypes.memmove(ctypes.addressof(field), raw, 16)


def get_addr(field: Any, family: int) -> IPAddress:
    """Read an address back from a `__be32 addr[4]` field."""
    raw = ctypes.string_at(ctypes.addressof(field), 16)
    if family == FAMILY_V4:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


def family_of(addr: IPAddress) -> int:
    """FAMILY_V4 or FAMILY_V6, as stored in keys."""
    return FAMILY_V4 if addr.version == 4 else FAMILY_V6


class Balancer:
    """The loaded balancer program and its maps."""

    PROGRAM = "xdp_balancer"

    def __init__(self, config: DataplaneConfig, *, pin_dir: Path | None = None) -> None:
        self.config = config
        self.pin_dir = pin_dir
        self.bpf = compile_program("balancer.c", config.cflags(), pin_dir=pin_dir)
        self.fn = self.bpf.load_func(self.PROGRAM.encode(), self.bpf.XDP)
        self.maps: dict[str, Any] = {name: self.bpf[name.encode()] for name in MAP_NAMES}

    @property
    def prog_fd(self) -> int:
        """File descriptor of the loaded XDP program."""
        return int(self.fn.fd)

    def __getattr__(self, name: str) -> Any:
        # Typed access by C map name: balancer.vip_map, balancer.ch_rings, ...
        maps = self.__dict__.get("maps")
        if maps is not None and name in maps:
            return maps[name]
        raise AttributeError(name)

    def vip_key(self, addr: IPAddress, port: int, proto: str | int) -> Any:
        """Build a vip_map key."""
        k = self.vip_map.Key()
        set_addr(k.addr, addr)
        k.port = socket.htons(port)
        k.proto = PROTO_NUMBERS[proto] if isinstance(proto, str) else proto
        k.family = family_of(addr)
        return k

    def vip_addr_key(self, addr: IPAddress) -> Any:
        """Build a vip_addrs key."""
        k = self.vip_addrs.Key()
        set_addr(k.addr, addr)
        k.family = family_of(addr)
        return k

    def close(self) -> None:
        """Release the program and the process's map fds (pinned maps stay pinned)."""
        self.bpf.cleanup()


@contextmanager
def loaded_balancer(
    config: DataplaneConfig, *, pin_dir: Path | None = None
) -> Iterator[Balancer]:
    """Load the balancer for the duration of a `with` block."""
    b = Balancer(config, pin_dir=pin_dir)
    try:
        yield b
    finally:
        b.close()
