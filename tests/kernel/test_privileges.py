"""The daemon as the service unit runs it: an unprivileged user with only the unit's
capabilities (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON for the data plane, CAP_NET_BIND_SERVICE for
the BGP speaker), forwarding real connections in a lab, restarted and upgraded under traffic;
the maps surviving a restart; its BGP speaker announcing to the lab's router and kept across a
restart; and a refusal that names the capability when one is missing.

systemd is not PID 1 on the test machines, so nothing here starts lb/install/units/xlb.service:
setpriv reproduces what the unit gives the process (User=, AmbientCapabilities=,
CapabilityBoundingSet=, NoNewPrivileges=), with the capabilities read from the unit file
itself. The uid is nobody's, standing for the unit's `xlb` user, which only `lbctl install`
creates (tests/install/ runs the installed unit's command as `xlb`). The process enters the
test's network namespace with nsenter, as root, before setpriv drops everything: entering a
namespace needs CAP_SYS_ADMIN, which the service does not have (on a host its interface is in
its own namespace). The child runs the system Python on the project venv's packages, because
the venv's interpreter may live under root's home.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.client import ApiClient, ApiError
from lb.config import BgpConfig
from lb.dataplane import netlink
from lb.dataplane.privileges import REQUIRED
from lb.fleet.bgp import CAPABILITIES as BGP_CAPABILITIES
from lb.fleet.bgp import Speaker
from lb.install import units
from lb.lab import network as labmod
from lb.lab.network import Lab
from lb.lab.router import LB_ASN, ROUTER_ASN, Neighbor, RouterBird, kernel_nexthops
from tests.kernel import flows
from tests.kernel.conftest import Veth

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
#: setpriv's names of the unit's AmbientCapabilities= (bpf, net_admin, perfmon).
CAPS = tuple(c.removeprefix("CAP_").lower() for c in units.service_caps())
#: Every capability the unit grants, with its number and the call that needs it.
GRANTED = {**REQUIRED, **BGP_CAPABILITIES}
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


def as_the_unit(caps: tuple[str, ...] = CAPS) -> list[str]:
    """setpriv arguments giving a process what xlb.service gives it (see the module doc):
    uid and gid nobody, no groups, exactly `caps` inheritable, ambient and bounding, and
    no-new-privs; then the system Python with the checkout and the venv's packages."""
    site = sysconfig.get_paths()["purelib"]
    bcc_only = Path(sys.prefix) / "bcc-only"
    capset = ",".join(["-all", *(f"+{c}" for c in caps)])
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            f"--inh-caps={capset}", f"--ambient-caps={capset}", f"--bounding-set={capset}",
            "--no-new-privs",
            "env", "HOME=/tmp", f"PYTHONPATH={ROOT}:{ROOT / 'api'}:{site}:{bcc_only}",
            str(SYSTEM_PYTHON)]  # fmt: skip


def _run(veth: Veth, mode: str, config: Path, caps: tuple[str, ...] = CAPS) -> dict[str, Any]:
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, hiding bpffs.
    cmd = ["nsenter", f"--net=/run/netns/{veth.ns}", *as_the_unit(caps),
           "-m", "tests.kernel.priv_child", mode, str(config), veth.a]  # fmt: skip
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


# The daemon itself (`lbctl serve`) in a lab: client -> router -> LB (XDP) -> backends.


class UnitDaemon:
    """`lbctl serve` in the lab's LB namespace as the unit runs it, with its own files (config,
    state, token, socket) in a directory owned by the daemon's uid, and the lab's pins."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.run_dir / "unit"
        self.socket = self.dir / "api.sock"
        self.token = self.dir / "token"
        self.log = self.dir / "daemon.log"
        self.pid: int | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(lab.run_dir, 0o755)
        lab.lb_pin_dir.mkdir(parents=True, exist_ok=True)
        # As `lbctl install` does: the token exists before the first start.
        self.token.write_text(secrets.token_urlsafe(32) + "\n")
        os.chmod(self.token, 0o600)
        for p in (self.dir, lab.lb_pin_dir, self.token):
            os.chown(p, NOBODY, NOBODY)

    def argv(self, caps: tuple[str, ...] = CAPS, extra_toml: str = "") -> list[str]:
        """The command: nsenter (as root), setpriv as the unit, `lbctl serve`."""
        config = self.dir / "xlb.toml"
        state = self.dir / "state"
        config.write_text(
            self.lab.settings_toml().replace(str(self.lab.host_dir / "state"), str(state))
            + extra_toml
        )
        os.chmod(config, 0o644)
        return ["nsenter", f"--net=/run/netns/{self.lab.lb_ns}", *as_the_unit(caps),
                "-m", "lbctl", "serve", "--config", str(config), "--uds", str(self.socket),
                "--token-file", str(self.token), "--log-level", "warning"]  # fmt: skip

    def api(self) -> ApiClient:
        """The daemon's REST API over its unix socket."""
        return ApiClient(f"unix://{self.socket}", token_file=self.token, timeout=10)

    def start(self, extra_toml: str = "", timeout: float = 900) -> int:
        """Start it and wait for /readyz (the child compiles the balancer)."""
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.pid = os.posix_spawnp("nsenter", self.argv(extra_toml=extra_toml),
                                       dict(os.environ), setsid=True,
                                       file_actions=[(os.POSIX_SPAWN_DUP2, fd, 1),
                                                     (os.POSIX_SPAWN_DUP2, fd, 2)])
        finally:
            os.close(fd)
        deadline = time.monotonic() + timeout
        while True:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                self.pid = None
                raise AssertionError(f"the daemon exited: {self.log.read_text()[-3000:]}")
            if self.socket.exists():
                with contextlib.suppress(OSError, ApiError):
                    if self.api().request("GET", "/readyz")[0] == 200:
                        return self.pid
            assert time.monotonic() < deadline, f"not ready: {self.log.read_text()[-3000:]}"
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (as systemd stops a unit) and reap it."""
        if self.pid is None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            _wait(self.pid, 15)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            _wait(self.pid, 15)
        self.pid = None


def _wait(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(str(pid), timeout)
        time.sleep(0.05)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.fixture(scope="module")
def unit_lab(test_prefix: str) -> Iterator[Lab]:
    """A lab of its own (two backends, servers, no daemon), removed by its prefix."""
    lab = Lab(prefix=f"{test_prefix}p", backends=2)
    labmod.up(lab)
    try:
        yield lab
    finally:
        labmod.down(lab.prefix)


@pytest.fixture
def daemon(unit_lab: Lab) -> Iterator[UnitDaemon]:
    """The unit-like daemon of the lab, stopped after the test (the program stays attached)."""
    d = UnitDaemon(unit_lab)
    try:
        yield d
    finally:
        d.stop()


def _forwards(lab: Lab, count: int = 40) -> None:
    tally = labmod.http_requests(lab, lab.vip4, count, workers=4)
    assert not tally.failures, f"connections failed: {tally.failures}"
    assert set(tally.per_backend) == {f"b{i}" for i in lab.backend_ids}, tally.per_backend


def _alive(streams: list[labmod.Stream], what: str) -> None:
    before = [s.echoes for s in streams]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        s.alive and s.echoes - b < 3 for s, b in zip(streams, before, strict=True)
    ):
        time.sleep(0.05)
    broken = [f"{s.backend}: {s.error}" for s in streams if not s.alive]
    assert not broken, f"connections broke {what}: {broken}"


@requires_setpriv
def test_the_unit_daemon_forwards_connections_across_restart_and_upgrade(
    unit_lab: Lab, daemon: UnitDaemon
) -> None:
    lab = unit_lab
    pid = daemon.start()
    st = _status(pid)
    assert st["Uid"].split()[:2] == [str(NOBODY)] * 2, st["Uid"]
    assert st["NoNewPrivs"] == "1"
    want = sum(1 << GRANTED[name][0] for name in units.service_caps())
    assert int(st["CapEff"], 16) == int(st["CapAmb"], 16) == int(st["CapBnd"], 16) == want, st
    api = daemon.api()
    for port in (labmod.HTTP_PORT, labmod.STREAM_PORT):
        api.post("/v1/vips", {"protocol": "tcp", "address": lab.vip4, "port": port,
                              "backends": [{"address": lab.backend4(i), "weight": 1}
                                           for i in lab.backend_ids]})  # fmt: skip
    _forwards(lab)
    first = netlink.link_info(lab.lb_ns, labmod.LB_IF).xdp_prog_id
    streams = labmod.open_streams(lab, lab.vip4, 4, port=labmod.STREAM_PORT)
    try:
        state = api.get("/v1/state")
        daemon.stop()
        _alive(streams, "while the daemon was stopped")
        _forwards(lab, 10)
        daemon.start()
        _alive(streams, "across the restart")
        _forwards(lab)
        restarted = netlink.link_info(lab.lb_ns, labmod.LB_IF).xdp_prog_id
        assert restarted not in (None, first), "the restart did not replace its own program"
        assert daemon.api().get("/v1/state") == state, "the restart lost state"

        daemon.stop()
        daemon.start(extra_toml="\n[dataplane.features]\nicmp_echo = false\n")
        _alive(streams, "across the upgrade")
        _forwards(lab)
        upgraded = netlink.link_info(lab.lb_ns, labmod.LB_IF).xdp_prog_id
        assert upgraded not in (None, restarted), "the upgrade did not replace the program"
    finally:
        for s in streams:
            s.close()


def _bgp_toml(lab: Lab) -> str:
    """[bgp] of the LB host: one IPv4 session to the lab's router, short timers."""
    return (f"\n[bgp]\nenabled = true\nasn = {LB_ASN}\nrouter_id = \"{lab.lb4}\"\n"
            f"hold_time = 3\npeers = [{{ address = \"{lab.router_lb4}\", asn = {ROUTER_ASN} }}]\n")


@requires_setpriv
@pytest.mark.skipif(shutil.which("bird") is None, reason="BIRD 2 is not installed (setup.sh)")
def test_the_unit_daemon_announces_by_bgp_and_keeps_the_session_across_a_restart(
    unit_lab: Lab, daemon: UnitDaemon
) -> None:
    lab = unit_lab
    router = RouterBird(ns=lab.router_ns, run_dir=lab.run_dir / "bgp-router",
                        router_id=lab.router_client4, neighbors=(Neighbor("lb1_4", lab.lb4),))
    # The speaker the daemon starts as the unit's user, found by its files (stopped by pid).
    speaker = Speaker(BgpConfig(), daemon.dir / "state" / "bgp")
    router.start()
    try:
        daemon.start(extra_toml=_bgp_toml(lab))
        api = daemon.api()
        if not api.get("/v1/vips")["count"]:  # the lab's state may hold them already
            api.post("/v1/vips", {"protocol": "tcp", "address": lab.vip4,
                                  "port": labmod.HTTP_PORT,
                                  "backends": [{"address": lab.backend4(i), "weight": 1}
                                               for i in lab.backend_ids]})  # fmt: skip
        deadline = time.monotonic() + 30
        while not kernel_nexthops(lab.router_ns, f"{lab.vip4}/32"):
            peers = api.get("/v1/host")["peers"]
            assert time.monotonic() < deadline, f"the VIP never reached the router: {peers}"
            time.sleep(0.2)
        pid = speaker.pid()
        assert pid is not None, "no BGP speaker under the daemon's state dir"
        assert _status(pid)["Uid"].split()[0] == str(NOBODY), "BIRD does not run as the unit"
        assert router.established() == ["lb1_4"]
        # KillMode=process: a restart stops the daemon only; the next start adopts BIRD.
        daemon.stop()
        daemon.start(extra_toml=_bgp_toml(lab))
        assert speaker.pid() == pid, "the restart did not adopt the running speaker"
        assert router.established() == ["lb1_4"], "the session dropped across the restart"
        assert kernel_nexthops(lab.router_ns, f"{lab.vip4}/32"), "the VIP was withdrawn"
        _forwards(lab, 10)
    finally:
        daemon.stop()
        speaker.stop()
        router.stop()


@requires_setpriv
def test_bgp_without_cap_net_bind_service_is_refused_in_one_line(
    unit_lab: Lab, daemon: UnitDaemon
) -> None:
    argv = daemon.argv(tuple(c for c in CAPS if c != "net_bind_service"), _bgp_toml(unit_lab))
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 4, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    want = "lbctl: error: cannot start: missing capability CAP_NET_BIND_SERVICE: "
    assert lines[0].startswith(want), lines[0]
    assert BGP_CAPABILITIES["CAP_NET_BIND_SERVICE"][1] in lines[0], "what needs it is not named"


@requires_setpriv
@pytest.mark.parametrize("dropped", [c for c in CAPS if f"CAP_{c.upper()}" in REQUIRED])
def test_a_missing_capability_is_named_in_one_line(
    unit_lab: Lab, daemon: UnitDaemon, dropped: str
) -> None:
    argv = daemon.argv(tuple(c for c in CAPS if c != dropped))
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 4, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    want = f"lbctl: error: cannot start: missing capability CAP_{dropped.upper()}: "
    assert lines[0].startswith(want), lines[0]
    assert REQUIRED[f"CAP_{dropped.upper()}"][1] in lines[0], "what needs it is not named"
