"""The XDP chain (lb.dataplane.chain, docs/chain.md): the root runs an operator's filter,
then the balancer; filters and the balancer are replaced atomically; bad pins are refused in
one line naming the problem."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from lb.config import Features
from lb.dataplane import attach as xdp
from lb.dataplane import bpf, chain
from lb.dataplane.host import open_host
from lb.dataplane.testrun import TestRunner
from lb.errors import InvalidInput, NotFound
from lb.settings import load_settings
from tests import chain_filter
from tests.kernel import flows
from tests.kernel.conftest import Veth

pytestmark = [pytest.mark.bpf]

XDP_DROP = 1


def _run(prog_fd: int, lb_mac: str = flows.LB_MAC) -> tuple[int, str | None]:
    res = TestRunner(prog_fd).run(flows.packet(lb_mac))
    return res.verdict, flows.backend_of(res.verdict, res.packet)


def test_chain_constants_are_the_headers() -> None:
    text = (Path(chain_filter.SOURCE).parents[1] / "root" / "chain.h").read_text()
    assert f"#define CHAIN_SLOTS {chain.CHAIN_SLOTS}\n" in text
    assert "#define CHAIN_BALANCER_SLOT (CHAIN_SLOTS - 1)" in text
    assert chain.CHAIN_BALANCER_SLOT == chain.CHAIN_SLOTS - 1


def test_root_runs_the_filter_then_the_balancer_and_slots_swap_atomically(
    pin_dir: Path, tmp_path: Path
) -> None:
    settings = load_settings(flows.write_config(tmp_path / "x.toml", pin_dir, tmp_path / "s"))
    with open_host(settings) as host:
        flows.seed(host.balancer)
        root = chain.Root(pin_dir)
        try:
            assert _run(root.prog_fd)[0] == 2, "an empty chain passes to the stack (XDP_PASS)"
            chain.set_slot(pin_dir, chain.CHAIN_BALANCER_SLOT, host.balancer.prog_fd, "lb")
            assert _run(root.prog_fd)[1] == str(flows.CONN_BACKEND), "root did not balance"

            obj = chain_filter.build(tmp_path / "drop.o")
            f1 = chain_filter.load(obj, pin_dir.with_name(pin_dir.name + "_f1"), pin_dir)
            f2 = chain_filter.load(obj, pin_dir.with_name(pin_dir.name + "_f2"), pin_dir)
            try:
                f1.drop("198.18.9.9")
                added = chain.add_filter(pin_dir, 0, f1.prog)
                assert added.name == "drop_source"
                assert _run(root.prog_fd)[1] == str(flows.CONN_BACKEND), (
                    "an unlisted source was not passed on to the balancer"
                )
                f1.drop(str(flows.CLIENT))
                assert _run(root.prog_fd)[0] == XDP_DROP, "the listed source was not dropped"
                assert f1.dropped(str(flows.CLIENT)) == 1

                # Upgrade: the new filter (empty list) replaces the old one in its slot.
                upgraded = chain.add_filter(pin_dir, 0, f2.prog)
                assert upgraded.prog_id != added.prog_id
                assert _run(root.prog_fd)[1] == str(flows.CONN_BACKEND)
                f1.unpin()  # the operator's pin may go: xlb keeps its own
                shown = chain.slots(pin_dir)
                assert (shown[0].prog_id, shown[0].name) == (upgraded.prog_id, "drop_source")
                assert shown[0].pin == str(pin_dir / "chain_0")
                assert shown[-1].role == "balancer"
                assert shown[-1].prog_id == host.balancer.prog_id
                assert all(s.prog_id is None for s in shown[1:-1])

                removed = chain.remove_filter(pin_dir, 0)
                assert removed.prog_id == upgraded.prog_id
                assert chain.filters(pin_dir) == []
                assert not (pin_dir / "chain_0").exists()
                assert _run(root.prog_fd)[1] == str(flows.CONN_BACKEND)
                with pytest.raises(NotFound, match="chain slot 0 is empty"):
                    chain.remove_filter(pin_dir, 0)
            finally:
                f1.unpin()
                f2.unpin()
        finally:
            root.close()


def _pinned_tc_program(path: Path) -> None:
    insns = (ctypes.c_uint64 * 2)(0xB7, 0x95)  # r0 = 0; exit
    lic = ctypes.create_string_buffer(b"GPL")
    attr = bpf.ProgLoadAttr(prog_type=3, insn_cnt=2, insns=ctypes.addressof(insns),
                            license=ctypes.addressof(lic), prog_name=b"tc_thing")  # fmt: skip
    fd = bpf.bpf(bpf.BPF_PROG_LOAD, attr, "loading a tc program")
    try:
        bpf.obj_pin(fd, path)
    finally:
        os.close(fd)


def test_what_is_not_a_pinned_xdp_program_is_refused_in_one_line(
    pin_dir: Path, tmp_path: Path
) -> None:
    settings = load_settings(flows.write_config(tmp_path / "x.toml", pin_dir, tmp_path / "s"))
    with open_host(settings):
        tc = pin_dir / "tc_thing"
        _pinned_tc_program(tc)
        cases = [
            (0, pin_dir / "nothing", f"no BPF program pinned at {pin_dir / 'nothing'}"),
            (0, pin_dir / "reals", f"{pin_dir / 'reals'} is a pinned BPF map, not a program"),
            (0, tc, f"{tc} is a tc (sched_cls) program (type 3, 'tc_thing'), not an XDP"),
            (0, tmp_path / "x.toml", "is not on a bpf filesystem"),
            (0, Path("relative/pin"), "is not an absolute path"),
            (chain.CHAIN_BALANCER_SLOT, tc, "slot 7 is the balancer's"),
        ]
        for slot, pin, says in cases:
            with pytest.raises(InvalidInput) as exc:
                chain.add_filter(pin_dir, slot, pin)
            assert says in exc.value.detail, exc.value.detail
            assert "\n" not in exc.value.detail
            assert exc.value.field == ("slot" if slot else "pin")


@pytest.mark.netns
def test_host_chain_on_add_kept_by_upgrade_and_restart_off_after_the_last_filter(
    veth: Veth, pin_dir: Path, tmp_path: Path
) -> None:
    cfg = flows.write_config(tmp_path / "x.toml", pin_dir, tmp_path / "s")
    settings = load_settings(cfg, interface=veth.a, netns=veth.ns, xdp_mode="native")
    obj = chain_filter.build(tmp_path / "drop.o")
    with open_host(settings) as host:
        flows.seed(host.balancer)
        alone = host.attach_info
        assert alone is not None and xdp.query(veth.a, netns=veth.ns).prog_name == "xdp_balancer"
        # The chain's map is there with the chain off, so a filter can be loaded against it.
        assert [s.prog_id for s in host.chain_slots()] == [None] * chain.CHAIN_SLOTS
        flt = None
        try:
            flt = chain_filter.load(obj, pin_dir.with_name(pin_dir.name + "_f"), pin_dir)
            added = host.chain_add(0, flt.prog)  # chain on: the root replaces the balancer
            now = xdp.query(veth.a, netns=veth.ns, pin_dir=pin_dir)
            assert (now.prog_name, now.mode, now.ours) == ("xdp_root", "native", True)
            root_id = now.prog_id

            new = settings.dataplane.model_copy(update={"features": Features(gue=False)})
            host.upgrade(new)
            slots = host.chain_slots()
            assert slots[-1].prog_id == host.balancer.prog_id, "balancer slot not upgraded"
            assert slots[0].prog_id == added.prog_id, "the filter was lost by the upgrade"
            assert xdp.query(veth.a, netns=veth.ns).prog_id == root_id, "the root changed"
            assert _run(host.balancer.prog_fd, host.lb_mac() or "")[1] == str(flows.CONN_BACKEND)
        finally:
            if flt is not None:
                flt.unpin()
    # A restart (xdp_chain off in the settings) keeps the chain while a filter is in it.
    with open_host(settings) as host:
        assert xdp.query(veth.a, netns=veth.ns).prog_id == root_id, "restart replaced the root"
        slots = host.chain_slots()
        assert slots[0].prog_id == added.prog_id and slots[-1].prog_id == host.balancer.prog_id
        host.chain_remove(0)
        now = xdp.query(veth.a, netns=veth.ns, pin_dir=pin_dir)
        assert now.prog_name == "xdp_balancer" and now.prog_id == host.balancer.prog_id, (
            "the balancer is not on its own after the last filter went"
        )
        assert not (pin_dir / xdp.ROOT_PIN).exists()
        assert [s.prog_id for s in host.chain_slots()] == [None] * chain.CHAIN_SLOTS, (
            "the chain still holds a program after it was turned off"
        )
