"""lb/dataplane/hcencap.py keeps the C names of xdp/hc_encap/hc_encap.c verbatim."""

from __future__ import annotations

import re

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
