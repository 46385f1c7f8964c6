"""`lbctl serve` for real: load with pins, reconcile, attach, serve; restart; detach.

The daemon runs as a subprocess (started and stopped by its pid) on a veth in a namespace
this test makes; its pins and state live in this test's own directories.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from lb.dataplane import attach as xdp

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

LBCTL = str(Path(sys.executable).with_name("lbctl"))
IFACE = "xlbd0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def daemon_env(
    netns: Callable[[str], str], pin_dir: Path, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """Environment of a daemon on a veth in a fresh namespace (detached at the end)."""
    ns = netns("api")
    subprocess.run(
        ["ip", "-n", ns, "link", "add", IFACE, "type", "veth", "peer", "name", "xlbd1"], check=True
    )
    for dev in (IFACE, "xlbd1"):
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "XLB_INTERFACE": IFACE,
        "XLB_NETNS": ns,
        "XLB_XDP_MODE": "generic",
        "XLB_STATE_DIR": str(tmp_path / "state"),
        "XLB_PIN_DIR": str(pin_dir),
        "XLB_DATAPLANE__RING_SIZE": "4099",
        "XLB_DATAPLANE__MAX_VIPS": "16",
        "XLB_DATAPLANE__MAX_REALS": "64",
        "XLB_DATAPLANE__CONN_TABLE_SIZE": "4096",
        "XLB_RUNTIME__GATEWAY_MAC": "02:00:00:00:00:fe",
        "XLB_TOKEN_FILE": str(tmp_path / "token"),
    }
    yield env
    with contextlib.suppress(Exception):  # the namespace goes away with the fixture anyway
        xdp.detach(IFACE, netns=ns)


def _readyz_status(url: str | None, uds: Path | None) -> int | None:
    """Status of GET /readyz, or None while nothing answers."""
    if url is not None:
        try:
            return httpx.get(f"{url}/readyz", timeout=5).status_code
        except httpx.TransportError:
            return None
    assert uds is not None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect(str(uds))
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: xlb\r\nConnection: close\r\n\r\n")
        return int(s.recv(64).split()[1])
    except (OSError, IndexError, ValueError):
        return None
    finally:
        s.close()


class Daemon:
    """One `lbctl serve` process, stopped by its pid."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.log = Path(env["HOME"]) / f"serve{time.monotonic_ns()}.log"
        self.env = env
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [LBCTL, "serve", "--token-file", env["XLB_TOKEN_FILE"], *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, url: str | None = None, uds: Path | None = None) -> None:
        """Poll /readyz until 200 (over TCP at `url` or the unix socket `uds`)."""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if _readyz_status(url, uds) == 200:
                return
            time.sleep(0.2)
        raise AssertionError("daemon not ready: " + self.log.read_text())

    def stop(self) -> int:
        """SIGTERM, then wait; uvicorn re-raises the signal after a clean shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def lbctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LBCTL, *args], env=env, capture_output=True, text=True, timeout=60)


def test_serve_restart_detach(daemon_env: dict[str, str], tmp_path: Path) -> None:
    env = daemon_env
    ns = env["XLB_NETNS"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    d = Daemon(env, "--port", str(port))
    try:
        d.wait_ready(url)
        assert stat.S_IMODE(Path(env["XLB_TOKEN_FILE"]).stat().st_mode) == 0o600
        cli = env | {"XLB_URL": url}
        p = lbctl(cli, "vip", "add", "tcp", "198.18.0.10:80")
        assert p.returncode == 0, p.stderr
        p = lbctl(cli, "backend", "add", "tcp:198.18.0.10:80", "198.18.1.2")
        assert p.returncode == 0, p.stderr
        state = xdp.query(IFACE, netns=ns)
        assert state.ours and state.mode == "generic"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'xlb_attached{mode="generic"} 1.0' in metrics
    finally:
        assert d.stop() in (0, -signal.SIGTERM), d.log.read_text()
    # Stopped: the program stays attached and keeps forwarding.
    assert xdp.query(IFACE, netns=ns).ours

    p = lbctl(env, "detach")
    assert p.returncode == 0 and f"from {IFACE} in netns {ns}" in p.stdout, p.stderr
    assert xdp.query(IFACE, netns=ns).prog_id is None

    # Restart on a unix socket, detaching on exit: the stored state comes back.
    sock = tmp_path / "xlb_api.sock"
    d = Daemon(env, "--uds", str(sock), "--detach-on-exit")
    try:
        d.wait_ready(uds=sock)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        p = lbctl(env | {"XLB_URL": f"unix://{sock}"}, "-o", "json", "vip", "list")
        assert p.returncode == 0, p.stderr
        assert '"tcp:198.18.0.10:80"' in p.stdout and '"198.18.1.2"' in p.stdout
        assert xdp.query(IFACE, netns=ns).ours
    finally:
        assert d.stop() in (0, -signal.SIGTERM), d.log.read_text()
    assert xdp.query(IFACE, netns=ns).prog_id is None, d.log.read_text()
    assert not sock.exists()

    # A detach behind the daemon's back shows in /readyz.
    d = Daemon(env, "--port", str(port))
    try:
        d.wait_ready(url)
        assert lbctl(env, "detach").returncode == 0
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503, r.text
        assert f"{IFACE} no longer runs our program" in r.json()["reasons"][0]
    finally:
        assert d.stop() in (0, -signal.SIGTERM), d.log.read_text()
