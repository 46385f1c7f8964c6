"""lb.dataplane.rawmap: a map known only by its pin, written and read as bytes (the bench's
reference programs are loaded by bpftool, not BCC)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lb.dataplane.rawmap import RawMap

pytestmark = pytest.mark.bpf


def test_a_pinned_map_takes_updates_batches_and_lookups(pin_dir: Path) -> None:
    if shutil.which("bpftool") is None:
        pytest.skip("bpftool is not installed (scripts/setup.sh installs it)")
    pin_dir.mkdir(parents=True)
    path = pin_dir / "raw"
    subprocess.run(["bpftool", "map", "create", str(path), "type", "hash", "key", "4",
                    "value", "8", "entries", "64", "name", "raw"], check=True)
    with RawMap.pinned(path) as m:
        assert m.max_entries() == 64
        m.update((7).to_bytes(4, "little"), (42).to_bytes(8, "little"))
        assert m.lookup((7).to_bytes(4, "little"), 8) == (42).to_bytes(8, "little")
        keys = b"".join(i.to_bytes(4, "little") for i in range(10, 40))
        vals = b"".join((i * 3).to_bytes(8, "little") for i in range(10, 40))
        m.update_batch(keys, vals, 30, chunk=7)
        assert [int.from_bytes(m.lookup(i.to_bytes(4, "little"), 8), "little")
                for i in (10, 23, 39)] == [30, 69, 117], "a batch chunk was lost"
    assert m.fd == -1, "the context manager did not close the fd"
