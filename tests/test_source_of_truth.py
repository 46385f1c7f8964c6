"""What C and Python share is written once, and these checks hold the copies to it (no root).

- Map names: the maps each program declares (xdp/*/…) are the ones its loader opens, by the
  same names, each short enough for bpftool to print whole.
- Hash constants: lb.dataplane.flowhash's are xdp/common/hash.h's.
- Struct layouts: the tools that read pinned maps without a compiler (the doctor) take them
  from the headers through lb.dataplane.cstructs; tests/kernel/test_layouts.py checks the
  parser against the layouts BCC's compiler produced.
"""

from __future__ import annotations

import ctypes
import ipaddress
import re

import pytest

from lb.config import xdp_source_dir
from lb.consts import FAMILY_V4, FAMILY_V6
from lb.dataplane import cstructs, decap, flowhash, hcencap, loader, mapio
from lb.dataplane.keys import addr16

XDP = xdp_source_dir()
BPF_NAME_MAX = 15

_MACRO_MAP = re.compile(r"^\s*(?:LB_MAP|DECAP_MAP)\(\s*\"\w+\"\s*,[^,]+,[^,]+,\s*(\w+)\s*,", re.M)
_BCC_MAP = re.compile(r"^\s*BPF_(?:HASH|ARRAY|PERCPU_ARRAY|F_TABLE|TABLE|RINGBUF_OUTPUT)\("
                      r"\s*(?:\"\w+\"\s*,[^,]+,[^,]+,\s*)?(\w+)\s*,", re.M)


def _declared(*files: str) -> list[str]:
    names: list[str] = []
    for f in files:
        # Preprocessor lines (with their continuations) define the macros, not maps.
        text = re.sub(r"^#.*?(?<!\\)$", "", (XDP / f).read_text(), flags=re.M | re.S)
        names += _MACRO_MAP.findall(text) + _BCC_MAP.findall(text)
    return names


@pytest.mark.parametrize(
    ("program", "headers", "python"),
    [
        ("balancer", ["balancer/maps.h"], loader.MAP_NAMES),
        ("decap", ["decap/decap_maps.h"], decap.MAP_NAMES),
        ("hc_encap", ["hc_encap/hc_encap.c"], hcencap.MAP_NAMES),
    ],
)
def test_the_loader_opens_the_maps_the_program_declares(
    program: str, headers: list[str], python: tuple[str, ...]
) -> None:
    declared = _declared(*headers)
    assert declared, f"no map declaration found in {headers}"
    assert tuple(declared) == tuple(python), (
        f"{program}: maps declared {declared}, the loader opens {list(python)}"
    )
    for name in declared:
        assert len(name) <= BPF_NAME_MAX, f"{name}: longer than bpftool prints ({BPF_NAME_MAX})"


def test_incompatible_pin_messages_name_real_maps() -> None:
    assert set(loader.SIZE_SOURCE) <= set(loader.MAP_NAMES)


def _c_define(header: str, name: str) -> int:
    text = (XDP / header).read_text()
    m = re.search(rf"^#define\s+{name}\s+(0x[0-9a-fA-F]+|[0-9]+)\s*$", text, re.M)
    assert m, f"#define {name} not found in xdp/{header}"
    return int(m.group(1), 0)


@pytest.mark.parametrize("name", ["HASH_SEED", "HASH_JHASH_INITVAL", "PAIR_SLOT_MULT"])
def test_flowhash_constants_are_hash_h(name: str) -> None:
    assert getattr(flowhash, name) == _c_define("common/hash.h", name), (
        f"{name}: lb/dataplane/flowhash.py differs from xdp/common/hash.h"
    )


@pytest.mark.parametrize(
    "header", ["common/structs.h", "decap/decap.h", "hc_encap/hc_encap.c"]
)
def test_every_struct_of_a_header_parses(header: str) -> None:
    found = cstructs.structs(header)
    declared = re.findall(r"^struct (\w+) \{", (XDP / header).read_text(), re.M)
    assert declared and sorted(found) == sorted(set(declared) | set(found))
    assert set(declared) <= set(found)


def test_the_doctor_reads_the_gateway_mac_where_the_header_puts_it() -> None:
    cfg = cstructs.struct("common/structs.h", "lb_cfg")
    raw = bytearray(ctypes.sizeof(cfg))
    where = cstructs.field_slice(cfg, "gw_mac")
    raw[where] = bytes.fromhex("02aabbccddee")
    assert mapio.gateway_mac_of(bytes(raw)) == "02:aa:bb:cc:dd:ee"


def test_a_layout_follows_the_header_not_a_copy() -> None:
    """Moving a field in the header moves it for the parser: no offset is written twice."""
    text = (XDP / "common" / "structs.h").read_text()
    moved = text.replace("\t__u8 gw_mac[6];\n", "").replace(
        "\t__u64 udp_timeout_ns;\n", "\t__u64 udp_timeout_ns;\n\t__u8 gw_mac[6];\n"
    )
    assert moved != text
    consts = (XDP / "common" / "consts.h").read_text()
    cfg = cstructs.parse(moved, cstructs.parse_defines(consts))["lb_cfg"]
    assert cfg.gw_mac.offset == cfg.udp_timeout_ns.offset + 8  # type: ignore[attr-defined]


@pytest.mark.parametrize("text", ["198.18.11.2", "2001:db8:11::2"])
def test_the_decap_key_is_struct_decap_addr(text: str) -> None:
    addr = ipaddress.ip_address(text)
    family = FAMILY_V4 if addr.version == 4 else FAMILY_V6
    assert mapio.decap_addr_key(addr) == addr16(addr) + family.to_bytes(4, "little")


def test_array_sizes_come_from_the_defines() -> None:
    s = cstructs.structs("common/structs.h")
    consts = cstructs.parse_defines((XDP / "common" / "consts.h").read_text())
    ways = int(consts["CONN_WAYS"])
    assert ctypes.sizeof(s["conn_set"]) == ways * ctypes.sizeof(s["conn_way"])
    words = 1 << (int(consts["VIP_FILTER_LOG2"]) - 6)
    assert ctypes.sizeof(s["vip_filter"]) == 8 + 8 * words


def test_event_constants_are_the_headers() -> None:
    from lb.dataplane import events

    text = (XDP / "balancer" / "events.h").read_text()
    defines = dict(re.findall(r"^#define\s+(EV_[A-Z0-9_]+)\s+(\(?[0-9][^/\n]*?)\s*$", text, re.M))
    defines.pop("EV_RING_PAGES")  # a build tunable (-D), not a value Python needs
    assert defines, "no EV_ constant found in xdp/balancer/events.h"
    for name, expr in defines.items():
        want = int(eval(expr, {"__builtins__": {}}))
        assert getattr(events, name, None) == want, f"{name}: events.py differs from events.h"
    mirrored = {n for n in dir(events) if re.match(r"^EV_[A-Z]", n)}
    assert mirrored == set(defines), f"events.py has {sorted(mirrored - set(defines))} extra"
