"""Second chance in the lab (issue 17 item 4, one LB host), counting broken connections.

Long-lived TCP streams through a GUE VIP with two backends; then a third backend is added
(about a third of the ring's slots move to it) and the LB's connection table is emptied, which
is what an LB host that never saw the flows holds. Every stream goes on echoing. With second
chance the new backend passes the packets it has no socket for on to the slot's previous
backend, so no stream breaks; with `second_chance: false` the streams on moved slots reach a
backend that never saw them and are reset. Both cases print "N broken of M".
"""

from __future__ import annotations

import time

import pytest

from lb.client import vip_path
from lb.dataplane import conntab, decap, mapio
from lb.lab import network as labmod
from lb.lab.network import Lab, LabApi, Stream
from tests.e2e.conftest import Vips, daemon_running

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

STREAMS = 24
# Echoes each surviving stream must add after the change (one every 50 ms).
PROGRESS = 10


def _decap_counters(lab: Lab) -> dict[str, int]:
    """The backends' decap counters (one compile, one pinned map for every backend)."""
    return mapio.pinned_counters(lab.decap_pin_dir / "decap_stats", decap.DECAP_STATS)


def _lb_counter(api: LabApi, name: str) -> int:
    """A global LB counter from /v1/stats, summed over CPUs."""
    return int(api.get("/v1/stats")["global"][name]["value"])


def _broken_after_change(lab: Lab, api: LabApi, vips: Vips, streams: list[Stream],
                         second_chance: bool) -> tuple[list[str], int]:
    """Open the streams, add b3, empty the conn table, let them echo on; returns what broke
    (backend: error, or backend: stalled) and how many conn-table slots were emptied."""
    vid = vips.create("tcp", lab.vip4, labmod.STREAM_PORT,
                      [(lab.backend4(1), 1), (lab.backend4(2), 1)],
                      encap="gue", second_chance=second_chance)
    streams.extend(labmod.open_streams(lab, lab.vip4, STREAMS))
    assert {s.backend for s in streams} == {"b1", "b2"}
    api.post(f"{vip_path(vid)}/backends", {"address": lab.backend4(3), "weight": 1})
    emptied = conntab.clear_pinned(lab.lb_pin_dir / "conn_table")
    before = {id(s): s.echoes for s in streams}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(s.echoes - before[id(s)] >= PROGRESS or not s.alive for s in streams):
            break
        time.sleep(0.1)
    broken = [f"{s.backend}: {s.error}" for s in streams if not s.alive]
    broken += [f"{s.backend}: stalled" for s in streams
               if s.alive and s.echoes - before[id(s)] < PROGRESS]
    return broken, emptied


def test_second_chance_keeps_every_stream_when_slots_move_and_the_table_is_lost(
    lab: Lab, api: LabApi, vips: Vips, streams: list[Stream]
) -> None:
    """With second chance on, 0 of the streams break; the LB sent second hops and the new
    backend passed packets on."""
    hops0 = _lb_counter(api, "STAT_SECOND_HOP")
    dc0 = _decap_counters(lab)
    broken, emptied = _broken_after_change(lab, api, vips, streams, second_chance=True)
    print(f"\nsecond chance on: {len(broken)} broken of {len(streams)}"
          f" (conn-table slots emptied: {emptied})")
    assert emptied >= len(streams), "the connection table did not hold the streams"
    assert not broken, f"{len(broken)} broken of {len(streams)}: {broken}"
    dc = _decap_counters(lab)
    forwarded = dc["DECAP_STAT_SC_FORWARD"] - dc0["DECAP_STAT_SC_FORWARD"]
    kept = dc["DECAP_STAT_SC_KEEP_LAST"] - dc0["DECAP_STAT_SC_KEEP_LAST"]
    hops = _lb_counter(api, "STAT_SECOND_HOP") - hops0
    print(f"LB STAT_SECOND_HOP +{hops}; decap SC_FORWARD +{forwarded}, SC_KEEP_LAST +{kept}")
    assert hops > 0, "the LB sent no packet with a second hop"
    assert forwarded > 0 and kept > 0, f"no packet was passed on and kept: {dc}"


def test_without_second_chance_the_same_change_resets_streams(
    lab: Lab, api: LabApi, vips: Vips, streams: list[Stream]
) -> None:
    """The control: `second_chance: false`, the same change breaks the streams on moved
    slots."""
    broken, emptied = _broken_after_change(lab, api, vips, streams, second_chance=False)
    print(f"\nsecond chance off: {len(broken)} broken of {len(streams)}: {broken[:3]}"
          f" (conn-table slots emptied: {emptied})")
    assert emptied >= len(streams)
    assert broken, "no stream broke without second chance: the test proves nothing"
    assert len(broken) < len(streams), f"every stream broke: {broken}"


@pytest.mark.slow
def test_second_chance_with_the_xdp_decap_variant(test_prefix: str) -> None:
    """The same change in a lab whose backends decapsulate in XDP: 0 streams broken."""
    spec = Lab(prefix=f"{test_prefix}s", backends=3, decap="xdp")
    with labmod.running(spec), daemon_running(spec) as client:
        v = Vips(client)
        made: list[Stream] = []
        try:
            broken, emptied = _broken_after_change(spec, client, v, made, second_chance=True)
        finally:
            for s in made:
                s.close()
            v.cleanup()
    print(f"\nsecond chance on, XDP decap: {len(broken)} broken of {len(made)}"
          f" (conn-table slots emptied: {emptied})")
    assert not broken, f"{len(broken)} broken of {len(made)}: {broken}"
