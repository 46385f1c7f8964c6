"""The units and the default configuration agree with the code: the capabilities with
lb.dataplane.privileges, the paths with lb.install.layout and lb.settings' defaults, and
/etc/xlb/xlb.toml with every setting of lb.settings.Settings at its default."""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from lb.dataplane.privileges import REQUIRED
from lb.fleet.bgp import CAPABILITIES as BGP_CAPABILITIES
from lb.install import layout, units
from lb.install.config import UNSET, default_toml
from lb.settings import Settings, load_settings


def test_the_daemon_unit_grants_exactly_the_required_capabilities() -> None:
    svc = units.section(units.text(layout.SERVICE))
    assert set(units.service_caps()) == set(REQUIRED) | set(BGP_CAPABILITIES)
    assert svc["CapabilityBoundingSet"] == svc["AmbientCapabilities"]
    assert units.service_user() == layout.USER == svc["Group"][-1]
    assert svc["NoNewPrivileges"] == ["yes"]
    assert svc["ProtectSystem"] == ["strict"]


def test_the_daemon_unit_uses_the_layout_and_the_settings_defaults() -> None:
    svc = units.section(units.text(layout.SERVICE))
    defaults = Settings.model_construct()
    assert Path("/var/lib") / svc["StateDirectory"][-1] == layout.STATE_DIR
    assert defaults.state_dir == layout.STATE_DIR and defaults.pin_dir == layout.PIN_DIR
    assert Path("/run") / svc["RuntimeDirectory"][-1] == layout.RUNTIME_DIR
    assert Path("/etc") / svc["ConfigurationDirectory"][-1] == layout.CONFIG_DIR
    start = shlex.split(svc["ExecStart"][-1])
    assert start == [str(layout.PREFIX / "bin/lbctl"), "serve", "--config",
                     str(layout.CONFIG_FILE)]
    pre = shlex.split(svc["ExecStartPre"][-1].removeprefix("+"))
    assert pre[pre.index("--pin-dir") + 1] == str(layout.PIN_DIR)
    assert pre[pre.index("--user") + 1] == layout.USER
    env = dict(e.split("=", 1) for e in svc["Environment"])
    assert env["XLB_API_TOKEN_FILE"] == str(layout.TOKEN_FILE)


def test_the_daemon_unit_restarts_without_detaching() -> None:
    svc = units.section(units.text(layout.SERVICE))
    assert svc["Restart"] == ["always"]
    assert "--detach-on-exit" not in svc["ExecStart"][-1]
    assert not svc.get("ExecStop"), "an ExecStop would run between crash and restart"
    # mixed or control-group would SIGKILL the BGP speaker (in the unit's cgroup) at each stop.
    assert svc["KillMode"] == ["process"], "a restart would kill the BGP speaker"


def test_the_backend_unit_brings_the_interface_up_and_down() -> None:
    svc = units.section(units.text(layout.BACKEND_SERVICE))
    assert svc["Type"] == ["oneshot"] and svc["RemainAfterExit"] == ["yes"]
    assert "backend-host up --interface %i" in svc["ExecStart"][-1]
    assert "backend-host down --interface %i" in svc["ExecStop"][-1]
    assert Path("/var/lib") / svc["StateDirectory"][-1] == layout.BACKEND_STATE_DIR
    assert set(svc["CapabilityBoundingSet"][-1].split()) == set(REQUIRED)


def test_render_moves_only_the_prefix(tmp_path: Path) -> None:
    body = units.render(layout.SERVICE, tmp_path / "venv")
    assert f"{tmp_path}/venv/bin/lbctl serve" in body
    assert str(layout.PREFIX) not in body
    assert body.replace(f"{tmp_path}/venv/", f"{layout.PREFIX}/") == units.text(layout.SERVICE)


def _every_field(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _every_field(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_the_config_file_names_every_setting_commented_at_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = default_toml()
    assert not [ln for ln in text.splitlines() if ln and not ln.startswith("#")], \
        "a setting is not commented out"
    # Uncommented, the file is valid TOML and its values are the defaults.
    live = "\n".join(ln[1:] for ln in text.splitlines()
                     if re.match(r"^#(\[|\w+ = )", ln) and not ln.endswith(UNSET))
    parsed = tomllib.loads(live)
    seen, section = [], ""
    for line in text.splitlines():
        if m := re.match(r"^#\[([\w.]+)\]$", line):
            section = m.group(1) + "."
        elif m := re.match(r"^#(\w+) = ", line):
            seen.append(section + m.group(1))
    assert sorted(seen) == sorted(_every_field(Settings)), "settings missing from the file"
    for name in [k for k in os.environ if k.startswith("XLB_")]:
        monkeypatch.delenv(name)
    f = tmp_path / "xlb.toml"
    f.write_text(live)
    assert load_settings(f) == load_settings(), "an uncommented default differs from the code's"
    assert parsed["dataplane"]["ring_size"] == Settings.model_construct().dataplane.ring_size
