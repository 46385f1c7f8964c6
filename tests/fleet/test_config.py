"""`store` and `[etcd]` settings: defaults, and refusals that name the field (no root)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lb.errors import InvalidInput
from lb.fleet import members as labetcd
from lb.settings import load_settings


def test_sqlite_is_the_default_store() -> None:
    s = load_settings()
    assert s.store == "sqlite"
    assert s.etcd.endpoints == ["127.0.0.1:2379"] and s.etcd.prefix == "/xlb/"


def test_etcd_from_a_config_file(tmp_path: Path) -> None:
    f = tmp_path / "xlb.toml"
    f.write_text('store = "etcd"\n[etcd]\nendpoints = ["198.18.0.1:2379", "[2001:db8::1]:2379"]\n'
                 'prefix = "/fleet-a"\nhost_name = "lb-a"\n')
    s = load_settings(f)
    assert s.store == "etcd" and s.etcd.host_name == "lb-a"
    assert s.etcd.endpoints == ["198.18.0.1:2379", "[2001:db8::1]:2379"]
    assert s.etcd.prefix == "/fleet-a/", "the prefix is one directory: a trailing / is added"


def test_etcd_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLB_STORE", "etcd")
    monkeypatch.setenv("XLB_ETCD__ENDPOINTS", '["127.0.0.1:23790"]')
    s = load_settings()
    assert s.store == "etcd" and s.etcd.endpoints == ["127.0.0.1:23790"]


@pytest.mark.parametrize(("overrides", "field", "words"), [
    ({"store": "mysql"}, "store", "'sqlite' or 'etcd'"),
    ({"etcd": {"endpoints": []}}, "etcd.endpoints", "at least one"),
    ({"etcd": {"endpoints": ["localhost"]}}, "etcd.endpoints", "host:port"),
    ({"etcd": {"endpoints": ["127.0.0.1:70000"]}}, "etcd.endpoints", "1-65535"),
    ({"etcd": {"endpoints": ["2001:db8::1]:2379"]}}, "etcd.endpoints", "IPv6"),
    ({"etcd": {"prefix": "xlb"}}, "etcd.prefix", "start with /"),
    ({"etcd": {"host_name": "lb a"}}, "etcd.host_name", "letters, digits"),
    ({"etcd": {"ca_file": "/nonexistent/ca.pem"}}, "etcd.ca_file", "no such file"),
    ({"etcd": {"timeout_s": 0}}, "etcd.timeout_s", "greater than 0"),
    ({"etcd": {"lease_ttl_s": 1}}, "etcd.lease_ttl_s", "greater than or equal to 2"),
    ({"etcd": {"username": "xlb"}}, "etcd", "got only username"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_etcd_settings_are_refused_naming_the_field(
    overrides: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(InvalidInput) as e:
        load_settings(**overrides)
    assert e.value.field == field, e.value.detail
    assert words in e.value.detail, e.value.detail


def test_a_password_is_never_echoed() -> None:
    with pytest.raises(InvalidInput) as e:
        load_settings(etcd={"password": "hunter2-secret"})
    assert "hunter2-secret" not in e.value.detail and "got only password" in e.value.detail


def test_half_a_client_certificate_is_refused(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(InvalidInput) as e:
        load_settings(etcd={"cert_file": str(cert)})
    assert "got only cert_file" in e.value.detail


def test_a_member_left_by_a_dead_process_is_swept(tmp_path: Path) -> None:
    if labetcd.etcd_binary() is None:
        pytest.skip("etcd is not installed (scripts/setup.sh installs etcd-server)")
    # A child starts a member and exits without stopping it (as a killed test run would).
    code = ("import sys, pathlib; from lb.fleet.members import EtcdCluster; "
            "c = EtcdCluster(pathlib.Path(sys.argv[1])); c.start(); "
            "print(c.members[0].proc.pid, flush=True)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "left")],
                         capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout.split()[0])
    assert Path(f"/proc/{pid}").exists(), "the member should still run"
    assert pid in labetcd.sweep_stale(), "the left member was not stopped"
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # reaped by init once it is gone
    assert not Path(f"/proc/{pid}").exists(), "the left member still runs"
