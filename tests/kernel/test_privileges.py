"""The daemon's data plane as an unprivileged user with CAP_BPF, CAP_NET_ADMIN and
CAP_PERFMON only: first start, restart (pins reopened by path), upgrade, and a refusal that
names the capability when one is missing.

systemd is not PID 1 on the test machines, so the unit's User= and AmbientCapabilities= are
reproduced with setpriv (uid nobody, exactly those ambient capabilities, no-new-privs),
inside the test's network namespace (nsenter as root: entering a namespace needs
CAP_SYS_ADMIN, which the service does not have; on a host its interface is in its own
namespace). The child runs the system Python on the project venv's packages, because the
venv's interpreter lives under root's home.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel import flows
from tests.kernel.conftest import Veth

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
CAPS = ("bpf", "net_admin", "perfmon")
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _others_can_reach(path: Path) -> bool:
    """Every directory down to `path` lets other users through (o+x)."""
    return all(os.stat(d).st_mode & 0o001 for d in [*reversed(path.parents), path])


def _system_python_matches() -> bool:
    if not SYSTEM_PYTHON.exists() or shutil.which("setpriv") is None:
        return False
    site = Path(sysconfig.get_paths()["purelib"])
    if not (_others_can_reach(ROOT) and _others_can_reach(site)):
        return False  # a checkout under a private home: nobody cannot import it
    v = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                       capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return v == str(sys.version_info[:2])


requires_setpriv = pytest.mark.skipif(
    not _system_python_matches(),
    reason="needs setpriv, a system python3 of the venv's version (the venv's own"
    " interpreter may not be reachable by an unprivileged user), and a checkout and venv"
    " that other users can read",
)


@pytest.fixture
def service_dirs(pin_dir: Path) -> Iterator[tuple[Path, Path]]:
    """(config file, state dir) owned by nobody, and the pin dir made nobody's."""
    base = Path(tempfile.mkdtemp(prefix="xlbt-priv-"))
    try:
        os.chmod(base, 0o755)
        state = base / "state"
        state.mkdir()
        pin_dir.mkdir(parents=True, exist_ok=True)
        for p in (state, pin_dir):
            os.chown(p, NOBODY, NOBODY)
        config = flows.write_config(base / "xlb.toml", pin_dir, state)
        os.chmod(config, 0o644)
        yield config, state
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(veth: Veth, mode: str, config: Path, caps: tuple[str, ...] = CAPS) -> dict[str, Any]:
    site = sysconfig.get_paths()["purelib"]
    bcc_only = Path(sys.prefix) / "bcc-only"
    capset = ",".join(["-all", *(f"+{c}" for c in caps)])
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, hiding bpffs.
    cmd = ["nsenter", f"--net=/run/netns/{veth.ns}",
           "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
           f"--inh-caps={capset}", f"--ambient-caps={capset}", "--no-new-privs",
           "env", "HOME=/tmp", f"PYTHONPATH={ROOT}:{site}:{bcc_only}",
           str(SYSTEM_PYTHON), "-m", "tests.kernel.priv_child",
           mode, str(config), veth.a]  # fmt: skip
    # The child compiles the balancer: minutes under qemu's TCG (make test-kernels).
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert p.stdout.strip(), f"no answer from the child (exit {p.returncode}): {p.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    out["exit"] = p.returncode
    return out


@requires_setpriv
def test_start_restart_and_upgrade_as_nobody_with_three_capabilities(
    veth: Veth, service_dirs: tuple[Path, Path]
) -> None:
    config, _ = service_dirs
    first = _run(veth, "seed", config)
    assert first["exit"] == 0 and first["uid"] == NOBODY, first
    assert first["before"] == flows.SEEDED, first
    assert first["steer"] == str(flows.CONN_BACKEND), first

    again = _run(veth, "restart", config)
    assert again["exit"] == 0, again
    assert again["before"] == first["after"], "the restart did not reuse the pinned maps"
    assert again["replaced"] == first["prog_id"], "its own earlier program was not replaced"
    assert "our program" in again["reason"], again["reason"]
    assert again["steer"] == str(flows.CONN_BACKEND), "the tracked flow moved"

    up = _run(veth, "upgrade", config)
    assert up["exit"] == 0 and up["before"] == again["after"], up
    assert up["upgrade_replaced"] == up["prog_id"] != up["upgraded_to"], up
    assert up["steer"] == str(flows.CONN_BACKEND)


@requires_setpriv
@pytest.mark.parametrize("dropped", CAPS)
def test_a_missing_capability_is_named_in_one_line(
    veth: Veth, service_dirs: tuple[Path, Path], dropped: str
) -> None:
    config, _ = service_dirs
    out = _run(veth, "seed", config, tuple(c for c in CAPS if c != dropped))
    assert out["exit"] == 3, out
    msg = out["error"]
    assert "\n" not in msg
    assert msg.startswith(f"missing capability CAP_{dropped.upper()}: "), msg
