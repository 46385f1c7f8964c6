"""The lab's ToR: BIRD 2 in the router namespace, one BGP session per LB host, ECMP.

It learns each LB host's VIP routes (/32, /128) and installs them in the router namespace's
kernel table as multipath routes (`merge paths on`, else only one nexthop is installed), hashed
on the 5-tuple (`fib_multipath_hash_policy=1`, set by the caller for the namespace). Short
timers so a failed session is retried at once (BIRD's default error wait is 60-120 s).

It runs detached with its own config, control socket and pid file under the lab's run dir, and
is stopped by that pid (never by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from lb.dataplane import netns
from lb.errors import KernelError

ROUTER_ASN = 65000
LB_ASN = 65001


@dataclass(frozen=True)
class Neighbor:
    """One LB host's session as the router sees it."""

    name: str
    address: str


@dataclass(frozen=True)
class RouterBird:
    """The router's BIRD: files under `run_dir`, running in namespace `ns`."""

    ns: str
    run_dir: Path
    router_id: str
    neighbors: tuple[Neighbor, ...]
    hold_time: int = 3
    password: str | None = None
    bird: str = "bird"
    birdc: str = "birdc"

    @property
    def config_file(self) -> Path:
        """The router's BIRD configuration."""
        return self.run_dir / "router-bird.conf"

    @property
    def socket(self) -> Path:
        """BIRD's control socket."""
        return self.run_dir / "router-bird.ctl"

    @property
    def pid_file(self) -> Path:
        """BIRD's pid file."""
        return self.run_dir / "router-bird.pid"

    def render(self) -> str:
        """The router's configuration: kernel export with merged ECMP paths, one BGP per LB."""
        keep = max(1, self.hold_time // 3)
        lines = [
            f'log "{self.run_dir / "router-bird.log"}" all;',
            'timeformat protocol "%s";',
            f"router id {self.router_id};",
            "protocol device { scan time 10; }",
            "protocol kernel k4 { ipv4 { import none; export all; }; merge paths on; }",
            "protocol kernel k6 { ipv6 { import none; export all; }; merge paths on; }",
        ]
        for n in self.neighbors:
            chan = "ipv6" if ":" in n.address else "ipv4"
            lines += [
                f"protocol bgp {n.name} {{",
                f"\tlocal as {ROUTER_ASN};",
                f"\tneighbor {n.address} as {LB_ASN};",
                "\tdirect;",
                f"\thold time {self.hold_time}; keepalive time {keep};",
                "\tconnect retry time 1; error wait time 1, 3;",
                *([f'\tpassword "{self.password}";'] if self.password else []),
                f"\t{chan} {{ import all; export none; }};",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def pid(self) -> int | None:
        """Pid of the router's BIRD if it runs (and runs our config)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.config_file).encode() in cmd and netns.pid_alive(pid) else None

    def start(self) -> int:
        """Start BIRD in the router namespace; returns its pid."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.render())
        netns.run(self.ns, [self.bird, "-c", str(self.config_file), "-s", str(self.socket),
                            "-P", str(self.pid_file)])
        deadline = time.monotonic() + 10
        while (pid := self.pid()) is None or not self.socket.exists():
            if time.monotonic() > deadline:
                raise KernelError(f"the router's BIRD did not start ({self.config_file})")
            time.sleep(0.05)
        return pid

    def stop(self) -> bool:
        """Stop the router's BIRD by its pid; False when none ran."""
        return stop_pid_file(self.pid_file, str(self.config_file))

    def cli(self, *args: str) -> str:
        """Run a birdc command against the router."""
        return netns.run(None, [self.birdc, "-s", str(self.socket), *args]).stdout

    def reconfigure(self) -> None:
        """Rewrite the configuration (e.g. after `dataclasses.replace`) and apply it."""
        self.config_file.write_text(self.render())
        out = self.cli("configure")
        if "Reconfigur" not in out:
            raise KernelError(f"the router's BIRD refused its configuration: {out.strip()}")

    def established(self) -> list[str]:
        """Names of the BGP sessions that are up."""
        out = []
        for line in self.cli("show", "protocols").splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "BGP" and "Established" in parts[5:]:
                out.append(parts[0])
        return out


def stop_pid_file(pid_file: Path, mentions: str, timeout: float = 5.0) -> bool:
    """SIGTERM (then SIGKILL) the process of a pid file if its command line names `mentions`."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        pid_file.unlink(missing_ok=True)
        return False
    if mentions.encode() not in cmd:
        pid_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while netns.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if netns.pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def kernel_nexthops(ns: str, prefix: str) -> list[str]:
    """Gateways of the router namespace's kernel route to `prefix` (several with ECMP)."""
    fam = "-6" if ":" in prefix else "-4"
    res = netns.run(ns, ["ip", "-j", fam, "route", "show", prefix], check=False)
    if res.returncode != 0 or not res.stdout.strip():
        return []
    out: list[str] = []
    for r in json.loads(res.stdout):
        if "gateway" in r:
            out.append(r["gateway"])
        for nh in r.get("nexthops", []):
            if "gateway" in nh:
                out.append(nh["gateway"])
    return sorted(out)
