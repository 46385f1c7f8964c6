"""Settings: TOML file, XLB_* environment, keyword overrides; errors name the field and rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lb.errors import InvalidInput
from lb.settings import CONFIG_ENV, Settings, load_settings

FILE = """\
interface = "xv0"
xdp_mode = "generic"
pin_dir = "/sys/fs/bpf/xlb-file"

[dataplane]
ring_size = 4099
max_vips = 8

[runtime]
gateway_mac = "02:00:00:00:00:FE"
gue_port = 7000
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No XLB_* variable of the calling shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("XLB_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A TOML file with a few settings of every section."""
    p = tmp_path / "xlb.toml"
    p.write_text(FILE)
    return p


def test_defaults_attach_nothing() -> None:
    s = load_settings()
    assert s.interface is None
    assert s.xdp_mode == "auto"
    assert s.pin_dir == Path("/sys/fs/bpf/xlb")
    assert s.state_dir == Path("/var/lib/xlb")
    assert s.gateway_mac_unset


def test_file_values_reach_the_composed_models(config_file: Path) -> None:
    s = load_settings(config_file)
    assert (s.interface, s.xdp_mode) == ("xv0", "generic")
    assert s.dataplane.ring_size == 4099 and s.dataplane.max_vips == 8
    assert s.dataplane.max_reals == 4096, "unset dataplane fields keep DataplaneConfig defaults"
    assert s.runtime.gateway_mac == "02:00:00:00:00:fe"
    assert s.runtime.gue_port == 7000
    assert not s.gateway_mac_unset


def test_env_beats_file_and_merges_nested(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XLB_XDP_MODE", "native")
    monkeypatch.setenv("XLB_DATAPLANE__MAX_VIPS", "16")
    monkeypatch.setenv("XLB_RUNTIME__UDP_TIMEOUT_S", "5")
    s = load_settings(config_file)
    assert s.xdp_mode == "native"
    assert s.dataplane.max_vips == 16
    assert s.dataplane.ring_size == 4099, "the file's sibling key survives the env override"
    assert s.runtime.udp_timeout_s == 5.0
    assert s.runtime.gue_port == 7000


def test_keyword_overrides_beat_env(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLB_XDP_MODE", "native")
    assert load_settings(config_file, xdp_mode="auto").xdp_mode == "auto"


def test_xlb_config_names_the_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(config_file))
    assert load_settings().interface == "xv0"
    assert Settings().interface == "xv0", "a bare Settings() honours XLB_CONFIG too"


def test_empty_interface_from_env_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLB_INTERFACE", "")
    assert load_settings().interface is None


@pytest.mark.parametrize(
    ("env", "field", "rule"),
    [
        ({"XLB_DATAPLANE__RING_SIZE": "4098"}, "dataplane.ring_size", "must be a prime"),
        ({"XLB_RUNTIME__RSS_V4": "198.19.0.0/24"}, "runtime.rss_v4", "must be a /16"),
        ({"XLB_RUNTIME__GATEWAY_MAC": "02:00"}, "runtime.gateway_mac", "must look like"),
        ({"XLB_XDP_MODE": "fast"}, "xdp_mode", "'native', 'generic' or 'auto'"),
        ({"XLB_PIN_DIR": "bpf/xlb"}, "pin_dir", "absolute path"),
        ({"XLB_INTERFACE": "a-very-long-interface"}, "interface", "<= 15 chars"),
    ],
    ids=["ring-not-prime", "rss-not-16", "bad-mac", "bad-mode", "relative-pin-dir", "long-name"],
)
def test_invalid_value_names_field_and_rule(
    env: dict[str, str], field: str, rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InvalidInput) as exc:
        load_settings()
    assert exc.value.field == field
    assert field in exc.value.detail and rule in exc.value.detail
    assert next(iter(env)) in exc.value.detail, "the message names the variable to fix"


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "xlb.toml"
    p.write_text('[dataplane]\nring = 7\n')
    with pytest.raises(InvalidInput) as exc:
        load_settings(p)
    assert exc.value.field == "dataplane.ring"
    assert "Extra inputs are not permitted" in exc.value.detail


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("missing.toml", None, "no such file"),
        ("xlb.yaml", "interface: x\n", "must be TOML"),
        ("broken.toml", "interface = \n", "invalid configuration file"),
    ],
    ids=["missing", "not-toml", "syntax-error"],
)
def test_bad_config_file_is_named(
    tmp_path: Path, name: str, content: str | None, expect: str
) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(InvalidInput) as exc:
        load_settings(p)
    assert exc.value.field == "config"
    assert expect in exc.value.detail and name in exc.value.detail
