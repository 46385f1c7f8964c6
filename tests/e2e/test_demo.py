"""`make demo` (python -m lb.lab.demo) runs to the end and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lb.lab import network as labmod
from tests.e2e.conftest import REPO

pytestmark = [pytest.mark.netns, pytest.mark.bpf, pytest.mark.slow]


def test_demo_runs_end_to_end_and_cleans_up(test_prefix: str) -> None:
    """Every step succeeds (exit 0) and the lab is gone afterwards."""
    prefix = f"{test_prefix}d"
    try:
        res = subprocess.run(
            [sys.executable, "-m", "lb.lab.demo", "--prefix", prefix],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
    finally:
        leftovers = labmod.down(prefix)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "0 failed" in res.stdout
    assert "demo finished" in res.stdout
    assert not leftovers, f"the demo left {leftovers}"
