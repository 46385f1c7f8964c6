"""The network lab: an edge load-balancer host built from namespaces and veths.

    client ns            router ns                        LB ns
    cl0 198.18.1.2 ---- rt-cl 198.18.1.1
                         rt-lb 198.18.2.1 [xlb_pass] ---- lb0 198.18.2.2 [xlb balancer]
                         rt-b1 198.18.11.1 ------------- be0 198.18.11.2 [decap] (backend 1)
                         rt-bN 198.18.(10+N).1 --------- be0 ...            [decap] (backend N)

The router sends the VIP prefix (198.18.0.0/24, 2001:db8::/64) to the LB. The LB's XDP
program encapsulates each packet to a backend and XDP_TXes it back to the router's MAC (the
gateway MAC of its runtime config, "LB on a stick"); the router routes it to the backend,
whose decap program (xdp/decap/decap.c, tc or XDP) strips the outer header; the VIP sits on the
backend's `lo`, its server answers the client directly through the router (DSR).

Every rule of the veth platform is applied (docs/veth-lab.md): an XDP_PASS
program on rt-lb so native XDP_TX from lb0 is delivered; tx checksum offload off on the
client; MTU 1600 on the LB and backend links (encapsulation headroom; clients keep 1500, so
TCP's MSS leaves room for the outer header); rp_filter off (the DSR answer enters the router
from a backend, not from where the VIP route points); arp_ignore/arp_announce on backends;
forwarding on the router.

Everything is named `<prefix>-<role>` and found again by name: `down` removes a lab by its
prefix also after a crash. Nothing is created in the host's namespace except the run
directory (/run/xlb/<prefix>) and the bpffs pin directory (/sys/fs/bpf/<prefix>).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lb.client import ApiClient, ApiError
from lb.dataplane import netlink, netns
from lb.dataplane.keys import socket_family
from lb.dataplane.netlink import XdpMode
from lb.errors import InvalidInput, KernelError
from lb.lab.router import Neighbor, RouterBird

DecapMode = Literal["tc", "xdp"]

DEFAULT_PREFIX = "xlab"
RUN_ROOT = Path("/run/xlb")
BPFFS = Path("/sys/fs/bpf")
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,11}$")
MAX_BACKENDS = 200
# LB host k's link is 198.18.(1+k).0/24: 2..9 sit between the client (1) and backends (11+).
MAX_LB_HOSTS = 8

HTTP_PORT = 80
STREAM_PORT = 9000
UDP_PORT = 9001

VIP4 = "198.18.0.10"
VIP6 = "2001:db8::10"
VIP_NET4 = "198.18.0.0/24"
VIP_NET6 = "2001:db8::/64"

# Clients keep the Internet's 1500; links that carry encapsulated frames get room for the
# outer header (20 IPIP, 40 IPv6, 28+ GUE). Native XDP refuses a veth whose peer is > 3506.
CLIENT_MTU = 1500
CORE_MTU = 1600
ETH_HLEN = 14

CLIENT_IF = "cl0"
LB_IF = "lb0"
BACKEND_IF = "be0"
RT_CLIENT_IF = "rt-cl"
RT_LB_IF = "rt-lb"

# Small data-plane sizes: a lab needs few VIPs; Maglev wants ring > 100 * backends.
# BGP hold time in a fleet lab: a host that dies silently is dropped within it.
LAB_HOLD_TIME = 3
LAB_DATAPLANE = {"ring_size": 16381, "max_vips": 16, "max_reals": 256, "conn_table_size": 65536}


def _say(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True)
class Lab:
    """Names and addresses of one lab; computing them touches nothing."""

    prefix: str = DEFAULT_PREFIX
    backends: int = 3
    xdp_mode: XdpMode = "native"
    decap: DecapMode = "tc"
    #: LB hosts behind the router; more than one announce the VIPs by BGP (ECMP at the router).
    lb_hosts: int = 1
    #: Which LB host this view names (`host(k)`): its namespace, addresses, daemon, pins, store.
    host_index: int = 1

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise InvalidInput(
                # Namespace names end up in settings, which hold them to 15 characters.
                f"lab prefix must be 1-12 letters, digits or _, got {self.prefix!r}", field="prefix"
            )
        if not 1 <= self.backends <= MAX_BACKENDS:
            raise InvalidInput(
                f"backends must be 1..{MAX_BACKENDS}, got {self.backends}", field="backends"
            )
        if not 1 <= self.lb_hosts <= MAX_LB_HOSTS:
            raise InvalidInput(
                f"lb_hosts must be 1..{MAX_LB_HOSTS}, got {self.lb_hosts}", field="lb_hosts"
            )
        if not 1 <= self.host_index <= self.lb_hosts:
            raise InvalidInput(
                f"host_index must be 1..{self.lb_hosts}, got {self.host_index}", field="host_index"
            )

    @property
    def bgp(self) -> bool:
        """True when the LB hosts announce the VIPs by BGP (a fleet) instead of static routes."""
        return self.lb_hosts > 1

    def host(self, k: int) -> Lab:
        """The view of LB host k (1-based): same lab, that host's names and paths."""
        return replace(self, host_index=k)

    def hosts(self) -> list[Lab]:
        """A view per LB host."""
        return [self.host(k) for k in self.lb_host_ids]

    @property
    def lb_host_ids(self) -> range:
        """1..lb_hosts."""
        return range(1, self.lb_hosts + 1)

    # Namespaces.

    @property
    def client_ns(self) -> str:
        """Namespace of the clients."""
        return f"{self.prefix}-cl"

    @property
    def router_ns(self) -> str:
        """Namespace of the router (the edge host's default gateway)."""
        return f"{self.prefix}-rt"

    @property
    def lb_ns(self) -> str:
        """Namespace of the load balancer (this view's LB host; host 1 keeps `-lb`)."""
        return self.lb_ns_of(self.host_index)

    def lb_ns_of(self, k: int) -> str:
        """Namespace of LB host k."""
        return f"{self.prefix}-lb" if k == 1 else f"{self.prefix}-lb{k}"

    def backend_ns(self, i: int) -> str:
        """Namespace of backend i (1-based)."""
        return f"{self.prefix}-b{i}"

    def namespaces(self) -> list[str]:
        """Every namespace of the lab, in creation order."""
        bs = [self.backend_ns(i) for i in self.backend_ids]
        lbs = [self.lb_ns_of(k) for k in self.lb_host_ids]
        return [self.client_ns, self.router_ns, *lbs, *bs]

    @property
    def backend_ids(self) -> range:
        """1..backends."""
        return range(1, self.backends + 1)

    @staticmethod
    def router_backend_if(i: int) -> str:
        """Router interface towards backend i."""
        return f"rt-b{i}"

    # Addresses.

    client4 = "198.18.1.2"
    client6 = "2001:db8:1::2"
    router_client4 = "198.18.1.1"
    router_client6 = "2001:db8:1::1"

    @property
    def lb4(self) -> str:
        """This LB host's IPv4 address."""
        return f"198.18.{1 + self.host_index}.2"

    @property
    def lb6(self) -> str:
        """This LB host's IPv6 address."""
        return f"2001:db8:{1 + self.host_index}::2"

    @property
    def router_lb4(self) -> str:
        """The router's IPv4 address on this LB host's link."""
        return f"198.18.{1 + self.host_index}.1"

    @property
    def router_lb6(self) -> str:
        """The router's IPv6 address on this LB host's link."""
        return f"2001:db8:{1 + self.host_index}::1"

    @property
    def router_lb_if(self) -> str:
        """The router's interface towards this LB host."""
        return RT_LB_IF if self.host_index == 1 else f"{RT_LB_IF}{self.host_index}"
    vip4 = VIP4
    vip6 = VIP6

    @staticmethod
    def backend4(i: int) -> str:
        """IPv4 address of backend i (the outer destination the LB encapsulates to)."""
        return f"198.18.{10 + i}.2"

    @staticmethod
    def backend6(i: int) -> str:
        """IPv6 address of backend i."""
        return f"2001:db8:{10 + i}::2"

    @staticmethod
    def router_backend4(i: int) -> str:
        """Router address on backend i's link."""
        return f"198.18.{10 + i}.1"

    @staticmethod
    def router_backend6(i: int) -> str:
        """Router IPv6 address on backend i's link."""
        return f"2001:db8:{10 + i}::1"

    # MACs: fixed and readable in tcpdump (02:58:4c = locally administered "XL").

    client_mac = "02:58:4c:01:00:02"
    router_client_mac = "02:58:4c:01:00:01"

    @property
    def lb_mac(self) -> str:
        """This LB host's MAC."""
        return f"02:58:4c:02:{self.host_index - 1:02x}:02"

    @property
    def router_lb_mac(self) -> str:
        """The router's MAC on this LB host's link."""
        return f"02:58:4c:02:{self.host_index - 1:02x}:01"

    @property
    def gateway_mac(self) -> str:
        """The LB's next hop for encapsulated frames: the router's MAC on the LB link."""
        return self.router_lb_mac

    @staticmethod
    def backend_mac(i: int) -> str:
        """MAC of backend i."""
        return f"02:58:4c:03:{i:02x}:02"

    @staticmethod
    def router_backend_mac(i: int) -> str:
        """Router MAC on backend i's link."""
        return f"02:58:4c:03:{i:02x}:01"

    def backend_of(self, address: str) -> int | None:
        """Backend number owning an address (either family), if any."""
        for i in self.backend_ids:
            if address in (self.backend4(i), self.backend6(i)):
                return i
        return None

    # Host-side paths.

    @property
    def run_dir(self) -> Path:
        """Pid files, logs, daemon state and the API socket."""
        return RUN_ROOT / self.prefix

    @property
    def host_dir(self) -> Path:
        """This LB host's daemon files (config, socket, token, state): host 1 keeps run_dir."""
        return self.run_dir if self.host_index == 1 else self.run_dir / f"lb{self.host_index}"

    @property
    def token_file(self) -> Path:
        """The token this LB host's daemon wrote."""
        return self.host_dir / "token"

    @property
    def pin_dir(self) -> Path:
        """bpffs directory for every pin of the lab."""
        return BPFFS / self.prefix

    @property
    def lb_pin_dir(self) -> Path:
        """Where the balancer's maps are pinned."""
        return self.pin_dir / ("lb" if self.host_index == 1 else f"lb{self.host_index}")

    @property
    def decap_pin_dir(self) -> Path:
        """Where the backends' decap maps are pinned."""
        return self.pin_dir / "decap"

    @property
    def api_socket(self) -> Path:
        """Unix socket of the daemon's REST API (reachable from the host namespace)."""
        return self.host_dir / "xlb_api.sock"

    @property
    def config_file(self) -> Path:
        """The daemon's TOML configuration."""
        return self.host_dir / "xlb.toml"

    @property
    def daemon_pid_file(self) -> Path:
        """Pid of the daemon in the LB namespace."""
        return self.host_dir / "daemon.pid"

    @property
    def daemon_log(self) -> Path:
        """The daemon's stdout and stderr."""
        return self.host_dir / "daemon.log"

    def server_pid_file(self, i: int) -> Path:
        """Pid of backend i's server."""
        return self.run_dir / f"srv-b{i}.pid"

    @property
    def max_frame(self) -> int:
        """Largest frame the LB may send: the LB link's MTU plus the Ethernet header."""
        return CORE_MTU + ETH_HLEN

    def settings_toml(self) -> str:
        """The daemon's configuration (lb.settings.Settings) for this lab."""
        dp = "\n".join(f"{k} = {v}" for k, v in LAB_DATAPLANE.items())
        return (
            f'interface = "{LB_IF}"\n'
            f'xdp_mode = "{self.xdp_mode}"\n'
            f'state_dir = "{self.host_dir / "state"}"\n'
            f'pin_dir = "{self.lb_pin_dir}"\n'
            f"\n[dataplane]\n{dp}\n"
            f"\n[runtime]\n"
            f'gateway_mac = "{self.gateway_mac}"\n'
            f'src_v4 = "{self.lb4}"\n'
            f'src_v6 = "{self.lb6}"\n'
            f"max_frame = {self.max_frame}\n"
            + (self.bgp_toml() if self.bgp else "")
        )

    def bgp_toml(self) -> str:
        """This LB host's [bgp] settings: one session per family to the router."""
        from lb.lab.router import LB_ASN, ROUTER_ASN

        peers = ", ".join(
            f'{{ address = "{a}", asn = {ROUTER_ASN} }}' for a in (self.router_lb4, self.router_lb6)
        )
        return (
            f"\n[bgp]\nenabled = true\nasn = {LB_ASN}\nrouter_id = \"{self.lb4}\"\n"
            f"hold_time = {LAB_HOLD_TIME}\npeers = [{peers}]\n"
        )

    def save(self) -> None:
        """Record the lab's parameters so `status`, `down` and doctor find them later."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rec = {k: v for k, v in asdict(self).items() if k != "host_index"}
        (self.run_dir / "lab.json").write_text(json.dumps(rec, indent=1) + "\n")

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX) -> Lab:
        """The lab recorded under a prefix (defaults if the record is missing)."""
        f = RUN_ROOT / prefix / "lab.json"
        if f.is_file():
            return cls(**json.loads(f.read_text()))
        found = [n for n in netns.names(f"{prefix}-b") if re.fullmatch(rf"{prefix}-b\d+", n)]
        hosts = [n for n in netns.names(f"{prefix}-lb") if re.fullmatch(rf"{prefix}-lb\d*", n)]
        return cls(prefix=prefix, backends=max(len(found), 1), lb_hosts=max(len(hosts), 1))


# Building and tearing down.


def _common_sysctls() -> dict[str, int]:
    # Defaults first, so interfaces created afterwards inherit them.
    return {
        # The DSR answer enters the router from a backend link while the VIP route points at
        # the LB; the RSS-friendly outer sources have no route back at all.
        "net.ipv4.conf.all.rp_filter": 0,
        "net.ipv4.conf.default.rp_filter": 0,
        # Tentative IPv6 addresses cannot be used for a second or more.
        "net.ipv6.conf.all.accept_dad": 0,
        "net.ipv6.conf.default.accept_dad": 0,
        "net.ipv6.conf.default.accept_ra": 0,
        # Keep static IPv6 addresses over a link down/up (a host "dying" and coming back).
        "net.ipv6.conf.all.keep_addr_on_down": 1,
        "net.ipv6.conf.default.keep_addr_on_down": 1,
    }


def _build_topology(lab: Lab) -> None:
    for ns in lab.namespaces():
        netns.create(ns)
        netns.set_sysctls(ns, _common_sysctls())
    netns.set_sysctls(lab.router_ns, {
        "net.ipv4.ip_forward": 1,
        "net.ipv6.conf.all.forwarding": 1,
    })
    links: list[tuple[netlink.End, netlink.End]] = [
        (netlink.End(lab.client_ns, CLIENT_IF, lab.client_mac, CLIENT_MTU),
         netlink.End(lab.router_ns, RT_CLIENT_IF, lab.router_client_mac, CLIENT_MTU)),
    ]
    links += [
        (netlink.End(h.lb_ns, LB_IF, h.lb_mac, CORE_MTU),
         netlink.End(h.router_ns, h.router_lb_if, h.router_lb_mac, CORE_MTU))
        for h in lab.hosts()
    ]
    links += [
        (netlink.End(lab.backend_ns(i), BACKEND_IF, lab.backend_mac(i), CORE_MTU),
         netlink.End(lab.router_ns, lab.router_backend_if(i), lab.router_backend_mac(i), CORE_MTU))
        for i in lab.backend_ids
    ]
    for a, b in links:
        netlink.add_veth(a, b)

    addrs: list[tuple[str, str, str]] = [
        (lab.client_ns, CLIENT_IF, f"{lab.client4}/24"),
        (lab.client_ns, CLIENT_IF, f"{lab.client6}/64"),
        (lab.router_ns, RT_CLIENT_IF, f"{lab.router_client4}/24"),
        (lab.router_ns, RT_CLIENT_IF, f"{lab.router_client6}/64"),
    ]
    for h in lab.hosts():
        addrs += [
            (h.lb_ns, LB_IF, f"{h.lb4}/24"),
            (h.lb_ns, LB_IF, f"{h.lb6}/64"),
            (h.router_ns, h.router_lb_if, f"{h.router_lb4}/24"),
            (h.router_ns, h.router_lb_if, f"{h.router_lb6}/64"),
        ]
    for i in lab.backend_ids:
        bns, rif = lab.backend_ns(i), lab.router_backend_if(i)
        addrs += [
            (bns, BACKEND_IF, f"{lab.backend4(i)}/24"),
            (bns, BACKEND_IF, f"{lab.backend6(i)}/64"),
            (lab.router_ns, rif, f"{lab.router_backend4(i)}/24"),
            (lab.router_ns, rif, f"{lab.router_backend6(i)}/64"),
            # The VIP on lo: the backend accepts the decapsulated packet and answers from it.
            (bns, "lo", f"{lab.vip4}/32"),
            (bns, "lo", f"{lab.vip6}/128"),
        ]
    for ns, ifname, cidr in addrs:
        netlink.add_address(ns, ifname, cidr)

    routes: list[tuple[str, str, str]] = [
        (lab.client_ns, "default", lab.router_client4),
        (lab.client_ns, "default", lab.router_client6),
    ]
    for h in lab.hosts():
        routes += [(h.lb_ns, "default", h.router_lb4), (h.lb_ns, "default", h.router_lb6)]
    if not lab.bgp:
        # One LB host: static routes. A fleet learns the VIPs from each host's BGP speaker.
        routes += [(lab.router_ns, VIP_NET4, lab.lb4), (lab.router_ns, VIP_NET6, lab.lb6)]
    for i in lab.backend_ids:
        routes += [
            (lab.backend_ns(i), "default", lab.router_backend4(i)),
            (lab.backend_ns(i), "default", lab.router_backend6(i)),
        ]
    for ns, dst, gw in routes:
        netlink.add_route(ns, dst, gw)

    for i in lab.backend_ids:
        # Only the LB announces the VIP; a backend must not answer ARP for its lo address.
        netns.set_sysctls(lab.backend_ns(i), {
            "net.ipv4.conf.all.arp_ignore": 1,
            "net.ipv4.conf.all.arp_announce": 2,
            f"net.ipv4.conf.{BACKEND_IF}.arp_ignore": 1,
            f"net.ipv4.conf.{BACKEND_IF}.arp_announce": 2,
        })
    # Packets from a veth with tx checksumming on reach native XDP with partial checksums
    # and arrive at backends with bad L4 checksums.
    netns.set_offload(lab.client_ns, CLIENT_IF, "tx", on=False)
    # Native XDP_TX on lb0 delivers only if its peer runs an XDP program.
    for h in lab.hosts():
        netlink.attach_xdp_pass(h.router_ns, h.router_lb_if, "native")
    if lab.decap == "xdp":
        # So does the XDP decap's, passing a second-chance packet on (xdp/decap/second.h).
        for i in lab.backend_ids:
            netlink.attach_xdp_pass(lab.router_ns, lab.router_backend_if(i), "native")
    if lab.bgp:
        # ECMP over the LB hosts, hashed on the 5-tuple (else on addresses only).
        netns.set_sysctls(lab.router_ns, {
            "net.ipv4.fib_multipath_hash_policy": 1,
            "net.ipv6.fib_multipath_hash_policy": 1,
        })


def _attach_decap(lab: Lab) -> None:
    from lb.dataplane.decap import Decap

    # One compile serves every backend; its maps are pinned so doctor can read the counters.
    decap = Decap(pin_dir=lab.decap_pin_dir)
    try:
        for i in lab.backend_ids:
            decap.add_local(lab.backend4(i))
            decap.add_local(lab.backend6(i))
            if lab.decap == "xdp":
                netlink.xdp_attach(lab.backend_ns(i), BACKEND_IF, decap.xdp_fd, "native")
            else:
                netlink.tc_attach_ingress(lab.backend_ns(i), BACKEND_IF, decap.tc_fd, "tc_decap")
    finally:
        # The attachments hold the programs; the pins hold the maps.
        decap.close()


def _child_env() -> dict[str, str]:
    """The environment of the lab's processes: they import lb (and the daemon xlb_api) from
    where this module was imported, whatever their working directory."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    paths = [str(root), *([str(root / "api")] if (root / "api" / "xlb_api").is_dir() else [])]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    return env


def start_servers(lab: Lab, ids: list[int] | None = None) -> None:
    """Start the HTTP/stream/UDP server of each backend and wait until they listen."""
    ids = list(lab.backend_ids) if ids is None else ids
    lab.run_dir.mkdir(parents=True, exist_ok=True)
    ready = {i: lab.run_dir / f"srv-b{i}.ready" for i in ids}
    # The servers import lb.lab.servers from this checkout, whatever the caller's working dir.
    env = _child_env()
    for i in ids:
        ready[i].unlink(missing_ok=True)
        pid = netns.spawn(lab.backend_ns(i), [
            sys.executable, "-m", "lb.lab.servers", "--name", f"b{i}",
            "--http-port", str(HTTP_PORT), "--stream-port", str(STREAM_PORT),
            "--udp-port", str(UDP_PORT),
            "--udp-addr", lab.vip4, "--udp-addr", lab.vip6,
            "--udp-addr", lab.backend4(i), "--udp-addr", lab.backend6(i),
            "--ready-file", str(ready[i]),
        ], log=lab.run_dir / f"srv-b{i}.log", env=env)
        lab.server_pid_file(i).write_text(f"{pid}\n")
    deadline = time.monotonic() + 30
    for i in ids:
        while not ready[i].exists():
            if time.monotonic() > deadline:
                raise KernelError(f"server of backend {i} did not start: see {lab.run_dir}")
            time.sleep(0.05)


def up(lab: Lab, *, servers: bool = True, progress: Callable[[str], None] | None = None) -> Lab:
    """Build the lab (namespaces, links, addresses, routes, decap, servers); undone on error."""
    say = progress or (lambda _m: None)
    existing = [ns for ns in lab.namespaces() if netns.exists(ns)]
    if existing:
        raise InvalidInput(
            f"lab {lab.prefix} is already up ({', '.join(existing)}): run `lab down` first",
            field="prefix",
        )
    if not _bpffs_mounted():
        raise KernelError("bpffs is not mounted at /sys/fs/bpf: mount -t bpf bpf /sys/fs/bpf")
    try:
        lab.save()
        say(f"namespaces and links: client, router, LB, {lab.backends} backends")
        _build_topology(lab)
        say(f"backend decap ({lab.decap}) and VIPs on lo")
        _attach_decap(lab)
        if lab.bgp:
            say(f"router BIRD with BGP sessions to {lab.lb_hosts} LB hosts (ECMP)")
            router_bird(lab).start()
        if servers:
            say("backend servers (HTTP :80, stream :9000, UDP echo :9001)")
            start_servers(lab)
    except BaseException:
        down(lab.prefix)
        raise
    return lab


def router_bird(lab: Lab) -> RouterBird:
    """The fleet lab's router BIRD (files in the run dir, one session per host and family)."""
    neighbors: list[Neighbor] = []
    for h in lab.hosts():
        k = h.host_index
        neighbors += [Neighbor(f"lb{k}_4", h.lb4), Neighbor(f"lb{k}_6", h.lb6)]
    return RouterBird(ns=lab.router_ns, run_dir=lab.run_dir, router_id=lab.router_client4,
                      neighbors=tuple(neighbors), hold_time=LAB_HOLD_TIME)


def _bpffs_mounted() -> bool:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == str(BPFFS) and parts[2] == "bpf":
            return True
    return False


def _stop_pids(pids: list[int], timeout: float = 3.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if netns.pid_alive(p)]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False


def _recorded_pids(run: Path, pattern: str) -> list[int]:
    """Live pids in the run dir's pid files (`pattern`, any depth) whose command names it."""
    if not run.is_dir():
        return []
    out = set()
    for f in run.rglob(pattern):
        pid = _pid_from(f)
        if pid is not None and pid != os.getpid() and netns.pid_alive(pid) \
                and _cmdline_mentions(pid, str(run)):
            out.add(pid)
    return sorted(out)


def lab_namespaces(prefix: str) -> list[str]:
    """Existing namespaces that belong to the lab with this exact prefix."""
    pat = re.compile(rf"^{re.escape(prefix)}-(cl|rt|lb\d*|b\d+)$")
    return [n for n in netns.names(f"{prefix}-") if pat.match(n)]


def down(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove everything a lab created, found by its prefix; returns what was removed."""
    removed: list[str] = []
    spaces = lab_namespaces(prefix)
    run = RUN_ROOT / prefix
    # Processes first (the daemon, the servers), found by the namespace they live in, or,
    # when the namespace is already gone, by a pid file whose process names our run dir.
    # The daemons go first and alone: a daemon still shutting down would start its BGP
    # speaker again once it saw it gone, outside any namespace this function then finds.
    daemons = _recorded_pids(run, "daemon.pid")
    if daemons:
        _stop_pids(daemons)
        removed += [f"process {p}" for p in daemons]
    for _ in range(2):  # once more for anything started while the first round stopped
        found = {p for ns in spaces for p in netns.pids_in(ns)}
        # Servers and the BIRDs (the router's, each host's speaker under its state dir).
        found.update(_recorded_pids(run, "*.pid"))
        pids = sorted(found - set(daemons))
        if not pids:
            break
        _stop_pids(pids)
        removed += [f"process {p}" for p in pids]
    for ns in spaces:
        if netns.delete(ns):
            removed.append(f"netns {ns}")
    pins = BPFFS / prefix
    if pins.is_dir():
        shutil.rmtree(pins, ignore_errors=True)
        removed.append(f"pins {pins}")
    if run.is_dir():
        shutil.rmtree(run, ignore_errors=True)
        removed.append(f"run dir {run}")
    return removed


@contextlib.contextmanager
def running(lab: Lab, *, servers: bool = True) -> Iterator[Lab]:
    """A lab for the duration of a `with` block, torn down even on error."""
    up(lab, servers=servers)
    try:
        yield lab
    finally:
        down(lab.prefix)


# The daemon (`lbctl serve`) inside the LB namespace, and its REST API over a unix socket.


class LabApi(ApiClient):
    """The lab daemon's REST API over its unix socket, with the token the daemon wrote."""

    def __init__(self, lab: Lab, *, echo: Callable[[str], None] | None = None,
                 timeout: float = 30.0) -> None:
        super().__init__(f"unix://{lab.api_socket}", token_file=lab.token_file,
                         timeout=timeout, echo=echo)


def _tail(f: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
    return ""


def start_daemon(
    lab: Lab, *, timeout: float = 180.0, extra_toml: str = "", top_toml: str = ""
) -> int:
    """Start `lbctl serve` in the LB namespace and wait until it is ready; returns its pid.

    It runs through nsenter (only the network namespace changes, so the bpffs pins stay
    visible), listens on the lab's unix socket, and keeps its state under the run dir: a
    restart finds the pinned maps and the stored state again. `extra_toml` is appended to
    the configuration (e.g. other compile-time features, to stand for a new build), `top_toml`
    put before it (top-level keys, e.g. `xdp_chain = true`).
    """
    if daemon_pid(lab) is not None:
        raise InvalidInput(f"the daemon of lab {lab.prefix} already runs", field="daemon")
    attached = netlink.link_info(lab.lb_ns, LB_IF).xdp_mode
    if attached is not None and attached != lab.xdp_mode:
        # The kernel cannot switch XDP modes atomically; a lab may stop forwarding briefly.
        netlink.xdp_detach(lab.lb_ns, LB_IF)
    lab.host_dir.mkdir(parents=True, exist_ok=True)
    lab.config_file.write_text(top_toml + lab.settings_toml() + extra_toml)
    env = _child_env()
    pid = netns.spawn(lab.lb_ns, [
        sys.executable, "-m", "lbctl", "serve", "--config", str(lab.config_file),
        "--uds", str(lab.api_socket), "--token-file", str(lab.token_file),
        "--log-level", "warning",
    ], log=lab.daemon_log, env=env)
    lab.daemon_pid_file.write_text(f"{pid}\n")
    api = LabApi(lab, timeout=5)
    deadline = time.monotonic() + timeout
    while True:
        if not netns.pid_alive(pid):
            raise KernelError(f"the daemon exited while starting:\n{_tail(lab.daemon_log)}")
        if lab.api_socket.exists():
            with contextlib.suppress(OSError, ApiError):
                if api.request("GET", "/readyz")[0] == 200:
                    return pid
        if time.monotonic() > deadline:
            stop_daemon(lab, kill=True)
            raise KernelError(f"the daemon was not ready after {timeout:.0f} s:\n"
                              f"{_tail(lab.daemon_log)}")
        time.sleep(0.1)


def stop_daemon(lab: Lab, *, kill: bool = False, timeout: float = 15.0) -> bool:
    """Stop the daemon (SIGTERM, or SIGKILL to simulate a crash); False if none ran."""
    pid = daemon_pid(lab)
    if pid is None:
        return False
    if kill:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while netns.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    else:
        _stop_pids([pid], timeout)
    lab.daemon_pid_file.unlink(missing_ok=True)
    return True


# Status.


def _pid_from(f: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(f.read_text().split()[0])
    return None


def daemon_pid(lab: Lab) -> int | None:
    """Pid of the lab's daemon if it runs."""
    pid = _pid_from(lab.daemon_pid_file)
    return pid if pid is not None and netns.pid_alive(pid) else None


def status(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """What exists of a lab: namespaces, links with MTU and programs, processes."""
    lab = Lab.load(prefix)
    out: dict[str, Any] = {"prefix": prefix, "config": asdict(lab), "namespaces": {}}
    for ns in lab_namespaces(prefix):
        entry: dict[str, Any] = {"links": [], "pids": netns.pids_in(ns)}
        for li in netlink.links(ns):
            if li.ifname == "lo":
                continue
            link: dict[str, Any] = {"ifname": li.ifname, "mac": li.mac, "mtu": li.mtu,
                                    "up": li.up}
            if li.xdp_prog_id:
                link["xdp"] = f"{li.xdp_prog_name} ({li.xdp_mode}, id {li.xdp_prog_id})"
            tc = netlink.tc_ingress_progs(ns, li.ifname)
            if tc:
                link["tc_ingress"] = [f"{n} (id {i})" for i, n in tc]
            entry["links"].append(link)
        out["namespaces"][ns] = entry
    pid = daemon_pid(lab)
    out["daemon_pid"] = pid
    out["api_socket"] = str(lab.api_socket) if lab.api_socket.exists() else None
    out["lb_hosts"] = {h.lb_ns: {"daemon_pid": daemon_pid(h), "api_socket": str(h.api_socket)}
                       for h in lab.hosts()}
    out["pins"] = sorted(str(p.relative_to(BPFFS)) for p in lab.pin_dir.rglob("*")) \
        if lab.pin_dir.is_dir() else []
    return out


def format_status(st: dict[str, Any]) -> str:
    """Human-readable `lab status`."""
    if not st["namespaces"]:
        return f"lab {st['prefix']}: down (no namespaces)"
    lines = [f"lab {st['prefix']}: {len(st['namespaces'])} namespaces, "
             f"daemon {'pid ' + str(st['daemon_pid']) if st['daemon_pid'] else 'not running'}"]
    for ns, entry in st["namespaces"].items():
        pids = f"  pids {', '.join(map(str, entry['pids']))}" if entry["pids"] else ""
        lines.append(f"  {ns}{pids}")
        for link in entry["links"]:
            progs = [f"xdp {link['xdp']}"] if "xdp" in link else []
            progs += [f"tc ingress {p}" for p in link.get("tc_ingress", [])]
            state = "up" if link["up"] else "DOWN"
            lines.append(f"    {link['ifname']:<7} {link['mac']} mtu {link['mtu']} {state}"
                         + (f"  [{'; '.join(progs)}]" if progs else ""))
    if st["api_socket"]:
        lines.append(f"  API: {st['api_socket']}")
    return "\n".join(lines)


# Traffic from the client namespace (tests and the demo).


@dataclass
class Tally:
    """Outcome of many short connections: answers per backend name and failures."""

    per_backend: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Answers received."""
        return sum(self.per_backend.values())

    def merge(self, other: Tally) -> None:
        """Add another tally to this one."""
        self.per_backend.update(other.per_backend)
        self.failures.update(other.failures)


def _http_once(vip: str, port: int, timeout: float) -> str:
    with socket.create_connection((vip, port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise OSError(f"bad answer {head[:40]!r}")
    return body.decode().strip()


def _udp_once(vip: str, port: int, timeout: float, seq: int) -> str:
    with socket.socket(socket_family(vip), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        payload = f"q{seq}".encode()
        # Each try is a new socket and so a new source port: a new flow, like a new client.
        s.sendto(payload, (vip, port))
        while True:
            data, peer = s.recvfrom(2048)
            name, _, echoed = data.partition(b" ")
            if echoed == payload:
                if ipaddress.ip_address(peer[0]) != ipaddress.ip_address(vip):
                    raise OSError(f"answer came from {peer[0]}, not the VIP")
                return name.decode()


def _spread(ns: str, count: int, workers: int, one: Callable[[int], str]) -> Tally:
    tallies = [Tally() for _ in range(workers)]

    def work(w: int) -> None:
        with netns.entered(ns):
            for n in range(w, count, workers):
                try:
                    tallies[w].per_backend[one(n)] += 1
                except OSError as e:
                    tallies[w].failures[type(e).__name__ + ": " + str(e)[:60]] += 1

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = Tally()
    for t_ in tallies:
        out.merge(t_)
    return out


def http_requests(
    lab: Lab, vip: str, count: int, *, port: int = HTTP_PORT, workers: int = 8,
    timeout: float = 3.0,
) -> Tally:
    """`count` HTTP/1.0 GETs, each on a new TCP connection from the client namespace."""
    return _spread(lab.client_ns, count, workers, lambda _n: _http_once(vip, port, timeout))


def udp_requests(
    lab: Lab, vip: str, count: int, *, port: int = UDP_PORT, workers: int = 8,
    timeout: float = 2.0, tries: int = 3,
) -> Tally:
    """`count` UDP echo exchanges, each from a new source port (a lost datagram is retried)."""

    def one(n: int) -> str:
        err: OSError | None = None
        for _ in range(tries):
            try:
                return _udp_once(vip, port, timeout, n)
            except OSError as e:
                err = e
        assert err is not None
        raise err

    return _spread(lab.client_ns, count, workers, one)


class Stream:
    """A long-lived TCP connection to the stream service that echoes a message every tick."""

    def __init__(self, lab: Lab, vip: str, *, port: int = STREAM_PORT,
                 interval: float = 0.05, stall: float = 3.0) -> None:
        self.interval = interval
        self.stall = stall
        self.sock = netns.call_in(
            lab.client_ns, lambda: socket.create_connection((vip, port), timeout=stall)
        )
        self.sock.settimeout(stall)
        hello = b""
        while not hello.endswith(b"\n"):
            chunk = self.sock.recv(64)
            if not chunk:
                raise OSError("stream closed before the greeting")
            hello += chunk
        self.backend = hello.decode().strip()
        self.echoes = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        try:
            while not self._stop.is_set():
                msg = f"{seq:010d}\n".encode()
                self.sock.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = self.sock.recv(len(msg) - len(got))
                    if not chunk:
                        raise ConnectionResetError("closed by the peer")
                    got += chunk
                if got != msg:
                    raise OSError(f"echo mismatch at {seq}")
                self.echoes += 1
                seq += 1
                self._stop.wait(self.interval)
        except TimeoutError:
            self.error = f"stalled for {self.stall} s after {self.echoes} echoes"
        except OSError as e:
            self.error = f"{type(e).__name__}: {e} after {self.echoes} echoes"

    @property
    def alive(self) -> bool:
        """True while the stream runs without error."""
        return self.error is None and self._thread.is_alive()

    def close(self) -> None:
        """Stop echoing and close the connection with a normal FIN."""
        self._stop.set()
        self._thread.join(timeout=self.stall + 1)
        with contextlib.suppress(OSError):
            self.sock.close()


def open_streams(lab: Lab, vip: str, count: int, **kw: Any) -> list[Stream]:
    """Open `count` streams to a VIP (closing those opened so far if one fails)."""
    out: list[Stream] = []
    try:
        for _ in range(count):
            out.append(Stream(lab, vip, **kw))
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


# Command line: python -m lb.lab.network up|down|status.


def main(argv: list[str] | None = None) -> int:
    """`python -m lb.lab.network up|down|status` (also reached through `lbctl lab`)."""
    p = argparse.ArgumentParser(prog="lab", description="the xlb network lab")
    sub = p.add_subparsers(dest="cmd", required=True)
    pu = sub.add_parser("up", help="build the lab")
    pu.add_argument("--prefix", default=DEFAULT_PREFIX)
    pu.add_argument("--backends", type=int, default=3)
    pu.add_argument("--xdp-mode", choices=["native", "generic"], default="native")
    pu.add_argument("--decap", choices=["tc", "xdp"], default="tc")
    pu.add_argument("--lb-hosts", type=int, default=1,
                    help="LB hosts behind the router; more than 1 announce by BGP, ECMP (1)")
    pu.add_argument("--no-daemon", action="store_true", help="do not start the LB daemon")
    pd = sub.add_parser("down", help="remove everything the lab created")
    pd.add_argument("--prefix", default=DEFAULT_PREFIX)
    ps = sub.add_parser("status", help="show what exists")
    ps.add_argument("--prefix", default=DEFAULT_PREFIX)
    ps.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "up":
        lab = Lab(prefix=a.prefix, backends=a.backends, xdp_mode=a.xdp_mode, decap=a.decap,
                  lb_hosts=a.lb_hosts)
        up(lab, progress=lambda m: _say(f"lab {lab.prefix}: {m}"))
        if not a.no_daemon:
            for h in lab.hosts():
                _say(f"lab {lab.prefix}: starting the daemon (lbctl serve) in {h.lb_ns} ...")
                start_daemon(h)
        _say(format_status(status(lab.prefix)))
        for h in lab.hosts():
            _say(f"\nlbctl --url unix://{h.api_socket} --token-file {h.token_file} ...")
    elif a.cmd == "down":
        removed = down(a.prefix)
        _say("\n".join(f"removed {r}" for r in removed) or f"lab {a.prefix}: nothing to remove")
    else:
        st = status(a.prefix)
        _say(json.dumps(st, indent=1) if a.json else format_status(st))
    return 0


if __name__ == "__main__":
    sys.exit(main())
