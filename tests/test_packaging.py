"""An installed xlb works outside the checkout: the wheel carries the data plane's sources and
the C extensions, a fresh venv in a temporary directory compiles the balancer and runs a packet
through it, and `lbctl --help` answers.

BCC's Python module is exposed to that venv the way scripts/setup.sh does it (one package
linked through a .pth file); the wheel's dependencies come from pip (its cache, usually).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BCC_SRC = Path("/usr/lib/python3/dist-packages/bcc")

pytestmark = [pytest.mark.slow]

# What the installed copy runs: the balancer compiled from the packaged sources, one packet to
# an address no VIP uses (passed, and counted), the C extensions imported from the wheel.
PROBE = r"""
import sys
from pathlib import Path

import lb
from lb.config import DataplaneConfig, xdp_source_dir
from lb.consts import XDP_PASS
from lb.control import _maglev
from lb.dataplane import _conntab
from lb.dataplane.flowhash import Flow5
from lb.dataplane.loader import loaded_balancer
from lb.dataplane.testrun import TestRunner
from lb.ops.explain import build_packet
from lb.ops.stats import StatsReader

checkout = Path(sys.argv[1])
for mod in (lb, _maglev, _conntab):
    assert checkout not in Path(mod.__file__).resolve().parents, f"{mod.__name__} from the checkout"
assert checkout not in xdp_source_dir().parents, xdp_source_dir()
config = DataplaneConfig(max_vips=4, max_reals=16, ring_size=4099, conn_table_size=65536)
with loaded_balancer(config) as b:
    frame = build_packet(Flow5.of("198.18.2.1", "198.18.9.9", 40000, 80, "tcp"))
    result = TestRunner(b.prog_fd).run(frame)
    assert result.verdict == XDP_PASS, result.verdict
    passed = sum(StatsReader(b).glob()["STAT_PASS_NON_VIP"])
    assert passed == 1, passed
print("ok", xdp_source_dir())
"""


@dataclass(frozen=True)
class Installed:
    """A fresh venv with the built wheel installed, outside the checkout."""

    dir: Path
    python: Path
    wheel: Path

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command from the venv's directory, with nothing of the checkout's on the path."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run(argv, cwd=self.dir, env=env, capture_output=True, text=True,
                              timeout=timeout)


def _check(res: subprocess.CompletedProcess[str], what: str) -> None:
    assert res.returncode == 0, f"{what} failed ({res.returncode}):\n{res.stdout[-3000:]}\n" \
                                f"{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("wheel")
    assert ROOT not in base.parents
    dist = base / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "-q", "-w", str(dist), str(ROOT)], capture_output=True, text=True,
                         timeout=600)
    _check(res, "pip wheel")
    (wheel,) = dist.glob("xlb-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    if BCC_SRC.is_dir():
        (venv / "bcc-only").mkdir()
        (venv / "bcc-only" / "bcc").symlink_to(BCC_SRC)
        (site / "debian-bcc.pth").write_text(f"{venv / 'bcc-only'}\n")
    inst = Installed(base, python, wheel)
    _check(inst.run(str(python), "-m", "pip", "install", "-q", str(wheel), timeout=900),
           "pip install of the wheel")
    yield inst


def test_the_wheel_carries_the_sources_and_the_extensions(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for src in ("balancer/balancer.c", "balancer/conn.h", "common/consts.h", "decap/decap.c",
                "hc_encap/hc_encap.c"):
        assert f"lb/dataplane/xdp/{src}" in names, f"xdp/{src} is not in the wheel"
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    assert f"lb/control/_maglev{ext}" in names
    assert f"lb/dataplane/_conntab{ext}" in names
    assert "xlb_api/main.py" in names and "lbctl/main.py" in names
    tops = {n.split("/")[0] for n in names if not n.startswith("xlb-")}
    assert tops == {"lb", "lbctl", "xlb_api"}, f"top-level names in the wheel: {sorted(tops)}"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_lbctl_help_works_installed(installed: Installed) -> None:
    res = installed.run(str(installed.python.parent / "lbctl"), "--help")
    _check(res, "lbctl --help")
    assert "Operate an xlb load balancer" in res.stdout


@pytest.mark.bpf
def test_the_installed_copy_compiles_and_runs_a_packet(installed: Installed) -> None:
    res = installed.run(str(installed.python), "-c", PROBE, str(ROOT), timeout=300)
    _check(res, "the installed balancer")
    assert res.stdout.startswith("ok "), res.stdout
    assert str(installed.dir) in res.stdout, "the sources were not the installed ones"
