"""The systemd units shipped in the wheel (lb/install/units/), read and rendered.

`render` substitutes the install prefix; `service_section` parses a unit's [Service] keys the
way the setpriv test needs them (User=, AmbientCapabilities=, NoNewPrivileges=).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lb.install import layout


def text(name: str) -> str:
    """The unit file `name` as shipped (paths under layout.PREFIX)."""
    return resources.files("lb.install").joinpath("units", name).read_text()


def render(name: str, prefix: Path = layout.PREFIX) -> str:
    """The unit with its commands under `prefix` instead of /opt/xlb."""
    body = text(name)
    if prefix != layout.PREFIX:
        body = body.replace(f"{layout.PREFIX}/", f"{prefix}/")
    return body


def section(body: str, name: str = "Service") -> dict[str, list[str]]:
    """The keys of one [section] of a unit: key -> its values, in order (keys repeat)."""
    out: dict[str, list[str]] = {}
    current = None
    for raw in body.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current == name and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def service_caps(name: str = layout.SERVICE) -> tuple[str, ...]:
    """The ambient capabilities a unit gives its process (`CAP_BPF`, ...), in unit order."""
    caps: list[str] = []
    for value in section(text(name)).get("AmbientCapabilities", []):
        caps += value.split()
    return tuple(caps)


def service_user(name: str = layout.SERVICE) -> str:
    """The unit's User=."""
    return section(text(name))["User"][-1]
