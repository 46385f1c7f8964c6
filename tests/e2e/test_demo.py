"""`make demo` (python -m lb.demo_lab) runs to the end and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lb import lab as labmod
from tests.e2e.conftest import REPO, forwarding_missing

pytestmark = [pytest.mark.netns, pytest.mark.bpf, pytest.mark.slow]


def test_demo_runs_end_to_end_and_cleans_up(test_prefix: str) -> None:
    """Every step succeeds (exit 0) and the lab is gone afterwards."""
    why = forwarding_missing()
    if why:
        pytest.skip(why)
    prefix = f"{test_prefix}d"
    try:
        res = subprocess.run(
            [sys.executable, "-m", "lb.demo_lab", "--prefix", prefix],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
    finally:
        leftovers = labmod.down(prefix)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "0 failed" in res.stdout
    assert "demo finished" in res.stdout
    assert not leftovers, f"the demo left {leftovers}"
