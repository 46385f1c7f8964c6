"""Three `lbctl serve` daemons on one etcd: a change through any host reaches every host, and
`kill -9` of a daemon in the middle of its writes loses no acknowledged change."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lb.fleet.members import EtcdCluster, etcd_binary

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

LBCTL = str(Path(sys.executable).with_name("lbctl"))
TOKEN = "fleet-e2e-token-0123456789"
VIP = "tcp:198.18.0.10:80"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Host:
    """One daemon: its environment, URL and process (stopped by pid)."""

    def __init__(self, name: str, tmp: Path, pins: Path, endpoints: list[str]) -> None:
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        (tmp / "token").write_text(TOKEN)
        self.env = {
            "PATH": os.environ["PATH"], "HOME": str(tmp),
            "XLB_STORE": "etcd", "XLB_ETCD__ENDPOINTS": repr(endpoints).replace("'", '"'),
            "XLB_ETCD__HOST_NAME": name, "XLB_ETCD__TIMEOUT_S": "1",
            "XLB_ETCD__LEASE_TTL_S": "3",
            "XLB_STATE_DIR": str(tmp / name), "XLB_PIN_DIR": str(pins / name),
            "XLB_DATAPLANE__RING_SIZE": "4099", "XLB_DATAPLANE__MAX_VIPS": "16",
            "XLB_DATAPLANE__MAX_REALS": "256", "XLB_DATAPLANE__CONN_TABLE_SIZE": "4096",
            "XLB_TOKEN_FILE": str(tmp / "token"),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10,
                                   headers={"Authorization": f"Bearer {TOKEN}"})

    def start(self) -> None:
        """Start the daemon (no interface: it loads and pins, and serves)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [LBCTL, "serve", "--port", str(self.port), "--token-file",
                 self.env["XLB_TOKEN_FILE"]],
                env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def wait_serving(self) -> None:
        """Until GET /v1/state answers."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                if self.client.get("/v1/state").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not serving: {self.log.read_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the daemon by its pid and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def backends(self) -> set[str]:
        """Addresses of the VIP's backends as this host serves them."""
        r = self.client.get(f"/v1/vips/{VIP}")
        return {b["address"] for b in r.json()["backends"]} if r.status_code == 200 else set()

    def lbctl(self, *args: str) -> str:
        """Run lbctl against this host; its output."""
        p = subprocess.run([LBCTL, "--url", self.url, "--token", TOKEN, *args],
                           capture_output=True, text=True, timeout=60,
                           env={"PATH": os.environ["PATH"], "HOME": self.env["HOME"]})
        assert p.returncode == 0, (p.stdout, p.stderr)
        return p.stdout


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def hosts(tmp_path: Path, pin_dir: Path) -> Iterator[list[Host]]:
    """Three daemons on one etcd member (all stopped and removed afterwards)."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (scripts/setup.sh installs etcd-server)")
    with EtcdCluster(tmp_path / "etcd", 1) as etcd:
        made = [Host(f"lb{i}", tmp_path, pin_dir, etcd.endpoints) for i in range(3)]
        try:
            for h in made:
                h.start()
            for h in made:
                h.wait_serving()
            yield made
        finally:
            for h in made:
                h.kill(signal.SIGTERM)
                h.client.close()


def test_three_daemons_share_one_state_and_survive_kill_9(hosts: list[Host]) -> None:
    a, b, c = hosts
    a.lbctl("vip", "add", "tcp", "198.18.0.10:80")
    b.lbctl("backend", "add", VIP, "198.18.1.1")
    _wait(lambda: c.backends() == {"198.18.1.1"}, 15, "B's backend on C")

    def agreed() -> bool:
        f = c.client.get("/v1/fleet").json()
        return (len(f["hosts"]) == 3 and not f["lagging"] and not f["divergent"]
                and len({h["fingerprints"].get(VIP) for h in f["hosts"]}) == 1)

    _wait(agreed, 15, "three hosts with identical rings")
    assert "3 hosts agree" in c.lbctl("fleet", "status")

    acked: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            addr = f"198.18.2.{n}"
            try:
                r = b.client.post(f"/v1/vips/{VIP}/backends", json={"address": addr})
            except httpx.TransportError:
                return  # the daemon is gone
            if r.status_code == 201:
                acked.append(addr)

    t = threading.Thread(target=writer)
    t.start()
    _wait(lambda: len(acked) >= 15, 30, "15 acknowledged writes through B")
    b.kill()  # SIGKILL in the middle of its writes
    stop.set()
    t.join(30)
    # Every change B acknowledged is in the fleet's state, on A and C.
    _wait(lambda: set(acked) <= a.backends() and a.backends() == c.backends(), 15,
          "B's acknowledged changes on A and C")
    # B comes back with its pins and local copy, and catches up.
    b.start()
    b.wait_serving()
    _wait(lambda: b.backends() == a.backends(), 15, "B caught up")
    a.lbctl("backend", "rm", VIP, "198.18.1.1")
    _wait(lambda: "198.18.1.1" not in b.backends(), 15, "A's change on the restarted B")
    _wait(agreed, 15, "identical rings after B's restart")
