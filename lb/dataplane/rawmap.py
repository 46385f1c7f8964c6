"""Maps known only by a pin or an fd, read and written as bytes through bpf(2).

BCC's tables cover the maps of the programs xlb compiles. A map another tool created (a
program loaded by bpftool, such as the reference balancer bench/katran/ measures xlb
against) has no BCC table: `RawMap` gives it element and batch updates and lookups on raw
bytes, laid out by the caller.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from types import TracebackType

from lb.dataplane import bpf

BPF_MAP_UPDATE_ELEM = 2


class RawMap:
    """A map fd (owned: closed by `close` or the context manager)."""

    def __init__(self, fd: int, name: str = "map") -> None:
        self.fd = fd
        self.name = name

    @classmethod
    def pinned(cls, path: Path) -> RawMap:
        """Open the map pinned at `path`."""
        return cls(bpf.obj_get(path), path.name)

    def max_entries(self) -> int:
        """The map's max_entries."""
        return bpf.map_info(self.fd).max_entries

    def update(self, key: bytes, value: bytes) -> None:
        """BPF_MAP_UPDATE_ELEM (BPF_ANY). For a per-CPU map `value` holds every CPU's value,
        each rounded up to 8 bytes."""
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value, len(value))
        a = bpf.ElemAttr(map_fd=self.fd, key=ctypes.addressof(k), value=ctypes.addressof(v))
        bpf.bpf(BPF_MAP_UPDATE_ELEM, a, f"updating {self.name}")

    def lookup(self, key: bytes, value_size: int) -> bytes:
        """BPF_MAP_LOOKUP_ELEM; `value_size` bytes (all CPUs' values for a per-CPU map)."""
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value_size)
        a = bpf.ElemAttr(map_fd=self.fd, key=ctypes.addressof(k), value=ctypes.addressof(v))
        bpf.bpf(bpf.BPF_MAP_LOOKUP_ELEM, a, f"reading {self.name}")
        return v.raw

    def update_batch(self, keys: bytes, values: bytes, count: int, chunk: int = 65536) -> None:
        """BPF_MAP_UPDATE_BATCH of `count` packed keys and values, `chunk` at a time."""
        if count == 0:
            return
        ksize, vsize = len(keys) // count, len(values) // count
        kbuf = ctypes.create_string_buffer(keys, len(keys))
        vbuf = ctypes.create_string_buffer(values, len(values))
        for i in range(0, count, chunk):
            n = min(chunk, count - i)
            a = bpf.BatchAttr(keys=ctypes.addressof(kbuf) + i * ksize,
                              values=ctypes.addressof(vbuf) + i * vsize, count=n, map_fd=self.fd)
            bpf.bpf(bpf.BPF_MAP_UPDATE_BATCH, a, f"batch update of {self.name}")

    def close(self) -> None:
        """Close the fd (the map lives on while a program or a pin holds it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RawMap:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_pinned_fd(path: Path) -> int:
    """An fd of the object (program or map) pinned at `path`; the caller closes it."""
    return bpf.obj_get(path)
