"""The XDP chain in the lab (docs/chain.md): an operator's filter in front of the balancer
drops one listed client source while the others connect through the VIP; the filter is
upgraded and removed, and the balancer restarted under it, while a long-lived connection
keeps echoing."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.client import ApiError
from lb.dataplane import netlink, netns
from lb.lab import network as labmod
from lb.lab.network import Lab, LabApi, Stream
from tests import chain_filter
from tests.e2e.conftest import Vips, ensure_daemon

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

# Extra client sources: DROPPED is listed by the first filter, LATER by its upgrade.
DROPPED, LATER = "198.18.1.3", "198.18.1.4"
PROGRESS = 5


@pytest.fixture
def sources(lab: Lab) -> Iterator[None]:
    """Two more addresses on the client, removed afterwards."""
    for a in (DROPPED, LATER):
        netlink.add_address(lab.client_ns, labmod.CLIENT_IF, f"{a}/24")
    yield
    for a in (DROPPED, LATER):
        subprocess.run(["ip", "-n", lab.client_ns, "addr", "del", f"{a}/24", "dev",
                        labmod.CLIENT_IF], capture_output=True)  # fmt: skip


def _connects(lab: Lab, source: str) -> bool:
    """A new connection to the stream VIP from `source` gets the backend's greeting."""

    def once() -> bool:
        try:
            with socket.create_connection((lab.vip4, labmod.STREAM_PORT), timeout=1.5,
                                          source_address=(source, 0)) as s:  # fmt: skip
                return s.recv(64).endswith(b"\n")
        except OSError:
            return False

    return netns.call_in(lab.client_ns, once)


def _progressing(stream: Stream, what: str) -> None:
    before, deadline = stream.echoes, time.monotonic() + 10
    while stream.echoes - before < PROGRESS and stream.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stream.alive, f"the long-lived connection broke {what}: {stream.error}"
    assert stream.echoes - before >= PROGRESS, f"the long-lived connection stalled {what}"


def _slot0(api: LabApi) -> dict[str, object]:
    return dict(api.get("/v1/chain")["slots"][0])


def test_filter_in_front_drops_its_source_and_survives_upgrade_restart_and_removal(
    lab: Lab, lab_daemon: LabApi, sources: None, tmp_path: Path
) -> None:
    api = lab_daemon
    labmod.stop_daemon(lab)
    labmod.start_daemon(lab, top_toml="xdp_chain = true\n")
    vips = Vips(api)
    pins = lab.lb_pin_dir.parent
    filters: list[chain_filter.Filter] = []
    stream: Stream | None = None
    try:
        vips.create("tcp", lab.vip4, labmod.STREAM_PORT,
                    [(lab.backend4(i), 1) for i in lab.backend_ids])
        shown = api.get("/v1/chain")
        assert shown["enabled"] and shown["slots"][-1]["name"] == "xdp_balancer"
        assert netlink.link_info(lab.lb_ns, labmod.LB_IF).xdp_prog_name == "xdp_root"
        assert _connects(lab, DROPPED), "before any filter every source connects"
        stream = Stream(lab, lab.vip4)

        obj = chain_filter.build(tmp_path / "drop_source.o")
        first = chain_filter.load(obj, pins / f"{lab.prefix}-drop1", lab.lb_pin_dir)
        filters.append(first)
        first.drop(DROPPED)
        api.post("/v1/chain", {"slot": 0, "pin": str(first.prog)})
        assert not _connects(lab, DROPPED), "the filter's listed source still connects"
        assert first.dropped(DROPPED) > 0, "the filter counted no drop of its source"
        assert _connects(lab, lab.client4), "an unlisted source no longer connects"
        _progressing(stream, "when the filter was added")
        filter_id = _slot0(api)["prog_id"]

        # The balancer restarted (not configured for the chain: kept while a filter is in).
        balancer_before = api.get("/v1/chain")["slots"][-1]["prog_id"]
        labmod.stop_daemon(lab)
        labmod.start_daemon(lab)
        after = api.get("/v1/chain")
        assert after["slots"][-1]["prog_id"] != balancer_before, "the balancer was not replaced"
        assert _slot0(api)["prog_id"] == filter_id, "the restart lost the filter"
        assert not _connects(lab, DROPPED), "the filter stopped dropping after the restart"
        _progressing(stream, "across the balancer's restart")

        # The filter upgraded: a new program with another list replaces it atomically.
        second = chain_filter.load(obj, pins / f"{lab.prefix}-drop2", lab.lb_pin_dir)
        filters.append(second)
        second.drop(LATER)
        api.post("/v1/chain", {"slot": 0, "pin": str(second.prog)})
        assert _slot0(api)["prog_id"] not in (None, filter_id)
        assert _connects(lab, DROPPED) and not _connects(lab, LATER)
        _progressing(stream, "when the filter was upgraded")

        # Removed: the last filter gone, the balancer runs on the interface by itself.
        api.delete("/v1/chain/0")
        assert _connects(lab, LATER)
        assert netlink.link_info(lab.lb_ns, labmod.LB_IF).xdp_prog_name == "xdp_balancer"
        assert not api.get("/v1/chain")["enabled"]
        _progressing(stream, "when the filter was removed")

        with pytest.raises(ApiError) as exc:
            api.post("/v1/chain", {"slot": 0, "pin": str(pins / f"{lab.prefix}-none")})
        assert exc.value.status == 422 and "no BPF program pinned at" in str(exc.value.body)
    finally:
        if stream is not None:
            stream.close()
        vips.cleanup()
        for f in filters:
            f.unpin()
        labmod.stop_daemon(lab)
        ensure_daemon(lab)
