"""etcd members for the tests, the benchmark and the lab: real `etcd` processes (Debian's
etcd-server 3.4), started and stopped by this process.

systemd is not PID 1 on the project's machines and the distribution's instance must never be
touched, so each member runs with its own name, data directory and loopback ports, and is
stopped by the pid recorded when it was started. `EtcdCluster` starts 1 or 3 members.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from lb.dataplane.netns import pid_alive

ETCD = "etcd"
HOST = "127.0.0.1"
#: One file per running member: "<owner pid> <member pid> <data dir>", so a member left
#: behind by a process that died (a killed test run) is found and stopped by its pid.
RUN_DIR = Path("/tmp/xlb-etcd-members")


def sweep_stale() -> list[int]:
    """Stop members whose starting process is gone (by recorded pid); returns their pids."""
    stopped: list[int] = []
    if not RUN_DIR.is_dir():
        return stopped
    for f in RUN_DIR.glob("*.pid"):
        try:
            owner, pid, data = f.read_text().split(" ", 2)
        except ValueError:
            f.unlink(missing_ok=True)
            continue
        if pid_alive(int(owner)):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        # Only the process we recorded: same pid and still running on the same data dir.
        if data.strip().encode() in cmdline:
            os.kill(int(pid), signal.SIGKILL)
            stopped.append(int(pid))
        f.unlink(missing_ok=True)
    return stopped


def etcd_binary() -> str | None:
    """Path of the etcd server, or None when etcd-server is not installed."""
    return shutil.which(ETCD)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    """One etcd member: its ports, data directory and (while running) its process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    cluster: str = ""
    token: str = "xlb"  # the same for every member of one cluster
    #: (CA, certificate, key) PEM files: serve clients over TLS and require client certs.
    tls: tuple[Path, Path, Path] | None = None
    state: str = "new"

    @property
    def endpoint(self) -> str:
        """host:port of its client URL."""
        return f"{HOST}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        """Pid of the running process (None when stopped)."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> None:
        """Start the process (after a stop: with the same data, rejoining the cluster)."""
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        peer = f"http://{HOST}:{self.peer_port}"
        client = f"{'https' if self.tls else 'http'}://{HOST}:{self.client_port}"
        args = [
            binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.cluster, "--initial-cluster-state", self.state,
            "--initial-cluster-token", self.token,
            "--logger", "zap", "--log-level", "warn",
            # The lab's members are small and short-lived: snapshot often, keep little.
            "--snapshot-count", "10000", "--heartbeat-interval", "50",
            "--election-timeout", "500",
        ]
        if self.tls is not None:
            ca, cert, key = self.tls
            args += ["--cert-file", str(cert), "--key-file", str(key),
                     "--trusted-ca-file", str(ca), "--client-cert-auth"]
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self._pidfile.write_text(f"{os.getpid()} {self.proc.pid} {self.data_dir}")

    @property
    def _pidfile(self) -> Path:
        return RUN_DIR / f"{os.getpid()}-{self.client_port}.pid"

    def healthy(self) -> bool:
        """The member answers /health with true."""
        ctx = None
        if self.tls is not None:
            ca, cert, key = self.tls
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.load_cert_chain(str(cert), str(key))
        scheme = "https" if self.tls else "http"
        try:
            with urllib.request.urlopen(f"{scheme}://{self.endpoint}/health", timeout=1,
                                        context=ctx) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the member's process by its recorded pid and reap it."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            os.kill(p.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(10)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc = None
            self.state = "existing"
            self._pidfile.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the member (SIGTERM, then SIGKILL)."""
        self.kill(signal.SIGTERM)


@dataclass
class EtcdCluster:
    """`size` etcd members on loopback under `root`, removed with it on close."""

    root: Path
    size: int = 1
    members: list[Member] = field(default_factory=list)
    #: (CA, certificate, key): clients must speak TLS and show a certificate of this CA.
    tls: tuple[Path, Path, Path] | None = None

    def __post_init__(self) -> None:
        ports = _free_ports(2 * self.size)
        for i in range(self.size):
            self.members.append(Member(
                f"m{i}", ports[2 * i], ports[2 * i + 1], self.root / f"m{i}.etcd",
                self.root / f"m{i}.log",
            ))
        cluster = ",".join(f"{m.name}=http://{HOST}:{m.peer_port}" for m in self.members)
        for m in self.members:
            m.cluster = cluster
            m.tls = self.tls
            m.token = f"xlb-{os.getpid()}-{self.members[0].peer_port}"

    @property
    def endpoints(self) -> list[str]:
        """host:port of every member."""
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        """Start every member and wait until each is healthy."""
        self.root.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            m.start()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20.0, members: list[Member] | None = None) -> None:
        """Wait until the given (default: running) members answer healthy."""
        want = members if members is not None else [m for m in self.members if m.proc]
        deadline = time.monotonic() + timeout
        while not all(m.healthy() for m in want):
            for m in want:
                if m.proc is not None and m.proc.poll() is not None:
                    tail = m.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"etcd member {m.name} exited: {tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd members not healthy after {timeout} s")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop every member and remove the data directories."""
        for m in self.members:
            m.kill(signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
