"""The BGP speaker of an LB host: a BIRD 2 process driven by its configuration file.

Why BIRD and why a separate process (docs/bgp.md): the speaker must outlive the daemon, so a
daemon restart or a `kill -9` withdraws nothing while the data plane keeps forwarding. BIRD
runs detached with its own config, control socket and pid file under `<state_dir>/bgp/`; a
restarted daemon adopts it by its pid file (the pid must still run our config file) instead
of starting a second one. Announcing and withdrawing is rewriting the config (static /32 and
/128 blackhole routes, exported with next hop self) and `birdc configure`: the BGP sessions
are not reset by it, only the changed routes are sent.

Session and route state come from `birdc show protocols all`.

BIRD runs with the daemon's capabilities (ambient, inherited across exec). It listens for the
peers' sessions on TCP port 179, so it needs CAP_NET_BIND_SERVICE as well as the data plane's
three; without it BIRD starts, but every session stays down ("No listening socket"), so a
daemon with `bgp.enabled` refuses to start without it (`require_capabilities`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lb.config import BgpConfig, BgpPeer
from lb.dataplane.netns import pid_alive
from lb.dataplane.privileges import effective
from lb.errors import XlbError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

STATIC4 = "xlb_vips4"
STATIC6 = "xlb_vips6"
_ROUTE_RE = re.compile(r"^\s*route (\S+)/(?:32|128) blackhole;", re.M)
_PROTO_RE = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s*(.*)$")
_EXPORTED_RE = re.compile(r"Routes:\s+(\d+) imported, (?:(\d+) filtered, )?(\d+) exported")
# Replies of `birdc configure` that mean the new configuration is in force (or will be).
_CONFIGURED = ("Reconfigured", "Reconfiguration in progress", "Reconfiguration already in progress")


class SpeakerError(XlbError):
    """The BGP speaker could not be started, configured or asked."""

    status = 503
    kind = "bgp-speaker"


CAP_NET_BIND_SERVICE = 10

#: What the speaker needs beyond the data plane's capabilities: name -> (number, the call).
CAPABILITIES: dict[str, tuple[int, str]] = {
    "CAP_NET_BIND_SERVICE": (
        CAP_NET_BIND_SERVICE,
        "BIRD (bgp.enabled) binds TCP port 179 to accept the peers' BGP sessions; without it"
        " every session stays down ('No listening socket')",
    ),
}


def require_capabilities(caps: int | None = None) -> None:
    """SpeakerError, one line, naming the capability BIRD would lack (`caps`: this process's)."""
    caps = effective() if caps is None else caps
    for name, (bit, why) in CAPABILITIES.items():
        if not caps >> bit & 1:
            raise SpeakerError(
                f"missing capability {name}: {why}; give the daemon {name} too"
                " (xlb.service grants it, docs/privileges.md), or set bgp.enabled = false",
                field="bgp.enabled",
            )


@dataclass(frozen=True)
class PeerState:
    """One BGP session as BIRD reports it."""

    name: str
    address: str
    asn: int
    state: str  # BIRD's protocol state: up, start, down
    bgp_state: str  # Established, Active, Connect, Idle, ...
    info: str
    since: float | None
    routes_exported: int

    @property
    def up(self) -> bool:
        """True when the session is established."""
        return self.bgp_state == "Established"


@dataclass
class SpeakerState:
    """The speaker process, its sessions and the routes it was told to announce."""

    running: bool
    pid: int | None
    routes: list[str] = field(default_factory=list)
    peers: list[PeerState] = field(default_factory=list)
    error: str | None = None


def peer_name(peer: BgpPeer) -> str:
    """BIRD protocol name of a peer: `peer_` and its address with separators as `_`."""
    return "peer_" + re.sub(r"[^0-9A-Za-z]", "_", str(peer.address))


def _community(text: str) -> tuple[str, str]:
    parts = text.split(":")
    attr = "bgp_community" if len(parts) == 2 else "bgp_large_community"
    return attr, "(" + ",".join(parts) + ")"


def render_config(
    cfg: BgpConfig, routes: set[IPAddress] | list[IPAddress], *, log_file: Path
) -> str:
    """BIRD 2 configuration announcing `routes` (host routes) to every configured peer."""
    if cfg.asn is None:
        raise SpeakerError("bgp.asn is not set", field="bgp.asn")
    v4 = sorted(a for a in routes if a.version == 4)
    v6 = sorted(a for a in routes if a.version == 6)
    lines = [
        "# Written by xlb (lb/fleet/bgp.py) on every change: edits are lost.",
        f'log "{log_file}" {{ info, remote, warning, error, auth, fatal, bug }};',
        'timeformat protocol "%s";',
    ]
    if cfg.router_id is not None:
        lines.append(f"router id {cfg.router_id};")
    lines += ["protocol device { scan time 10; }", ""]
    # The VIP routes: blackhole only inside BIRD (no kernel protocol), exported by BGP.
    for name, chan, addrs, plen in ((STATIC4, "ipv4", v4, 32), (STATIC6, "ipv6", v6, 128)):
        lines.append(f"protocol static {name} {{")
        lines.append(f"\t{chan};")
        lines += [f"\troute {a}/{plen} blackhole;" for a in addrs]
        lines += ["}", ""]
    lines.append("filter xlb_export {")
    lines.append("\tif source != RTS_STATIC then reject;")
    for c in cfg.communities:
        attr, value = _community(c)
        lines.append(f"\t{attr}.add({value});")
    lines += ["\taccept;", "}", ""]
    for p in cfg.peers:
        chan = "ipv4" if p.address.version == 4 else "ipv6"
        lines += [
            f"protocol bgp {peer_name(p)} {{",
            f'\tdescription "xlb peer {p.address}";',
            f"\tlocal as {cfg.asn};",
            f"\tneighbor {p.address} port {p.port} as {p.asn};",
            "\tdirect;",
            f"\thold time {cfg.hold_time};",
            f"\tkeepalive time {cfg.keepalive};",
            f"\tconnect retry time {cfg.connect_retry_s};",
            # Without this BIRD waits 60-120 s before retrying a session that failed.
            f"\terror wait time {cfg.connect_retry_s}, {max(cfg.connect_retry_s, 3)};",
        ]
        if p.password is not None:
            lines.append(f'\tpassword "{p.password}";')
        lines += [
            f"\t{chan} {{ import none; export filter xlb_export; next hop self; }};",
            "}",
            "",
        ]
    return "\n".join(lines)


def routes_in(config_text: str) -> list[str]:
    """The VIP addresses a rendered configuration announces."""
    return _ROUTE_RE.findall(config_text)


def parse_protocols(text: str, peers: list[BgpPeer]) -> list[PeerState]:
    """Parse `birdc show protocols all` into the state of each configured peer."""
    by_name = {peer_name(p): p for p in peers}
    out: list[PeerState] = []
    cur: dict[str, str] | None = None
    blocks: list[dict[str, str]] = []
    for line in text.splitlines():
        if line and not line[0].isspace():
            m = _PROTO_RE.match(line)
            cur = None
            if m and m.group(1) in by_name:
                cur = {"name": m.group(1), "state": m.group(4), "since": m.group(5),
                       "info": m.group(6).strip(), "exported": "0", "bgp_state": ""}
                blocks.append(cur)
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("BGP state:"):
            cur["bgp_state"] = s.split(":", 1)[1].strip()
        elif (e := _EXPORTED_RE.search(s)) is not None:
            cur["exported"] = str(int(cur["exported"]) + int(e.group(3)))
    for b in blocks:
        p = by_name[b["name"]]
        out.append(PeerState(
            name=b["name"], address=str(p.address), asn=p.asn, state=b["state"],
            bgp_state=b["bgp_state"] or b["info"].split(" ")[0], info=b["info"],
            since=float(b["since"]) if b["since"] else None,
            routes_exported=int(b["exported"]),
        ))
    return out


class Speaker:
    """A BIRD 2 process announcing this host's VIP addresses; files under `work_dir`."""

    def __init__(self, cfg: BgpConfig, work_dir: Path) -> None:
        self.cfg = cfg
        self.work_dir = work_dir
        self.config_file = work_dir / "bird.conf"
        self.socket = work_dir / "bird.ctl"
        self.pid_file = work_dir / "bird.pid"
        self.log_file = work_dir / "bird.log"

    # Process.

    def pid(self) -> int | None:
        """Pid of our BIRD if it runs: the pid file's process, running our config file."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if not pid_alive(pid):
            return None
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        # A reused pid that runs something else is not ours.
        return pid if str(self.config_file).encode() in cmd else None

    def start(self, routes: set[IPAddress]) -> int:
        """Adopt the running speaker (reconfigured to `routes`) or start one; returns its pid."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        pid = self.pid()
        if pid is not None:
            self.announce(routes)
            return pid
        self._write(routes)
        self.socket.unlink(missing_ok=True)
        cmd = [self.cfg.bird, "-c", str(self.config_file), "-s", str(self.socket),
               "-P", str(self.pid_file)]
        try:
            # BIRD forks into the background (setsid, stdio on /dev/null) once its config
            # parses, so this returns at once and the speaker outlives the daemon.
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError as e:
            raise SpeakerError(
                f"BGP speaker {self.cfg.bird!r} not found: install BIRD 2 (Debian bird2)"
                " or set bgp.bird", field="bgp.bird",
            ) from e
        if r.returncode != 0:
            raise SpeakerError(f"BIRD refused to start: {(r.stderr or r.stdout).strip()}")
        deadline = time.monotonic() + 10
        while True:
            pid = self.pid()
            if pid is not None and self.socket.exists():
                with contextlib.suppress(SpeakerError):
                    self._birdc("show", "status")
                    return pid
            if time.monotonic() > deadline:
                raise SpeakerError(f"BIRD did not come up within 10 s; see {self.log_file}")
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop our BIRD by its pid (its sessions close: the peers withdraw at once)."""
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)
        return True

    # Routes.

    def announced(self) -> list[str]:
        """The addresses the current configuration announces."""
        try:
            return routes_in(self.config_file.read_text())
        except OSError:
            return []

    def announce(self, routes: set[IPAddress]) -> None:
        """Announce exactly `routes` (withdrawing the others) without resetting sessions."""
        if self.pid() is None:
            raise SpeakerError("the BGP speaker is not running")
        self._write(routes)
        out = self._birdc("configure")
        if not any(w in out for w in _CONFIGURED):
            raise SpeakerError(f"BIRD refused the new configuration: {out.strip()}")

    def _write(self, routes: set[IPAddress]) -> None:
        text = render_config(self.cfg, routes, log_file=self.log_file)
        tmp = self.config_file.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        # 0600: it holds the peers' MD5 passwords.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.config_file)

    # State.

    def state(self) -> SpeakerState:
        """Process, sessions and routes as they are now."""
        pid = self.pid()
        st = SpeakerState(running=pid is not None, pid=pid, routes=self.announced())
        if pid is None:
            st.error = "the BGP speaker (BIRD) is not running"
            return st
        try:
            st.peers = parse_protocols(self._birdc("show", "protocols", "all"), self.cfg.peers)
        except SpeakerError as e:
            st.error = e.detail
        return st

    def _birdc(self, *args: str) -> str:
        try:
            r = subprocess.run(
                [self.cfg.birdc, "-s", str(self.socket), *args],
                capture_output=True, text=True, timeout=10, check=False,
            )
        except FileNotFoundError as e:
            raise SpeakerError(f"{self.cfg.birdc!r} not found: install BIRD 2 (Debian bird2)",
                               field="bgp.birdc") from e
        except subprocess.TimeoutExpired as e:
            raise SpeakerError(f"birdc {' '.join(args)} timed out") from e
        out = r.stdout + r.stderr
        if r.returncode != 0 or "Unable to connect" in out:
            raise SpeakerError(f"birdc {' '.join(args)} failed: {out.strip()}")
        return out
