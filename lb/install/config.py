"""/etc/xlb/xlb.toml as installed: every setting of lb.settings.Settings, commented out at its
default, with its description above it. Generated from the model, so it never drifts.

    python -m lb.install.config        prints it (`lbctl install` runs this in the new venv)
"""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from lb.settings import Settings

#: How an unset (None) default is written: TOML has no null.
UNSET = "(unset)"

HEADER = """\
# xlb settings (lb/settings.py). Every setting is shown commented out at its default:
# uncomment a line to change it. XLB_* environment variables override this file
# (XLB_INTERFACE, XLB_DATAPLANE__RING_SIZE, ...); the REST API's own settings are
# XLB_API_* variables (host, port, token file, TLS), see docs/install.md.
"""


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Network | ipaddress.IPv6Network


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, SecretStr):
        return json.dumps(v.get_secret_value())
    if isinstance(v, str | Path | _IP):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def _section(model: BaseModel, name: str, out: list[str]) -> None:
    nested: list[tuple[str, BaseModel]] = []
    lines: list[str] = []
    for field, info in type(model).model_fields.items():
        v = getattr(model, field)
        if isinstance(v, BaseModel):
            nested.append((f"{name}.{field}" if name else field, v))
            continue
        if info.description:
            lines.append(f"# {info.description}")
        lines.append(f"#{field} = {UNSET if v is None else _value(v)}")
    if name:
        out += ["", f"#[{name}]"]
    out += lines
    for sub, v in nested:
        _section(v, sub, out)


def default_toml(settings: Settings | None = None) -> str:
    """The configuration file: each setting of `settings` (default: the defaults), commented."""
    out: list[str] = []
    # model_construct: the defaults alone, whatever XLB_* variables the installer runs with.
    _section(settings or Settings.model_construct(), "", out)
    return HEADER + "\n".join(out).lstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(default_toml())
