"""lb/dataplane/hcencap.py keeps the C names of xdp/hc_encap/hc_encap.c verbatim."""

from __future__ import annotations

import re
import subprocess

import pytest

from lb.config import xdp_source_dir
from lb.dataplane import hcencap

SOURCE = (xdp_source_dir() / "hc_encap" / "hc_encap.c").read_text()


def test_counter_slots_match_enum_hc_stat() -> None:
    body = re.search(r"enum hc_stat \{(.*?)\};", SOURCE, re.S)
    assert body is not None
    names = re.findall(r"^\s*(HC_STAT_\w+)", body.group(1), re.M)
    assert names[-1] == "HC_STAT_MAX"
    assert tuple(names[:-1]) == hcencap.HC_STATS


def test_flags_match_the_c_defines() -> None:
    for name in ("HC_F_V6", "HC_F_GUE"):
        m = re.search(rf"#define {name} \(1 << (\d+)\)", SOURCE)
        assert m is not None, name
        assert getattr(hcencap, name) == 1 << int(m.group(1))


@pytest.mark.bpf
def test_attach_replaces_the_filter_a_crashed_daemon_left(test_prefix: str) -> None:
    from lb.config import RuntimeConfig
    from lb.dataplane import netns

    def egress(ns: str) -> str:
        return subprocess.run(["tc", "-n", ns, "filter", "show", "dev", "hcx0", "egress"],
                              capture_output=True, text=True, check=True).stdout

    with netns.namespace(f"{test_prefix}hcx") as ns:
        netns.run(ns, ["ip", "link", "add", "hcx0", "type", "veth", "peer", "name", "hcx1"])
        crashed = hcencap.HcEncap(RuntimeConfig())
        fresh = hcencap.HcEncap(RuntimeConfig())
        try:
            crashed.attach("hcx0", ns)
            # A daemon killed with SIGKILL never detaches: its filter stays on egress.
            left = re.search(r" id (\d+) name tc_hc_encap", egress(ns))
            assert left is not None
            fresh.attach("hcx0", ns)
            after = re.findall(r" id (\d+) name tc_hc_encap", egress(ns))
            assert len(after) == 1 and after[0] != left.group(1), \
                "the next daemon's program replaces the one left behind"
        finally:
            fresh.close()
            crashed.bpf.cleanup()
