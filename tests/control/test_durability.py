"""kill -9 at chosen instants: nothing acknowledged is lost, nothing stays half-applied.

A child process runs the control plane on pinned maps (so the maps outlive it), applies a
fixed list of changes and is killed with SIGKILL at a precise point (XLB_CRASH_AT) or from
outside. A second child restarts on the same state directory and pins; its state must be
exactly the acknowledged changes (plus the in-flight one when it was already stored), and
its maps must match that state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lb.control.facade import ControlPlane
from lb.control.store import CRASH_ENV
from tests.control import crash_child
from tests.control.conftest import StateSettings

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]


def _child(mode: str, state_dir: Path, pin_dir: Path, crash_at: str | None = None,
           ) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen(
        [sys.executable, "-m", "tests.control.crash_child", mode, str(state_dir), str(pin_dir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _killed_output(p: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of a child's stdout and its stderr once it was killed from outside.

    Read through the same buffered reader that `readline()` used: `communicate()` reads the
    pipe's descriptor itself and would skip the lines that reader had already taken from
    the pipe and not yet returned (under load, several ACKs arrive in one read), so the
    test would see fewer acknowledgements than the child made.
    """
    assert p.stdout is not None and p.stderr is not None
    with p.stdout, p.stderr:
        rest = p.stdout.read()
        err = p.stderr.read()
    p.wait(timeout=30)
    return rest, err


def _acked(out: str) -> tuple[int, int]:
    """(last acknowledged change, last change begun)."""
    acked = begun = 0
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word == "ACK":
            k, gen = map(int, rest.split())
            assert gen == k, f"change {k} acknowledged at generation {gen}"
            acked = k
        elif word == "BEGIN":
            begun = int(rest)
    return acked, begun


def _expected_state(tmp: Path, upto: int) -> list[dict[str, Any]]:
    cp = ControlPlane(StateSettings(tmp / f"expected{upto}"), None, config=crash_child.CONFIG)
    for op in crash_child.OPS[:upto]:
        op(cp)
    vips = cp.get_state().model_dump(mode="json")["vips"]
    cp.close()
    return list(vips)


def _restart(state_dir: Path, pin_dir: Path) -> dict[str, Any]:
    p = _child("check", state_dir, pin_dir)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("crash_at", "stored"),
    [
        ("store-before-commit:6", False),  # dies inside the transaction: change 6 not stored
        ("after-store:6", True),  # stored, maps untouched, never acknowledged
        ("reconcile-write:17", True),  # dies between two map writes of a change
    ],
    ids=["in-transaction", "between-store-and-ack", "mid-reconcile"],
)
def test_sigkill_loses_nothing_acknowledged(
    crash_at: str, stored: bool, tmp_path: Path, pin_dir: Path
) -> None:
    state_dir = tmp_path / "state"
    p = _child("run", state_dir, pin_dir, crash_at)
    out, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, f"child was not killed: {p.returncode} {err}"
    acked, begun = _acked(out)
    assert begun == acked + 1, "the kill did not land inside a change"

    after = _restart(state_dir, pin_dir)
    assert after["drifts"] == [] and after["in_sync"], "maps do not match the state"
    expect = acked + 1 if stored else acked
    assert after["generation"] == expect
    assert after["state"]["vips"] == _expected_state(tmp_path, expect)


def test_sigkill_from_outside_at_any_instant(tmp_path: Path, pin_dir: Path) -> None:
    state_dir = tmp_path / "state"
    p = _child("run", state_dir, pin_dir)
    assert p.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        lines.append(line)
        if line.startswith("ACK 8 ") or not line:
            break
    os.kill(p.pid, signal.SIGKILL)
    rest, _ = _killed_output(p)
    acked, _ = _acked("".join(lines) + rest)
    assert acked >= 8

    after = _restart(state_dir, pin_dir)
    assert after["drifts"] == [] and after["in_sync"]
    assert after["generation"] in (acked, acked + 1) and after["generation"] >= acked
    assert after["state"]["vips"] == _expected_state(tmp_path, after["generation"])


def _group_acks(out: str) -> tuple[dict[int, int], dict[int, int], list[int]]:
    """(last acknowledged change per writer, last begun per writer, changes per write)."""
    acked: dict[int, int] = dict.fromkeys(range(crash_child.GROUP_WRITERS), 0)
    begun = dict(acked)
    writes: list[int] = []
    for line in out.splitlines():
        word, *rest = line.split()
        if word in ("ACK", "BEGIN"):
            t, k = map(int, rest)
            book = acked if word == "ACK" else begun
            assert k == book[t] + 1, f"writer {t}: {word} {k} out of order"
            book[t] = k
        elif word == "WRITE":
            before, after = map(int, rest)
            writes.append(after - before)
    return acked, begun, writes


@pytest.mark.parametrize(
    "crash_at",
    [None, "store-before-commit:8", "after-store:8", "reconcile-write:40"],
    ids=["from-outside", "in-transaction", "between-store-and-ack", "mid-reconcile"],
)
def test_sigkill_during_group_commit_loses_nothing_acknowledged(
    crash_at: str | None, tmp_path: Path, pin_dir: Path
) -> None:
    state_dir = tmp_path / "state"
    p = _child("group", state_dir, pin_dir, crash_at)
    assert p.stdout is not None
    lines: list[str] = []
    if crash_at is None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            lines.append(line)
            if not line or sum(x.startswith("ACK ") for x in lines) >= 60:
                break
        os.kill(p.pid, signal.SIGKILL)
        rest, err = _killed_output(p)
    else:
        rest, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, f"child was not killed: {p.returncode} {err}"
    acked, begun, writes = _group_acks("".join(lines) + rest)
    assert max(writes, default=0) > 1, f"no group of several changes was written: {writes}"

    after = _restart(state_dir, pin_dir)
    assert after["drifts"] == [] and after["in_sync"], "maps do not match the state"
    stored: dict[int, int] = {}
    for v in after["state"]["vips"]:
        t = v["port"] - crash_child.GROUP_PORT
        stored[t] = v["backends"][0]["weight"] - 1  # the k-th change set weight k + 1
    for t in range(crash_child.GROUP_WRITERS):
        # Every acknowledged change is there; at most the one in flight besides.
        assert acked[t] <= stored[t] <= begun[t] <= acked[t] + 1, (t, acked, stored, begun)
    # One generation per stored change, none skipped: the setup, then each writer's changes.
    assert after["generation"] == 1 + sum(stored.values())


@pytest.mark.parametrize("mode", ["purge-delete", "purge-swap"])
def test_sigkill_before_a_purge_leaves_no_stale_conn_slot_after_a_restart(
    mode: str, tmp_path: Path, pin_dir: Path
) -> None:
    state_dir = tmp_path / "state"
    p = _child(mode, state_dir, pin_dir, "before-purge")
    out, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, f"child was not killed: {p.returncode} {err}"
    said = {w[0]: [int(x) for x in w[1:]] for w in map(str.split, out.splitlines())}
    assert "DONE" not in said, "the kill did not land before the purge"
    stale_num, stale_idx = said["STALE"]  # stale_idx -1: the index stays in use

    after = _restart(state_dir, pin_dir)
    assert after["drifts"] == [] and after["in_sync"], "maps do not match the state"
    conns = after["conns"]
    assert not [c for c in conns if c[0] == stale_num or c[1] == stale_idx], (
        f"slots of a freed number or index survived the restart: {conns}")
    assert conns == [said["KEEP"]], "the restart freed slots still in use"
