"""`lbctl backend-host up|down|status` in a namespace with a veth: the commands of the
xlb-backend@.service unit as written (ExecStart=/ExecStop= with %i and its environment file's
variables) with the unit's capabilities only, a tunnelled packet to a VIP decapsulated and
delivered to a socket on the VIP, the counters, `down` restoring every sysctl and address,
and the one-line errors."""

from __future__ import annotations

import json
import shlex
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lb.dataplane import netns as nsmod
from lb.install import layout, units

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

LBCTL = [sys.executable, "-m", "lbctl"]
VIP4, VIP6 = "198.18.0.10", "2001:db8::10"
BE, PEER = "be0", "up0"
BE_ADDR, PEER_ADDR = "198.18.11.2", "198.18.11.1"
BE_MAC, PEER_MAC = "02:00:00:00:11:02", "02:00:00:00:11:01"
CLIENT = "198.18.1.2"
# A strict rp_filter and no ARP restrictions: what up changes and down must put back.
BEFORE = {"net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.default.rp_filter": "1",
          "net.ipv4.conf.all.arp_ignore": "0", "net.ipv4.conf.all.arp_announce": "0"}


@dataclass(frozen=True)
class Backend:
    """A backend namespace (be0) and the namespace on the other end of its veth (up0)."""

    ns: str
    peer_ns: str
    state_dir: Path
    pin_root: Path

    def where(self, *, netns: bool = True) -> list[str]:
        """The options that point the commands at this namespace and these paths."""
        return [*(["--netns", self.ns] if netns else []), "--state-dir", str(self.state_dir),
                "--pin-root", str(self.pin_root)]

    def sysctls(self) -> dict[str, str]:
        """Every sysctl up may touch, read in the namespace."""
        keys = [*BEFORE, *(f"net.ipv4.conf.{BE}.{k}" for k in
                           ("rp_filter", "arp_ignore", "arp_announce"))]
        return {k: nsmod.get_sysctl(self.ns, k) for k in keys}

    def lo(self) -> set[str]:
        """Addresses on lo."""
        out = nsmod.run(self.ns, ["ip", "-j", "addr", "show", "dev", "lo"]).stdout
        return {a["local"] for link in json.loads(out) for a in link["addr_info"]}


@pytest.fixture
def backend(netns: Callable[[str], str], tmp_path: Path, test_prefix: str) -> Iterator[Backend]:
    ns, peer = netns("bh"), netns("bhup")
    subprocess.run(["ip", "-n", ns, "link", "add", BE, "address", BE_MAC, "type", "veth",
                    "peer", "name", PEER, "netns", peer, "address", PEER_MAC], check=True)
    for n, dev, addr in ((ns, BE, BE_ADDR), (peer, PEER, PEER_ADDR)):
        nsmod.run(n, ["ip", "addr", "add", f"{addr}/24", "dev", dev])
        nsmod.run(n, ["ip", "link", "set", dev, "up"])
        nsmod.run(n, ["ip", "link", "set", "lo", "up"])
    nsmod.run(ns, ["ip", "route", "add", "default", "via", PEER_ADDR])
    nsmod.set_sysctls(ns, BEFORE)
    b = Backend(ns, peer, tmp_path / "state", Path(f"/sys/fs/bpf/{test_prefix}_bh"))
    try:
        yield b
    finally:
        subprocess.run(["rm", "-rf", str(b.pin_root)], check=False)


def _unit_command(key: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart=/ExecStop= for instance be0, with its variables expanded the way
    systemd does (${X} as one word, $X split on spaces), run with this checkout's lbctl."""
    line = units.section(units.text(layout.BACKEND_SERVICE))[key][-1].replace("%i", BE)
    out: list[str] = []
    for word in shlex.split(line):
        if word.startswith("${"):
            out.append(env[word[2:-1]])
        elif word.startswith("$"):
            out += env[word[1:]].split()
        else:
            out.append(word)
    assert out[0] == str(layout.PREFIX / "bin" / "lbctl")
    return [*LBCTL, *out[1:]]


def _lbctl(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def as_the_unit(b: Backend, argv: list[str]) -> list[str]:
    """`argv` in the backend's namespace with what xlb-backend@.service leaves the process:
    root's uid, only its CapabilityBoundingSet=, no-new-privs. systemd is not PID 1 here, so
    setpriv does it; the namespace is entered first (nsenter, as root: setns needs
    CAP_SYS_ADMIN), so the command runs without --netns, as on a host."""
    svc = units.section(units.text(layout.BACKEND_SERVICE))
    assert "User" not in svc, "the backend unit is meant to keep root's uid"
    caps = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}"
                               for c in svc["CapabilityBoundingSet"][-1].split())])
    assert svc["NoNewPrivileges"] == ["yes"]
    return ["nsenter", f"--net=/run/netns/{b.ns}", "setpriv", f"--bounding-set={caps}",
            "--inh-caps=-all", "--no-new-privs", *argv]


def _tunnelled_udp(b: Backend, payload: bytes, bind: str = VIP4,
                   second_hop: bool = False) -> bytes | None:
    """An IPIP packet to the backend's address carrying UDP to VIP4:9001 (with `second_hop`:
    GUE naming a second hop, PEER_ADDR, with no hop left, as a passed-on packet arrives);
    what a socket bound on `bind` (the VIP) inside the backend receives."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.sendrecv import sendp

    from lb.dataplane.decap import DECAP_DEFAULT_GUE_PORT

    sock = nsmod.call_in(b.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sock.bind((bind, 9001))
        sock.settimeout(2)
        inner = IP(src=CLIENT, dst=VIP4) / UDP(sport=40000, dport=9001) / payload
        frame = Ether(src=PEER_MAC, dst=BE_MAC) / IP(src=PEER_ADDR, dst=BE_ADDR, proto=4) / inner
        if second_hop:  # GUE variant 0, private data: second hop (xdp/common/gue.h), hops 0
            gue = (bytes([2, 4, 0, 0]) + struct.pack("!HBB", 0x786C, 0, 4)
                   + socket.inet_aton(PEER_ADDR))
            frame = (Ether(src=PEER_MAC, dst=BE_MAC) / IP(src=PEER_ADDR, dst=BE_ADDR)
                     / UDP(sport=50000, dport=DECAP_DEFAULT_GUE_PORT, chksum=0)
                     / Raw(gue + bytes(inner)))
        nsmod.call_in(b.peer_ns, lambda: sendp(frame, iface=PEER, verbose=False))
        try:
            return sock.recv(2048)
        except TimeoutError:
            return None
    finally:
        sock.close()


@pytest.mark.parametrize("mode", ["tc", pytest.param("xdp", marks=pytest.mark.slow)])
def test_up_decapsulates_to_the_vip_and_down_restores_everything(
    backend: Backend, mode: str
) -> None:
    b = backend
    before, lo_before = b.sysctls(), b.lo()
    env = {"XLB_BACKEND_MODE": mode, "XLB_BACKEND_VIPS": f"{VIP4} {VIP6}"}
    up = _lbctl(as_the_unit(b, [*_unit_command("ExecStart", env), *b.where(netns=False)]))
    assert up.returncode == 0, up.stderr
    assert {VIP4, VIP6} <= b.lo()
    now = b.sysctls()
    assert now["net.ipv4.conf.all.arp_ignore"] == "1"
    assert now["net.ipv4.conf.all.arp_announce"] == "2"
    assert now[f"net.ipv4.conf.{BE}.arp_ignore"] == "1"
    assert now["net.ipv4.conf.all.rp_filter"] == "2", "strict rp_filter was not loosened"

    assert _tunnelled_udp(b, b"hello") == b"hello", "the tunnelled packet did not reach the VIP"
    st = _lbctl([*LBCTL, "backend-host", "status", "--interface", BE, *b.where(), "-o", "json"])
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["attached"] and status["mode"] == mode
    assert status["vips"] == {VIP4: True, VIP6: True}
    assert status["counters"]["DECAP_STAT_IPIP"] == 1, status["counters"]
    table = _lbctl([*LBCTL, "backend-host", "status", "--interface", BE, *b.where()])
    assert "ipip             1" in table.stdout, table.stdout
    # Second chance's outcomes are there too: a passed-on packet (no hop left) is kept.
    assert _tunnelled_udp(b, b"hop", second_hop=True) == b"hop", "the second hop did not keep it"
    st = _lbctl([*LBCTL, "backend-host", "status", "--interface", BE, *b.where(), "-o", "json"])
    counters = json.loads(st.stdout)["counters"]
    assert (counters["DECAP_STAT_GUE_V4"], counters["DECAP_STAT_SC_KEEP_LAST"]) == (1, 1)
    table = _lbctl([*LBCTL, "backend-host", "status", "--interface", BE, *b.where()])
    assert "sc_keep_last     1" in table.stdout, table.stdout
    for row in ("sc_keep_syn", "sc_keep_socket", "sc_keep_cookie", "sc_keep_other",
                "sc_forward"):
        assert f"  {row} " in table.stdout, f"{row} missing: {table.stdout}"

    down = _lbctl(as_the_unit(b, [*_unit_command("ExecStop", env), *b.where(netns=False)]))
    assert down.returncode == 0, down.stderr
    assert b.sysctls() == before, "down did not restore the sysctls"
    assert b.lo() == lo_before, "down left addresses on lo"
    assert not (b.state_dir / f"{BE}.json").exists()
    assert not (b.pin_root / BE).exists()
    tc = nsmod.run(b.ns, ["tc", "filter", "show", "dev", BE, "ingress"]).stdout
    xdp = nsmod.run(b.ns, ["ip", "-j", "link", "show", BE]).stdout
    assert "tc_decap" not in tc and "xdp" not in json.loads(xdp)[0], "decap still attached"
    assert _tunnelled_udp(b, b"again", bind="0.0.0.0") is None, "still decapsulated after down"


def test_errors_are_one_line_naming_what_is_wrong(backend: Backend) -> None:
    b = backend
    cases = [
        (["--interface", "nosuch0", "--vip", VIP4], "no interface nosuch0"),
        (["--interface", BE, "--vip", BE_ADDR], f"address {BE_ADDR} is in use on {BE}"),
        (["--interface", BE, "--vip", "198.18.0.300"], "is not an IP address"),
    ]
    for args, want in cases:
        p = _lbctl([*LBCTL, "backend-host", "up", *args, *b.where()])
        assert p.returncode == 1, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and want in lines[0], (args, lines)
    p = _lbctl([*LBCTL, "backend-host", "down", "--interface", BE, *b.where()])
    assert p.returncode == 1 and "is not up on" in p.stderr
    assert b.lo() == {"127.0.0.1", "::1"}, "a failed up left addresses on lo"
    assert not b.state_dir.exists() or not any(b.state_dir.iterdir()), "a failed up left state"
