"""open_host: pins survive a restart in a new process, hitless upgrade, stop vs detach."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from lb.config import Features
from lb.consts import GLOB_STATS
from lb.dataplane import attach as xdp
from lb.dataplane.host import open_host
from lb.dataplane.loader import (
    Balancer,
    loaded_balancer,
    pinned_map_info,
    prog_info,
    read_runtime_config,
)
from lb.dataplane.testrun import TestRunner
from lb.errors import IncompatiblePins
from lb.settings import CONFIG_ENV, load_settings
from tests.conftest import TEST_CONFIG
from tests.kernel import flows
from tests.kernel.conftest import Veth

pytestmark = [pytest.mark.bpf]

REPO = Path(__file__).resolve().parents[2]


def _steer(b: Balancer, lb_mac: str | None = None) -> str | None:
    """Run the tracked flow's packet; the backend it was sent to (None: not sent)."""
    res = TestRunner(b.prog_fd).run(flows.packet(lb_mac or flows.LB_MAC))
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
        # The child compiles the balancer: minutes under qemu's TCG (make test-kernels).
        cwd=REPO, env={"PATH": "/usr/bin:/bin", CONFIG_ENV: str(cfg)},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert out["snapshot"] == flows.SEEDED, "pinned maps lost state across the restart"
    assert out["runtime_ok"], "lb_cfg in the new process differs from the settings"
    assert flows.backend_of(out["verdict"], bytes.fromhex(out["packet"])) == str(
        flows.CONN_BACKEND
    ), "the tracked flow did not go to its backend after the restart"


def test_incompatible_pins_are_refused_with_what_differs(pin_dir: Path) -> None:
    # Pins left by another configuration and an older program: a ring sized for another
    # ring_size, lb_cfg with a smaller value, conn_table as a plain hash with another key.
    from bcc import BPF

    ring = TEST_CONFIG.max_vips * 4111
    old = BPF(text=f"""
        BPF_TABLE_PINNED("array", u32, u32, ch_rings, {ring}, "{pin_dir}/ch_rings");
        BPF_TABLE_PINNED("array", u32, u64, lb_cfg, 1, "{pin_dir}/lb_cfg");
        BPF_TABLE_PINNED("hash", u64, u64, conn_table, 8, "{pin_dir}/conn_table");
    """.encode())  # fmt: skip
    old.cleanup()
    with pytest.raises(IncompatiblePins) as exc:
        Balancer(TEST_CONFIG, pin_dir=pin_dir)
    msg, want = exc.value.detail, TEST_CONFIG.max_vips * TEST_CONFIG.ring_size
    for part in (f"ch_rings: max_entries {ring} pinned, {want} configured"
                 " (dataplane.max_vips x dataplane.ring_size)",
                 "conn_table: type hash pinned, array in the program",
                 "--repin", f"rm -r {pin_dir}"):
        assert part in msg, f"message lacks {part!r}: {msg}"  # fmt: skip
    assert "lb_cfg" not in msg, "lb_cfg holds no state: another layout is replaced, not refused"
    assert re.search(r"conn_table: key_size 8 pinned, \d+ in the program", msg), msg
    assert exc.value.field == "pin_dir"

    with loaded_balancer(TEST_CONFIG, pin_dir=pin_dir, repin=True) as b:
        assert pinned_map_info(pin_dir / "ch_rings").max_entries == want, "--repin made new pins"
        assert b.map_ids()["conn_table"] == pinned_map_info(pin_dir / "conn_table").id


def test_stateless_pins_of_an_older_layout_are_replaced_and_the_rest_kept(
    pin_dir: Path,
) -> None:
    # An upgrade that grows lb_cfg (a field) or glob_stats (a counter) must not force a
    # --repin, which would drop the connection table: those two hold no flow state.
    from bcc import BPF

    with loaded_balancer(TEST_CONFIG, pin_dir=pin_dir) as b:
        reals_id = b.map_ids()["reals"]
        conn_id = b.map_ids()["conn_table"]
    for name in ("lb_cfg", "glob_stats"):
        (pin_dir / name).unlink()
    old = BPF(text=f"""
        struct old_cfg {{ char b[56]; }};
        BPF_TABLE_PINNED("array", u32, struct old_cfg, lb_cfg, 1, "{pin_dir}/lb_cfg");
        BPF_TABLE_PINNED("percpu_array", u32, u64, glob_stats, 20, "{pin_dir}/glob_stats");
    """.encode())  # fmt: skip
    old.cleanup()
    with loaded_balancer(TEST_CONFIG, pin_dir=pin_dir) as b:
        assert b.replaced_pins == ["glob_stats", "lb_cfg"]
        assert b.map_ids()["reals"] == reals_id, "a map with state was replaced"
        assert b.map_ids()["conn_table"] == conn_id, "the connection table was replaced"
        assert pinned_map_info(pin_dir / "glob_stats").max_entries == len(GLOB_STATS)


def test_an_old_lru_connection_table_pin_is_refused_in_one_clear_line(pin_dir: Path) -> None:
    # The connection table as data planes before docs/conn-table.md pinned it.
    from bcc import BPF

    old = BPF(text=f"""
        struct flow_key {{ u32 src[4]; u32 dst[4]; u16 sport; u16 dport; u8 proto; u8 family;
                           u16 pad; }};
        struct conn_val {{ u32 real_idx; u32 pad; u64 atime; }};
        BPF_TABLE_PINNED("lru_hash", struct flow_key, struct conn_val, conn_table, 65536,
                         "{pin_dir}/conn_table", 2);
    """.encode())  # fmt: skip
    old.cleanup()
    with pytest.raises(IncompatiblePins) as exc:
        Balancer(TEST_CONFIG, pin_dir=pin_dir)
    msg = exc.value.detail
    assert "conn_table: the pinned connection table is the LRU hash of an older data plane" in msg
    assert msg.count("conn_table:") == 1, f"one line for the old table, not one per field: {msg}"
    assert "--repin" in msg and exc.value.field == "pin_dir"


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

        # Watch the interface over one netlink socket for the whole upgrade: never empty.
        samples: list[tuple[int | None, str | None]] = []
        done = threading.Event()
        with IPRoute(netns=veth.ns, flags=0) as ipr:
            idx = ipr.link_lookup(ifname=veth.a)[0]

            def sample() -> None:
                x = ipr.get_links(idx)[0].get_attr("IFLA_XDP")
                samples.append((x.get_attr("IFLA_XDP_PROG_ID"), x.get_attr("IFLA_XDP_ATTACHED")))

            def watch() -> None:
                while not done.is_set():
                    sample()
                    done.wait(0.05)

            sample()
            watcher = threading.Thread(target=watch)
            watcher.start()
            new = settings.dataplane.model_copy(update={"features": Features(gue=False)})
            try:
                info = host.upgrade(new)
            finally:
                done.set()
                watcher.join()
            sample()

        assert info is not None and info.prog_id != before.prog_id, "program id did not change"
        assert (info.mode, info.replaced_prog_id) == ("native", before.prog_id)
        assert all(mode == "xdp" for _, mode in samples), "a moment without the native program"
        assert {pid for pid, _ in samples} == {before.prog_id, info.prog_id}
        assert host.balancer.config.features.gue is False
        assert host.balancer.prog_id == info.prog_id
        assert host.balancer.map_ids() == ids, "the upgrade created new maps"
        assert ids == {n: pinned_map_info(pin_dir / n).id for n in ids}, "maps are not the pins"
        assert set(prog_info(host.balancer.prog_fd).map_ids) <= set(ids.values())
        assert flows.snapshot(host.balancer) == flows.SEEDED
        assert _steer(host.balancer, host.lb_mac()) == str(flows.CONN_BACKEND), (
            "tracked flow moved"
        )
        assert _steer(host.balancer) is None, "a frame to another host's MAC was balanced"


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

    with open_host(settings, attach=False) as host:
        assert host.attach_info is None
        assert xdp.query(veth.a, netns=veth.ns).prog_id == first.prog_id, "old one still runs"
        second = host.attach()
        assert second is not None and second.replaced_prog_id == first.prog_id
        assert "atomically replaced our program" in second.reason
        removed = host.detach()
        assert removed is not None and removed.prog_id == second.prog_id
    assert xdp.query(veth.a, netns=veth.ns).prog_id is None, "detach left a program"
    assert (pin_dir / "conn_table").exists(), "detach keeps the pins"

