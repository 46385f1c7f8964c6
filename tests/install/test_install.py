"""`lbctl install` from the built wheel: into a temporary root (files, modes, owners, unit
content, an upgrade that keeps the operator's files, uninstall with and without --purge), and
for real on this host (slow): the user, the units, then the daemon started as xlb.service
would start it, answering a REST request, and everything removed again.

systemd is not PID 1 on the test machines, so the real install's daemon is started with
setpriv as the unit says (User=, AmbientCapabilities=, CapabilityBoundingSet=,
NoNewPrivileges=, Environment=, ExecStartPre=+ as root, then ExecStart=), in a network
namespace of the test's own so its port 9780 is private. ProtectSystem=, PrivateTmp= and the
directories systemd would make are what setpriv cannot reproduce; the installer makes the
state directory itself, as StateDirectory= would.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.install import layout, units
from lb.install.config import default_toml
from lb.install.installer import SYSTEM_PYTHON, Target, install, uninstall, user_exists

ROOT = Path(__file__).resolve().parents[2]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, useradd)")
needs_python = pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason=f"no {SYSTEM_PYTHON}")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _owner(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_uid, st.st_gid


def _verify(unit_files: list[Path]) -> None:
    p = subprocess.run(["systemd-analyze", "verify", *map(str, unit_files)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, f"systemd-analyze verify: {p.stdout}{p.stderr}"


def _instance(unit: Path, dest: Path, instance: str) -> Path:
    """A copy of the template unit named as its instance (what `systemctl start` loads)."""
    out = dest / unit.name.replace("@.", f"@{instance}.")
    out.write_text(unit.read_text())
    return out


@pytest.fixture(scope="module")
def staged(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Target:
    """The wheel installed under a temporary root by the README's command, as printed
    (`PYTHONPATH=$WHEEL python3 -m lbctl install --wheel $WHEEL`) plus `--root`: the system
    Python with nothing but the wheel on its path, so the installer needs only the stdlib."""
    if os.geteuid() != 0 or not SYSTEM_PYTHON.exists():
        pytest.skip(f"needs root and {SYSTEM_PYTHON}")
    root = tmp_path_factory.mktemp("root")
    p = subprocess.run([str(SYSTEM_PYTHON), "-m", "lbctl", "install", "--wheel", str(wheel),
                        "--root", str(root)], cwd="/", capture_output=True, text=True,
                       timeout=600, check=False,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(wheel)})
    assert p.returncode == 0, f"lbctl install: {p.stdout[-2000:]}{p.stderr[-3000:]}"
    return Target(root=root, say=lambda _m: None)


@needs_root
@needs_python
def test_install_into_a_root_lays_out_venv_units_config_and_token(
    staged: Target, tmp_path: Path
) -> None:
    t = staged
    lbctl = t.venv / "bin" / "lbctl"
    assert lbctl.is_file() and _mode(lbctl) & 0o111
    p = subprocess.run([str(t.venv / "bin" / "python"), "-c",
                        "import lb, bcc, xlb_api, sys; print(lb.__file__, sys._base_executable)"],
                       cwd=t.root, capture_output=True, text=True, check=True,
                       env={"PATH": "/usr/bin:/bin"})
    lb_file, base = p.stdout.split()
    assert Path(lb_file).is_relative_to(t.venv), "lb is not imported from the venv"
    for name in layout.UNITS:
        shipped = Path(lb_file).parent / "install" / "units" / name
        assert shipped.read_text() == units.text(name), f"the wheel does not ship {name}"
    assert Path(base).resolve() == SYSTEM_PYTHON.resolve(), "the venv is not the system Python's"
    for name in layout.UNITS:
        f = t.at(layout.UNIT_DIR) / name
        assert f.read_text() == units.text(name), f"{name} is not the shipped unit"
        assert _mode(f) == 0o644 and _owner(f) == (0, 0)
    toml = t.at(layout.CONFIG_FILE)
    assert toml.read_text() == default_toml(), "xlb.toml is not the generated defaults"
    assert _mode(toml) == 0o644 and _mode(toml.parent) == 0o755
    token = t.at(layout.TOKEN_FILE)
    assert _mode(token) == 0o640 and len(token.read_text().strip()) >= 32
    state = t.at(layout.STATE_DIR)
    assert state.is_dir() and _mode(state) == 0o700
    rec = json.loads((t.venv / "install.json").read_text())
    assert rec["prefix"] == str(layout.PREFIX) and rec["created_user"] is False
    res = subprocess.run([str(lbctl), "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "uninstall" in res.stdout, res.stderr[-2000:]
    # The units as they would run from this venv: systemd-analyze checks their syntax and
    # that every command exists.
    here = tmp_path / "units"
    here.mkdir()
    rendered = []
    for name in layout.UNITS:
        (here / name).write_text(units.render(name, t.venv))
        rendered.append(here / name)
    _verify([rendered[0], _instance(rendered[1], here, "eth0")])


@needs_root
@needs_python
def test_reinstall_keeps_the_operators_files_and_uninstall_keeps_state(
    staged: Target, wheel: Path
) -> None:
    t = staged
    toml, token = t.at(layout.CONFIG_FILE), t.at(layout.TOKEN_FILE)
    toml.write_text('interface = "eth1"\n')
    secret = token.read_text()
    install(wheel, t)
    assert toml.read_text() == 'interface = "eth1"\n', "the operator's config was overwritten"
    assert toml.with_name("xlb.toml.default").read_text() == default_toml()
    assert token.read_text() == secret, "the token changed"
    (t.at(layout.STATE_DIR) / "store.db").write_text("x")
    uninstall(t)
    assert not t.venv.exists()
    assert not any((t.at(layout.UNIT_DIR) / n).exists() for n in layout.UNITS)
    assert toml.exists() and token.exists() and (t.at(layout.STATE_DIR) / "store.db").exists()
    uninstall(t, purge=True)
    assert not t.at(layout.CONFIG_DIR).exists() and not t.at(layout.STATE_DIR).exists()


# The real install.

NS = f"xlbt{os.getpid()}-inst"


@pytest.fixture
def real_install(wheel: Path) -> Iterator[Target]:
    """xlb installed on this host; uninstalled with --purge (user too) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if layout.PREFIX.exists() or user_exists() or layout.PIN_DIR.exists() \
            or layout.CONFIG_DIR.exists():
        pytest.skip(f"xlb is installed on this host ({layout.PREFIX}, user {layout.USER}): "
                    "the test installs and purges its own")
    t = Target(say=lambda _m: None)
    try:
        install(wheel, t)
        yield t
    finally:
        uninstall(t, purge=True)
        # What a failed install may have left before it recorded anything.
        with contextlib.suppress(KeyError, subprocess.CalledProcessError):
            if user_exists():
                subprocess.run(["userdel", layout.USER], check=True, capture_output=True)
    left = [p for p in (layout.PREFIX, layout.CONFIG_DIR, layout.STATE_DIR, layout.PIN_DIR,
                        *(layout.UNIT_DIR / n for n in layout.UNITS)) if p.exists()]
    assert not left and not user_exists(), f"uninstall --purge left {left}"


@pytest.fixture
def test_netns() -> Iterator[str]:
    """A namespace of the test's own with lo up (the daemon's 127.0.0.1:9780)."""
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
        yield NS
    finally:
        subprocess.run(["ip", "netns", "delete", NS], check=False)


def as_unit(unit: str, ns: str) -> tuple[list[list[str]], list[str], dict[str, str]]:
    """(ExecStartPre= commands run as root, ExecStart= under setpriv as the unit's user with
    its capabilities, the environment) read from an installed unit file."""
    svc = units.section((layout.UNIT_DIR / unit).read_text())
    user, group = svc["User"][-1], svc["Group"][-1]
    caps = [c.removeprefix("CAP_").lower() for c in svc["AmbientCapabilities"][-1].split()]
    bounding = [c.removeprefix("CAP_").lower() for c in svc["CapabilityBoundingSet"][-1].split()]
    assert svc["NoNewPrivileges"] == ["yes"]
    amb = ",".join(["-all", *(f"+{c}" for c in caps)])
    bnd = ",".join(["-all", *(f"+{c}" for c in bounding)])
    pre = [shlex.split(c.removeprefix("+")) for c in svc.get("ExecStartPre", [])]
    assert all(c.startswith("+") for c in svc.get("ExecStartPre", [])), "a Pre not run as root"
    start = ["nsenter", f"--net=/run/netns/{ns}", "setpriv", f"--reuid={user}",
             f"--regid={group}", "--clear-groups", f"--inh-caps={amb}", f"--ambient-caps={amb}",
             f"--bounding-set={bnd}", "--no-new-privs", *shlex.split(svc["ExecStart"][-1])]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    for e in svc.get("Environment", []):
        k, _, v = e.partition("=")
        env[k] = v
    return pre, start, env


@pytest.mark.slow
@needs_python
def test_real_install_runs_the_daemon_as_the_unit_and_serves_rest(
    real_install: Target, test_netns: str, tmp_path: Path
) -> None:
    pw = pwd.getpwnam(layout.USER)
    assert pw.pw_shell == "/usr/sbin/nologin" and pw.pw_dir == str(layout.STATE_DIR)
    assert _owner(layout.TOKEN_FILE) == (0, pw.pw_gid) and _mode(layout.TOKEN_FILE) == 0o640
    assert _owner(layout.STATE_DIR) == (pw.pw_uid, pw.pw_gid)
    _verify([layout.UNIT_DIR / layout.SERVICE,
             _instance(layout.UNIT_DIR / layout.BACKEND_SERVICE, tmp_path, "eth0")])
    pre, start, env = as_unit(layout.SERVICE, test_netns)
    for cmd in pre:
        subprocess.run(cmd, check=True, timeout=60)
    assert _owner(layout.PIN_DIR) == (pw.pw_uid, pw.pw_gid)
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(start, cwd="/", env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        lbctl = [str(layout.PREFIX / "bin" / "lbctl")]
        client = ["nsenter", f"--net=/run/netns/{test_netns}", *lbctl, "-o", "json"]
        deadline = time.monotonic() + 600
        while True:
            assert daemon.poll() is None, f"the daemon exited: {log.read_text()[-3000:]}"
            r = subprocess.run([*client, "vip", "list"], capture_output=True, text=True,
                               check=False, env={"PATH": env["PATH"]})
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, f"no answer: {r.stderr}{log.read_text()[-3000:]}"
            time.sleep(0.2)
        assert json.loads(r.stdout) == {"data": [], "count": 0}, r.stdout
        st = Path(f"/proc/{daemon.pid}/status").read_text()
        assert f"Uid:\t{pw.pw_uid}\t{pw.pw_uid}" in st, "the daemon does not run as xlb"
        assert any(p.name.startswith("vip") or p.is_file() for p in layout.PIN_DIR.iterdir())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(15)
