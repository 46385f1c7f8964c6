"""The Python mirror of xdp/common/consts.h matches the header, name for name."""

from __future__ import annotations

import re

from lb import consts
from lb.config import xdp_source_dir

HEADER = (xdp_source_dir() / "common" / "consts.h").read_text()


# Build-time tunables (-D flags from lb.config), not mirrored in lb/consts.py.
TUNABLES = {"CONN_SETS", "CONN_TABLE_SIZE"}


def _defines() -> dict[str, int]:
    out: dict[str, int] = {}
    pattern = r"^#define\s+([A-Z][A-Z0-9_]+)\s+(\(?[0-9][^/\n]*?)\s*$"
    for name, expr in re.findall(pattern, HEADER, re.M):
        # Only integer literals, shifts, parentheses and earlier names reach eval: our header.
        expr = re.sub(r"(?<=[0-9a-fA-F])(ULL|UL|U)\b", "", expr)
        out[name] = int(eval(expr, {"__builtins__": {}}, dict(out)))
    return out


def test_python_flags_match_the_header() -> None:
    defines = _defines()
    mirrored = (r"^(F_|REAL_F_|FAMILY_|REAL_NONE|RING_|CONN_|VIP_FILTER_|SRC_|GUARD_MODE_"
                r"|GUARD_WINDOW|RL_)")
    names = [n for n in dir(consts) if re.match(mirrored, n)]
    assert names, "no flag constants found in lb.consts"
    for name in names:
        assert name in defines, f"{name} is in lb/consts.py but not #defined in xdp/common/consts.h"
        assert getattr(consts, name) == defines[name], f"{name} differs between C and Python"
    for name in defines:
        both = r"^(F_|REAL_F_|CONN_|VIP_FILTER_|SRC_|GUARD_MODE_|RL_SLOTS)"
        if re.match(both, name) and name not in TUNABLES:
            assert hasattr(consts, name), f"{name} is in xdp/common/consts.h, not in lb/consts.py"


def test_counter_slots_match_the_header_enum() -> None:
    body = re.search(r"enum glob_stat \{(.*?)\};", HEADER, re.S)
    assert body, "enum glob_stat not found in xdp/common/consts.h"
    text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    names = [n.split("=")[0].strip() for n in text.split(",") if n.strip()]
    assert names[-1] == "STAT_MAX"
    assert tuple(names[:-1]) == consts.GLOB_STATS
