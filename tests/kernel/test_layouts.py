"""lb.dataplane.cstructs (the layouts read from the headers, for tools without a compiler)
against what BCC's compiler made of the same headers: every map key and value of every
program, field by field (name, offset, size)."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from typing import Any

import pytest

from lb.config import RuntimeConfig, xdp_source_dir
from lb.dataplane import cstructs
from lb.dataplane.decap import Decap
from lb.dataplane.hcencap import HcEncap

pytestmark = pytest.mark.bpf

#: Map declarations: (key type, value type, name), with or without the "type" argument.
_DECL = re.compile(
    r"^\s*(?:LB_MAP|DECAP_MAP|BPF_F_TABLE)\(\s*\"\w+\"\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,"
    r"\s*(\w+)\s*,|^\s*BPF_HASH\(\s*(\w+)\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,"
    r"|^\s*BPF_(?:PERCPU_)?ARRAY\(\s*(\w+)\s*,\s*([^,]+?)\s*,",
    re.M,
)
_SCALARS = {"__u32": 4, "__u64": 8}


def _declarations(header: str) -> dict[str, tuple[str, str]]:
    """Map name -> (key type, value type) as the source declares them."""
    text = re.sub(r"^#.*?(?<!\\)$", "", (xdp_source_dir() / header).read_text(),
                  flags=re.M | re.S)
    out: dict[str, tuple[str, str]] = {}
    for m in _DECL.finditer(text):
        g = m.groups()
        if g[2]:
            out[g[2]] = (g[0], g[1])
        elif g[3]:
            out[g[3]] = (g[4], g[5])
        else:
            out[g[6]] = ("__u32", g[7])
    return out


def _layout(cls: Any) -> list[tuple[str, int, int]]:
    return [(f[0], getattr(cls, f[0]).offset, getattr(cls, f[0]).size) for f in cls._fields_
            if not f[0].startswith("__pad")]


def _check(header: str, structs_from: tuple[str, ...], tables: dict[str, Any]) -> int:
    parsed = cstructs.structs(*structs_from)
    checked = 0
    for name, types in _declarations(header).items():
        table = tables[name]
        compiled = (table.Key, getattr(table, "sLeaf", table.Leaf))
        for ctype, bcc_type in zip(types, compiled, strict=True):
            if ctype.startswith("struct "):
                ours = parsed[ctype.split()[1]]
                assert ctypes.sizeof(ours) == ctypes.sizeof(bcc_type), (
                    f"{name}: {ctype} is {ctypes.sizeof(ours)} bytes from the header,"
                    f" {ctypes.sizeof(bcc_type)} compiled"
                )
                assert _layout(ours) == _layout(bcc_type), f"{name}: {ctype} fields differ"
            else:
                assert ctypes.sizeof(bcc_type) == _SCALARS[ctype], f"{name}: {ctype} size"
            checked += 1
    return checked


def test_balancer_maps(balancer: Any) -> None:
    n = _check("balancer/maps.h", ("common/structs.h", "balancer/events.h"), balancer.maps)
    # The events ring (BPF_RINGBUF_OUTPUT) has no key or value.
    assert n == 2 * (len(balancer.maps) - 1)


@pytest.fixture(scope="module")
def decap() -> Iterator[Decap]:
    d = Decap()
    yield d
    d.close()


def test_decap_maps(decap: Decap) -> None:
    assert _check("decap/decap_maps.h", ("decap/decap.h",), decap.maps) == 2 * len(decap.maps)


def test_hc_encap_maps() -> None:
    hc = HcEncap(RuntimeConfig(gateway_mac="02:00:00:00:00:01"))
    try:
        tables = {"hc_reals": hc.reals, "hc_cfg": hc.cfg, "hc_stats": hc.stats}
        assert _check("hc_encap/hc_encap.c", ("hc_encap/hc_encap.c",), tables) == 6
    finally:
        hc.close()
