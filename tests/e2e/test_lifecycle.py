"""Changes under traffic: removing and draining a backend, a daemon crash, a program upgrade.

Long-lived TCP streams echo a message every 50 ms; a stream that is reset, closed or silent
for 3 s records an error. Short HTTP connections run alongside where the test says so.
"""

from __future__ import annotations

import threading
import time

import pytest

from lb.client import vip_path
from lb.dataplane import netlink
from lb.lab import network as labmod
from lb.lab.network import Lab, LabApi, Stream, Tally
from tests.e2e.conftest import Vips

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

PER_BACKEND = 4
MAX_STREAMS = 80
# Echoes each surviving stream must add while the change settles (one every 50 ms).
PROGRESS = 5


def _open_spread(lab: Lab, vip: str, made: list[Stream]) -> dict[str, list[Stream]]:
    """Open streams until every backend holds PER_BACKEND of them."""
    by: dict[str, list[Stream]] = {f"b{i}": [] for i in lab.backend_ids}
    while any(len(v) < PER_BACKEND for v in by.values()):
        counts = {k: len(v) for k, v in by.items()}
        assert len(made) < MAX_STREAMS, f"streams do not reach every backend: {counts}"
        s = Stream(lab, vip)
        made.append(s)
        by.setdefault(s.backend, []).append(s)
    return by


def _settle_and_check(streams: list[Stream], what: str) -> None:
    """Let the streams run on and assert each one is alive and made progress."""
    before = {id(s): s.echoes for s in streams}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(s.echoes - before[id(s)] >= PROGRESS or not s.alive for s in streams):
            break
        time.sleep(0.1)
    broken = [f"{s.backend}: {s.error}" for s in streams if not s.alive]
    assert not broken, f"streams broke {what}: {broken}"
    stalled = [s.backend for s in streams if s.echoes - before[id(s)] < PROGRESS]
    assert not stalled, f"streams stalled {what}: {stalled}"


def _stream_vip(lab: Lab, vips: Vips) -> str:
    return vips.create("tcp", lab.vip4, labmod.STREAM_PORT,
                       [(lab.backend4(i), 1) for i in lab.backend_ids])


def test_removing_a_backend_keeps_other_streams_and_moves_new_flows(
    lab: Lab, api: LabApi, vips: Vips, streams: list[Stream]
) -> None:
    """Streams to the other backends see no reset and no stall; new flows avoid the removed."""
    vid = _stream_vip(lab, vips)
    by = _open_spread(lab, lab.vip4, streams)
    api.delete(f"{vip_path(vid)}/backends/{lab.backend4(2)}")
    others = [s for name, ss in by.items() if name != "b2" for s in ss]
    _settle_and_check(others, "after removing b2")
    fresh = [Stream(lab, lab.vip4) for _ in range(30)]
    streams.extend(fresh)
    assert "b2" not in {s.backend for s in fresh}, "a new flow went to the removed backend"


def test_draining_backend_keeps_its_streams_and_gets_no_new_flows(
    lab: Lab, api: LabApi, vips: Vips, streams: list[Stream]
) -> None:
    """A draining backend keeps its streams until they end; new ones go elsewhere."""
    vid = _stream_vip(lab, vips)
    by = _open_spread(lab, lab.vip4, streams)
    api.patch(f"{vip_path(vid)}/backends/{lab.backend4(3)}", {"state": "draining"})
    _settle_and_check(streams, "while b3 drains")
    fresh = [Stream(lab, lab.vip4) for _ in range(30)]
    streams.extend(fresh)
    assert "b3" not in {s.backend for s in fresh}, "a new flow went to the draining backend"
    # The draining backend's streams end normally, by the client's choice.
    for s in by["b3"]:
        assert s.alive
        s.close()
        assert s.error is None, f"stream to the draining backend ended badly: {s.error}"


class _HttpLoad:
    """HTTP connections through a VIP in a background thread until stopped."""

    def __init__(self, lab: Lab, vip: str) -> None:
        self.tally = Tally()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(lab, vip), daemon=True)
        self._t.start()

    def _run(self, lab: Lab, vip: str) -> None:
        while not self._stop.is_set():
            self.tally.merge(labmod.http_requests(lab, vip, 20, workers=2))
            self._stop.wait(0.02)

    def stop(self) -> Tally:
        self._stop.set()
        self._t.join(timeout=30)
        return self.tally


def _lb_prog_id(lab: Lab) -> int | None:
    return netlink.link_info(lab.lb_ns, labmod.LB_IF).xdp_prog_id


@pytest.mark.slow
def test_daemon_killed_under_traffic_breaks_nothing_and_keeps_state(
    lab: Lab, api: LabApi, vips: Vips, streams: list[Stream]
) -> None:
    """SIGKILL the daemon under traffic and start it again: no connection breaks, and the
    state afterwards is the state before."""
    _stream_vip(lab, vips)
    vips.create("tcp", lab.vip4, labmod.HTTP_PORT,
                [(lab.backend4(i), i) for i in lab.backend_ids])
    vips.create("udp", lab.vip6, labmod.UDP_PORT, [(lab.backend6(i), 1) for i in lab.backend_ids])
    _open_spread(lab, lab.vip4, streams)
    before = api.get("/v1/state")
    load = _HttpLoad(lab, lab.vip4)
    try:
        assert labmod.stop_daemon(lab, kill=True)
        # The data plane forwards on its own while no control plane runs.
        _settle_and_check(streams, "while the daemon is dead")
        labmod.start_daemon(lab)
        _settle_and_check(streams, "after the daemon restarted")
    finally:
        tally = load.stop()
    assert tally.total > 0 and not tally.failures, f"HTTP during the crash: {tally}"
    after = api.get("/v1/state")
    assert after == before, "the state after the restart differs from the state before"
    udp = labmod.udp_requests(lab, lab.vip6, 200)
    assert not udp.failures and len(udp.per_backend) == lab.backends


@pytest.mark.slow
def test_program_replaced_under_traffic_breaks_nothing(
    lab: Lab, api: LabApi, vips: Vips, streams: list[Stream]
) -> None:
    """A new build of the data plane (graceful restart with other features) replaces the
    running program atomically: the interface never lacks a program, no connection breaks."""
    _stream_vip(lab, vips)
    vips.create("tcp", lab.vip4, labmod.HTTP_PORT,
                [(lab.backend4(i), 1) for i in lab.backend_ids])
    _open_spread(lab, lab.vip4, streams)
    old_id = _lb_prog_id(lab)
    assert old_id is not None
    seen: set[int | None] = set()
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            seen.add(_lb_prog_id(lab))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    load = _HttpLoad(lab, lab.vip4)
    try:
        labmod.stop_daemon(lab)
        labmod.start_daemon(lab, extra_toml="\n[dataplane.features]\nicmp_echo = false\n")
        upgraded_id = _lb_prog_id(lab)
        _settle_and_check(streams, "after the program was replaced")
    finally:
        tally = load.stop()
        watching.set()
        watcher.join()
        # Back to the standard build for the tests that follow.
        labmod.stop_daemon(lab)
        labmod.start_daemon(lab)
    assert upgraded_id not in (None, old_id), "the program was not replaced"
    assert None not in seen, "the interface ran without a program during the upgrade"
    assert tally.total > 0 and not tally.failures, f"HTTP during the upgrade: {tally}"
