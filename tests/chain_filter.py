"""The example chain filter (xdp/examples/drop_source.c) built with clang and loaded and
pinned with bpftool, the way docs/chain.md tells an operator to, for the chain tests."""

from __future__ import annotations

import ipaddress
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lb.config import xdp_source_dir
from lb.dataplane.chain import CHAIN_MAP
from lb.dataplane.rawmap import RawMap

SOURCE = xdp_source_dir() / "examples" / "drop_source.c"


def build(out: Path, slot: int = 0) -> Path:
    """Compile drop_source.c for `slot` into `out` (an ELF object)."""
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{platform.machine()}-linux-gnu",
         f"-I{xdp_source_dir()}", f"-DCHAIN_SLOT={slot}", "-c", str(SOURCE), "-o", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class Filter:
    """A loaded, pinned drop_source program and the pin of its drop_src map."""

    prog: Path
    maps: Path

    def drop(self, *sources: str) -> None:
        """List IPv4 sources to drop."""
        with RawMap.pinned(self.maps / "drop_src") as m:
            for src in sources:
                m.update(ipaddress.IPv4Address(src).packed, bytes(8))

    def dropped(self, source: str) -> int:
        """Packets dropped from `source`."""
        with RawMap.pinned(self.maps / "drop_src") as m:
            return int.from_bytes(m.lookup(ipaddress.IPv4Address(source).packed, 8), "little")

    def unpin(self) -> None:
        """Remove the operator's pins (xlb keeps its own pin of what the chain runs)."""
        self.prog.unlink(missing_ok=True)
        shutil.rmtree(self.maps, ignore_errors=True)


def load(obj: Path, prog_pin: Path, xlb_pin_dir: Path) -> Filter:
    """`bpftool prog load` of `obj` at `prog_pin`, reusing xlb's pinned xdp_chain."""
    maps = prog_pin.with_name(prog_pin.name + "_maps")
    subprocess.run(
        ["bpftool", "prog", "load", str(obj), str(prog_pin), "type", "xdp",
         "map", "name", CHAIN_MAP, "pinned", str(xlb_pin_dir / CHAIN_MAP),
         "pinmaps", str(maps)],
        check=True, capture_output=True, text=True, env={**os.environ, "LANG": "C"},
    )  # fmt: skip
    return Filter(prog_pin, maps)
