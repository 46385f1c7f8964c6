"""open_host: pins survive a restart in a new process, hitless upgrade, stop vs detach."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lb import attach as xdp
from lb.config import Features
from lb.dataplane import Balancer, pinned_map_info, prog_info, read_runtime_config
from lb.errors import IncompatiblePins
from lb.host import open_host
from lb.settings import CONFIG_ENV, load_settings
from lb.testrun import TestRunner
from tests.conftest import TEST_CONFIG
from tests.kernel import flows
from tests.kernel.conftest import Veth

pytestmark = [pytest.mark.bpf]

REPO = Path(__file__).resolve().parents[2]


def _steer(b: Balancer) -> str | None:
    """Run the tracked flow's packet; skip if the program does not forward yet."""
    res = TestRunner(b.prog_fd).run(flows.packet())
    reason = flows.skip_reason_if_not_forwarding(res.verdict)
    if reason:
        pytest.skip(reason)
    return flows.backend_of(res.verdict, res.packet)


def test_restart_in_a_new_process_keeps_flows_and_counters(
    pin_dir: Path, tmp_path: Path
) -> None:
    cfg = flows.write_config(tmp_path / "xlb.toml", pin_dir, tmp_path / "state")
    settings = load_settings(cfg)
    with open_host(settings) as host:
        assert host.attach_info is None, "no interface configured: nothing attached"
        flows.seed(host.balancer)
        assert flows.snapshot(host.balancer) == flows.SEEDED
        assert read_runtime_config(host.balancer) == settings.runtime
    assert (pin_dir / "conn_table").exists(), "maps stay pinned after the control plane exits"

    child = subprocess.run(
        [sys.executable, "-m", "tests.kernel.restart_child", flows.packet().hex()],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", CONFIG_ENV: str(cfg)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert out["snapshot"] == flows.SEEDED, "pinned maps lost state across the restart"
    assert out["runtime_ok"], "lb_cfg in the new process differs from the settings"
    reason = flows.skip_reason_if_not_forwarding(out["verdict"])
    if reason:
        pytest.skip(reason)
    assert flows.backend_of(out["verdict"], bytes.fromhex(out["packet"])) == str(
        flows.CONN_BACKEND
    ), "the tracked flow did not go to its backend after the restart"


def test_incompatible_pins_are_refused_with_what_differs(
    pin_dir: Path, tmp_path: Path
) -> None:
    cfg = flows.write_config(tmp_path / "xlb.toml", pin_dir, tmp_path / "state")
    with open_host(load_settings(cfg)) as host:
        flows.seed(host.balancer)
    bigger = load_settings(cfg, dataplane={"ring_size": 4111, "max_vips": 16,
                                           "max_reals": 64, "conn_table_size": 65536})  # fmt: skip
    with pytest.raises(IncompatiblePins) as exc, open_host(bigger):
        pass
    msg = exc.value.detail
    for part in ("ch_rings", "max_entries 65584 pinned, 65776 configured",
                 "dataplane.max_vips x dataplane.ring_size", "--repin", f"rm -r {pin_dir}"):
        assert part in msg, f"message lacks {part!r}: {msg}"  # fmt: skip
    assert exc.value.field == "pin_dir"

    with open_host(bigger, repin=True) as host:
        snap = flows.snapshot(host.balancer)
        assert snap["conn_real"] is None and snap["lru_hits"] == 0, "--repin starts empty"
        assert pinned_map_info(pin_dir / "ch_rings").max_entries == 16 * 4111


@pytest.mark.netns
def test_upgrade_replaces_the_program_atomically_and_keeps_the_maps(
    veth: Veth, pin_dir: Path, tmp_path: Path
) -> None:
    cfg = flows.write_config(tmp_path / "xlb.toml", pin_dir, tmp_path / "state")
    settings = load_settings(cfg, interface=veth.a, netns=veth.ns, xdp_mode="native")
    with open_host(settings) as host:
        flows.seed(host.balancer)
        before, ids = host.attach_info, host.balancer.map_ids()
        assert before is not None and before.mode == "native"

        # Watch the interface from netlink for the whole upgrade: it must never be empty.
        samples = [xdp.query(veth.a, netns=veth.ns)]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                samples.append(xdp.query(veth.a, netns=veth.ns))
                done.wait(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        new = settings.dataplane.model_copy(update={"features": Features(gue=False)})
        try:
            info = host.upgrade(new)
        finally:
            done.set()
            watcher.join()
        samples.append(xdp.query(veth.a, netns=veth.ns))

        assert info is not None and info.prog_id != before.prog_id, "program id did not change"
        assert (info.mode, info.replaced_prog_id) == ("native", before.prog_id)
        assert all(s.mode == "native" for s in samples), "a moment without the program"
        assert {s.prog_id for s in samples} == {before.prog_id, info.prog_id}
        assert host.balancer.config.features.gue is False
        assert host.balancer.prog_id == info.prog_id
        assert host.balancer.map_ids() == ids, "the upgrade created new maps"
        assert ids == {n: pinned_map_info(pin_dir / n).id for n in ids}, "maps are not the pins"
        assert set(prog_info(host.balancer.prog_fd).map_ids) <= set(ids.values())
        assert flows.snapshot(host.balancer) == flows.SEEDED
        assert _steer(host.balancer) == str(flows.CONN_BACKEND), "tracked flow moved"


@pytest.mark.netns
def test_stop_keeps_forwarding_restart_replaces_detach_removes(
    veth: Veth, pin_dir: Path, tmp_path: Path
) -> None:
    # Gateway MAC left unset: it is resolved from the default route's neighbour.
    veth.ip("addr", "add", "198.18.0.1/24", "dev", veth.a)
    veth.ip("route", "add", "default", "via", "198.18.0.254", "dev", veth.a)
    veth.ip("neigh", "add", "198.18.0.254", "lladdr", "02:00:00:00:00:fd", "dev", veth.a)
    cfg = flows.write_config(tmp_path / "xlb.toml", pin_dir, tmp_path / "state", gateway_mac=None)
    settings = load_settings(cfg, interface=veth.a, netns=veth.ns)
    with open_host(settings) as host:
        first = host.attach_info
        assert first is not None and first.mode == "native"
        assert read_runtime_config(host.balancer) == host.runtime
        assert host.runtime.gateway_mac == "02:00:00:00:00:fd"
    assert xdp.query(veth.a, netns=veth.ns).prog_id == first.prog_id, "stop detached the program"

    with open_host(settings) as host:
        second = host.attach_info
        assert second is not None and second.replaced_prog_id == first.prog_id
        assert "atomically replaced our program" in second.reason
        removed = host.detach()
        assert removed is not None and removed.prog_id == second.prog_id
    assert xdp.query(veth.a, netns=veth.ns).prog_id is None, "detach left a program"
    assert (pin_dir / "conn_table").exists(), "detach keeps the pins"


def test_changed_layout_or_type_of_a_pin_is_named(pin_dir: Path) -> None:
    # Pins left by an older program: lb_cfg with a smaller value, conn_table as a plain hash.
    from bcc import BPF

    old = BPF(text=f"""
        BPF_TABLE_PINNED("array", u32, u64, lb_cfg, 1, "{pin_dir}/lb_cfg");
        BPF_TABLE_PINNED("hash", u64, u64, conn_table, 8, "{pin_dir}/conn_table");
    """.encode())  # fmt: skip
    old.cleanup()
    with pytest.raises(IncompatiblePins) as exc:
        Balancer(TEST_CONFIG, pin_dir=pin_dir)
    msg = exc.value.detail
    assert re.search(r"lb_cfg: value_size 8 pinned, \d+ in the program", msg), msg
    assert "conn_table: type hash pinned, lru_hash in the program" in msg
    assert re.search(r"conn_table: key_size 8 pinned, \d+ in the program", msg), msg
