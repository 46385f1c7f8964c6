"""Forwarding benchmark: packets per second through the LB on veth, next to reference programs.

Topology ("LB on a stick", as the balancer is deployed)::

    namespace <prefix>-gen  (client side and router)      namespace <prefix>-lb
    trafgen --> xbg0 (MAC 02:00:00:00:00:fe) ===== veth ===== xbl0 (MAC 02:00:00:00:00:01)
                 ^ xdp_sink: counts and drops            <prog under test on xbl0>
                 |                                                  |
                 +------------- XDP_TX / kernel forwarding ---------+

trafgen writes frames into xbg0 (a packet socket, so the generator-side XDP program never
sees them); they arrive on xbl0 where the program under test runs. Whatever the LB sends
goes back out of xbl0, its only interface, towards the router's MAC, and arrives on xbg0,
whose XDP program counts it per CPU and drops it. That sink is also what native XDP_TX on a
veth needs to deliver (the peer must run an XDP program, docs/veth-lab.md), so the
same attachment makes the path work and measures it. Forwarded packets per second are read
from the sink's per-CPU counters; for drop_limit, from the LB-side program's own counter.

Scenarios, all in one run, because on a shared two-core machine only ratios within one run
mean anything:
  drop_limit   XDP_DROP at the LB: what the generator and the veth path can deliver at all;
  fwd_floor    rewrite MACs and XDP_TX: the cheapest possible forwarding on this path;
  lb_native    the balancer, native XDP, one VIP, four backends, ~64k flows (table hits);
  lb_one_flow  the same with one flow: the program's own cost, its table lookup always cached
               (the difference to lb_native is what a cache-missing table lookup costs here);
  lb_generic   the same program in generic (skb) mode;
  lb_1m_flows  native, with 1,000,000 flows already in the connection table, traffic spread
               at random over exactly those flows (cache-missing lookups in a large table);
  syn_flood    native, TCP SYNs from random sources and ports: every packet a new flow;
               100,000 established TCP flows are written into the table before it, and
               `established` says how many are still there, on their backend, after it, and
               how many of a sample of their ACKs the program still sends to that backend;
  kernel_fwd   no XDP: the LB namespace's kernel routes the packets back to the router;
  katran_native, katran_one_flow  Katran's balancer (bench/katran/, KATRAN_SRC) with the same
               VIP, backends and Maglev ring, as lb_native and lb_one_flow (absent without
               KATRAN_SRC: the run says how to get them).

Multi-core (full run): fwd_floor, lb_native and katran_native again with two trafgen sender
CPUs, each on its own veth RX/TX queue pair (both ends have two), next to the one-CPU runs:
`multicore` in the JSON gives Mpps at 1 and 2 CPUs and the scaling (2-CPU Mpps / 1-CPU Mpps).

Two figures per scenario, both medians over 5 windows after a warm-up, pooled over `rounds`
interleaved passes:
  mpps           forwarded packets per wall-clock second, as the brief defines the benchmark;
  ns_per_packet  CPU time of the path (trafgen's workers plus the sender CPUs' ksoftirqd,
                 from /proc/PID/schedstat) per forwarded packet.
veth runs the LB's NAPI, the program under test, the XDP_TX to the peer and the sink all in
softirq on the CPU that transmitted, on the back of trafgen's sendto(): the path is one CPU's
work per sender, so ns_per_packet is its cost whatever else runs on the machine, while
wall-clock Mpps fall whenever another process takes that CPU. On a shared machine the ratios
by CPU time (`ratio_to_floor_cpu`) are the ones to read. Windows in which the path got less
than CLEAN_SHARE of its CPU are left out when enough others remain (`clean_windows`).

The generator and the veth skb path dominate every packet's cost here (native XDP on veth
converts each skb from the packet socket, copying it), so the program under test is a part of
it: a ratio near 1 against fwd_floor says the balancer adds little to the cheapest XDP_TX
forwarding on this path, not that it runs at line rate.

Traffic only ever flows between the two namespaces made here (named `xbench<pid>-*`, deleted on
the way out and swept by later runs if this process dies), with addresses from
198.18.0.0/15; every trafgen run is bounded by `timeout` and stopped with SIGINT to its own
process group.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lb.config import DataplaneConfig
from lb.consts import STAT_INDEX
from lb.dataplane import netlink, netns

NAME = "forwarding"
SCENARIOS = (
    "drop_limit", "fwd_floor", "lb_native", "lb_one_flow", "lb_generic", "lb_1m_flows",
    "syn_flood", "kernel_fwd", "katran_native", "katran_one_flow",
)
# The scenarios only a run with KATRAN_SRC measures.
KATRAN_SCENARIOS = ("katran_native", "katran_one_flow")
# Multi-core: these programs at 1 and 2 sender CPUs (udp/64B, ~64k flows).
MULTICORE = (("fwd_floor", "floor"), ("lb_native", "balancer"), ("katran_native", "katran"))

PREFIX = f"xbench{os.getpid()}"
_STALE = re.compile(r"^xbench(\d+)-")
GEN_IF, LB_IF = "xbg0", "xbl0"
ROUTER_MAC, LB_MAC = "02:00:00:00:00:fe", "02:00:00:00:00:01"
ROUTER_IP, LB_IP = "198.18.0.1", "198.18.0.2"
LAB_PREFIXLEN = 24
VIP = ipaddress.IPv4Address("198.18.0.10")
VIP_PORT = 80
BACKENDS = [ipaddress.IPv4Address(f"198.18.1.{i}") for i in (2, 3, 4, 5)]
BACKEND_NET = "198.18.1.0/24"
# Room for the 20-byte IPIP header and more; native XDP on veth refuses MTUs above 3506.
LAB_MTU = 1600
# One client sending to ~64k ports: every flow sits in the connection table after one pass.
CLIENT = "198.18.2.1"
SPORT_MIN, SPORT_MAX = 1024, 65000
# lb_1m_flows: 16 clients x 62,500 ports = 1,000,000 flows, prefilled before the traffic.
TABLE_NET = "198.18.16.0"
TABLE_CLIENTS, TABLE_PORTS = 16, 62_500
# syn_flood's survivors: 16 clients x Timing.est_ports ports = 1,000,000 established TCP
# flows to the TCP VIP in a full run (issue 18's goal; 100,000 in a smoke run), written into
# the emptied table before the flood; after it, each is looked up in the table and a sample
# of their ACKs is run through the program (BPF_PROG_TEST_RUN). Outside the flood's sources
# (198.18.0.0/16): a spoofed SYN that carries a live flow's exact 5-tuple is a new connection
# of that tuple, and in a /16 with every port ~1 flood SYN in 4,000 would carry one; on the
# internet the odds are nil. (One run with them inside: 1 of 999,882 re-steered, 0 evicted.)
EST_NET = "198.19.48.0"
EST_CLIENTS = 16
EST_SAMPLE = 2_000
# 4,194,304 slots (the default): 1M prefilled flows fill about 0.02% of the sets of 8.
CONN_TABLE_SIZE = 4_194_304
RING_SIZE = 65537
# Frame sizes as benchmarks quote them, 4-byte FCS included; trafgen writes them without it.
FCS = 4
ETH_IP = 14 + 20
L4_LEN = {"udp": 8, "syn": 20}
STOP_GRACE_S = 5.0
# A window is clean when the path had at least this share of its sender CPU(s) ...
CLEAN_SHARE = 0.85
# ... and clean windows are used alone when there are at least this many.
MIN_CLEAN = 3


@dataclass(frozen=True)
class Timing:
    """How long each measurement runs."""

    warmup_s: float
    window_s: float
    windows: int
    rounds: int
    matrix: bool
    #: syn_flood's established flows: EST_CLIENTS x est_ports.
    est_ports: int


FULL = Timing(warmup_s=1.0, window_s=0.5, windows=5, rounds=2, matrix=True, est_ports=62_500)
SMOKE = Timing(warmup_s=0.3, window_s=0.1, windows=5, rounds=1, matrix=False, est_ports=6_250)


@dataclass(frozen=True)
class Traffic:
    """One trafgen workload: protocol, frame size, flow pattern, sender CPUs."""

    proto: str = "udp"  # udp | syn
    frame: int = 64
    # seq (~64k flows) | one (a single flow) | table (the 1M prefilled) | random (all new)
    flows: str = "seq"
    cpus: int = 1
    dst: str = str(VIP)

    @property
    def label(self) -> str:
        """Short name, e.g. udp/64B/1cpu."""
        return f"{self.proto}/{self.frame}B/{self.cpus}cpu"

    def config(self) -> str:
        """The trafgen packet configuration."""
        if self.flows == "seq":
            src, sport = f"sa={CLIENT}", f"dinc({SPORT_MIN}, {SPORT_MAX})"
        elif self.flows == "one":
            src, sport = f"sa={CLIENT}", str(SPORT_MIN)
        elif self.flows == "table":
            src = f"sa={TABLE_NET}, sa[3]=drnd(0, {TABLE_CLIENTS - 1})"
            sport = f"drnd({SPORT_MIN}, {SPORT_MIN + TABLE_PORTS - 1})"
        elif self.flows == "random":
            # Sources anywhere in 198.18.0.0/16: the two low bytes are random.
            src, sport = f"sa={CLIENT}, sa[2:2]=drnd()", "drnd(1024, 65535)"
        else:
            raise ValueError(f"unknown flow pattern {self.flows}")
        if self.proto == "udp":
            l4 = f"udp(sp={sport}, dp={VIP_PORT})"
        elif self.proto == "syn":
            l4 = f"tcp(sp={sport}, dp={VIP_PORT}, syn, seq=drnd(), win=65535)"
        else:
            raise ValueError(f"unknown protocol {self.proto}")
        # The padding is L4 payload, so every checksum trafgen computes covers the whole frame.
        pad = self.frame - FCS - ETH_IP - L4_LEN[self.proto]
        return (
            "{\n"
            f"  eth(da={LB_MAC}, sa={ROUTER_MAC}),\n"
            f"  ipv4({src}, da={self.dst}, ttl=64),\n"
            f"  {l4},\n"
            f"  fill(0x00, {pad})\n"
            "}\n"
        )


@dataclass(frozen=True)
class Window:
    """One measuring window."""

    mpps: float  # forwarded (at the sink; dropped at the LB for drop_limit) per wall second
    offered_mpps: float  # what the generator put on the wire
    ns_per_packet: float | None  # sender-CPU time of the path per forwarded packet
    cpu_share: float  # of the sender CPUs' wall time, how much the path got


@dataclass
class Measurement:
    """What one or more runs of one scenario gave."""

    windows: list[Window] = field(default_factory=list)
    lb_drops: int = 0
    span_s: float = 0.0
    sink_all: int = 0  # frames the sink counted over the whole run (traffic stopped)
    sink_encap: int = 0  # of those, IP-in-IP / IPv6-encapsulated
    lru_hits: int = 0  # balancer: connection-table hits over the whole run
    lru_misses: int = 0  # balancer: misses (SYN or not), each a ring lookup and an insert

    def clean(self) -> list[Window]:
        """Windows in which the path had its CPU(s) nearly to itself, if there are enough.

        On a shared machine another process can take the sender's CPU for part of a window;
        the path's softirq work is then partly charged to that process, so both the wall
        rate and the CPU time per packet of such a window are off. Those windows are left
        out when at least MIN_CLEAN windows remain; otherwise all are used (see `clean_windows`
        in the results).
        """
        ok = [w for w in self.windows if w.cpu_share >= CLEAN_SHARE]
        return ok if len(ok) >= MIN_CLEAN else self.windows

    @property
    def mpps(self) -> float:
        """Median forwarded Mpps over the clean windows."""
        return _median([w.mpps for w in self.clean()]) or 0.0

    @property
    def ns_per_packet(self) -> float | None:
        """Median sender-CPU ns per forwarded packet over the clean windows."""
        return _median([w.ns_per_packet for w in self.clean() if w.ns_per_packet])

    def merge(self, other: Measurement) -> None:
        """Pool another round of the same scenario."""
        self.windows += other.windows
        self.lb_drops += other.lb_drops
        self.span_s += other.span_s
        self.sink_all += other.sink_all
        self.sink_encap += other.sink_encap
        self.lru_hits += other.lru_hits
        self.lru_misses += other.lru_misses


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _say(msg: str) -> None:
    print(f"[forwarding] {msg}", flush=True)


# The lab.


def sweep_stale() -> list[str]:
    """Delete namespaces this benchmark left behind in processes that no longer run."""
    gone = []
    for name in netns.names("xbench"):
        m = _STALE.match(name)
        if m and not netns.pid_alive(int(m.group(1))):
            netns.delete(name)
            gone.append(name)
    return gone


@dataclass(frozen=True)
class Lab:
    """The two namespaces and their veth."""

    gen: str
    lb: str


@contextlib.contextmanager
def lab(prefix: str = PREFIX) -> Iterator[Lab]:
    """Build the generator/router and LB namespaces; both are deleted on the way out."""
    sweep_stale()
    gen, lbns = f"{prefix}-gen", f"{prefix}-lb"
    with netns.namespace(gen), netns.namespace(lbns):
        for ns in (gen, lbns):
            # No IPv6 autoconfiguration chatter reaching the sink.
            netns.set_sysctls(ns, {"net.ipv6.conf.all.disable_ipv6": 1,
                                   "net.ipv6.conf.default.disable_ipv6": 1})
        netlink.add_veth(netlink.End(gen, GEN_IF, ROUTER_MAC, LAB_MTU),
                       netlink.End(lbns, LB_IF, LB_MAC, LAB_MTU))
        # One queue per sender CPU, so two trafgen workers do not share one veth ring.
        netns.set_queues(gen, GEN_IF, 2)
        netns.set_queues(lbns, LB_IF, 2)
        netns.set_offload(gen, GEN_IF, "tx", on=False)
        netlink.add_address(gen, GEN_IF, f"{ROUTER_IP}/{LAB_PREFIXLEN}")
        netlink.add_address(lbns, LB_IF, f"{LB_IP}/{LAB_PREFIXLEN}")
        # kernel_fwd: the LB's kernel routes backends' traffic back to the router, like the LB.
        netns.set_sysctls(lbns, {
            "net.ipv4.ip_forward": 1,
            "net.ipv4.conf.all.send_redirects": 0,
            f"net.ipv4.conf.{LB_IF}.send_redirects": 0,
            "net.ipv4.conf.all.rp_filter": 0,
            f"net.ipv4.conf.{LB_IF}.rp_filter": 0,
        })
        netlink.add_route(lbns, BACKEND_NET, ROUTER_IP)
        # The sink drops ARP too: the router's MAC is configured, never resolved.
        netns.run(lbns, ["ip", "neigh", "replace", ROUTER_IP, "lladdr", ROUTER_MAC,
                         "dev", LB_IF, "nud", "permanent"])
        yield Lab(gen, lbns)


# Counters.


# sink_count slots (enum sink_slot in bench/xdp/bench_progs.c).
SINK_ALL, SINK_ENCAP = 0, 1


def percpu_packets(table: Any, slot: int = 0) -> int:
    """Sum over CPUs of one slot of a per-CPU array of struct bench_count (or of __u64)."""
    vals = table[table.Key(slot)]
    return sum(int(getattr(v, "packets", v)) for v in vals)


def link_counters(ns: str, ifname: str) -> dict[str, int]:
    """tx/rx packet and drop counters of an interface (netlink stats64)."""
    with netlink.iproute(ns) as ipr:
        msg = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
    st = msg.get("IFLA_STATS64")
    return {k: int(st.get(k, 0)) for k in ("tx_packets", "tx_dropped", "rx_packets", "rx_dropped")}


def ethtool_counters(ns: str, ifname: str) -> dict[str, int]:
    """veth's per-queue counters (ethtool -S), summed over queues by name."""
    out = netns.run(ns, ["ethtool", "-S", ifname]).stdout
    sums: dict[str, int] = {}
    for line in out.splitlines():
        key, _, val = line.strip().partition(":")
        m = re.match(r"^(rx|tx)_queue_\d+_(\w+)$", key)
        if m and val.strip().isdigit():
            name = f"{m.group(1)}_{m.group(2)}"
            sums[name] = sums.get(name, 0) + int(val)
    return sums


# trafgen.


@contextlib.contextmanager
def trafgen(
    ns: str, ifname: str, traffic: Traffic, max_s: float
) -> Iterator[subprocess.Popen[str]]:
    """Run trafgen in a namespace; it stops by itself after `max_s` and on leaving the block."""
    with tempfile.NamedTemporaryFile("w", prefix="xbench-", suffix=".cfg", delete=False) as f:
        f.write(traffic.config())
        cfg = f.name
    # `timeout` makes the run bounded even if this process dies; it signals its whole group.
    argv = ["timeout", "-s", "INT", "-k", "3", f"{max_s:.1f}",
            *netns.cmd(ns, ["trafgen", "--dev", ifname, "--conf", cfg,
                            "--cpus", str(traffic.cpus), "--no-sock-mem", "-Q"])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc)
        os.unlink(cfg)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=STOP_GRACE_S)


# CPU time of the path: trafgen's workers and the senders' ksoftirqd threads.


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in f.read_text().split()]
    return out


def trafgen_workers(root: int) -> list[int]:
    """Pids of the trafgen processes that send (the leaves under `root`)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = _children(pid)
        todo += kids
        with contextlib.suppress(OSError):
            if not kids and Path(f"/proc/{pid}/comm").read_text().strip() == "trafgen":
                found.append(pid)
    return found


def ksoftirqd(cpu: int) -> int | None:
    """Pid of the kernel thread ksoftirqd/<cpu> (read only: nothing is ever signalled)."""
    want = f"ksoftirqd/{cpu}"
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "comm").read_text().strip() == want:
                    return int(p.name)
    return None


def cpu_time_ns(pids: list[int]) -> int:
    """Sum of the tasks' run time in ns (/proc/PID/schedstat, scheduler-exact).

    Without IRQ time accounting (this kernel), softirq work done on the back of trafgen's
    sendto(), which is where the veth NAPI, the LB's XDP program and the sink run, is charged
    to trafgen; softirq work deferred to ksoftirqd is charged to that thread.
    """
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return total


# Programs.


class BenchPrograms:
    """bench/xdp/bench_progs.c: the sink, XDP_DROP at the LB and the forwarding floor."""

    def __init__(self) -> None:
        from bench.common import XDP_DIR
        from lb.dataplane.loader import compile_program

        self.bpf = compile_program(XDP_DIR / "bench_progs.c", [])
        xdp = self.bpf.XDP
        self.sink = self.bpf.load_func(b"xdp_sink", xdp)
        self.drop = self.bpf.load_func(b"xdp_lb_drop", xdp)
        self.floor = self.bpf.load_func(b"xdp_fwd_floor", xdp)
        gw = self.bpf[b"floor_gw_mac"]
        leaf = gw.Leaf()
        ctypes.memmove(ctypes.addressof(leaf), bytes.fromhex(ROUTER_MAC.replace(":", "")), 6)
        gw[gw.Key(0)] = leaf
        self.sink_count = self.bpf[b"sink_count"]
        self.drop_count = self.bpf[b"drop_count"]

    def close(self) -> None:
        """Unload."""
        self.bpf.cleanup()


class LoadedBalancer:
    """The balancer programmed with one UDP and one TCP VIP on port 80 and four backends."""

    def __init__(self) -> None:
        from lb.dataplane.loader import Balancer

        self.cfg = DataplaneConfig(ring_size=RING_SIZE, max_vips=4, max_reals=16,
                                   conn_table_size=CONN_TABLE_SIZE)
        self.b = Balancer(self.cfg)
        self._state_dir: tempfile.TemporaryDirectory[str] | None = None
        self.real_idx = 0
        self.vip_num = 0
        self.tcp_vip_num = 0
        self.est_ports = 0  # set by establish()
        self.programmed_by = self._program()

    @property
    def fd(self) -> int:
        """Program fd."""
        return self.b.prog_fd

    def _program(self) -> str:
        """Runtime configuration, then VIPs and backends through the control plane."""
        from lb.config import RuntimeConfig
        from lb.control.facade import ControlPlane
        from lb.control.model import BackendSpec, VipSpec
        from lb.dataplane.loader import write_runtime_config

        write_runtime_config(self.b, RuntimeConfig(gateway_mac=ROUTER_MAC,
                                                   src_v4=ipaddress.IPv4Address(LB_IP)))
        self._state_dir = tempfile.TemporaryDirectory(prefix="xbench-state-")
        cp = ControlPlane(SimpleNamespace(state_dir=Path(self._state_dir.name)), self.b)
        backends = [BackendSpec(address=a) for a in BACKENDS]
        for proto in ("udp", "tcp"):
            cp.create_vip(VipSpec(protocol=proto, address=VIP, port=VIP_PORT,
                                  backends=backends))
        # Prefilled flows point at a backend the control plane really placed in `reals`.
        self.real_idx = cp.backend_index(str(BACKENDS[0]))
        self.vip_num = cp.vip_number(f"udp:{VIP}:{VIP_PORT}")
        self.tcp_vip_num = cp.vip_number(f"tcp:{VIP}:{VIP_PORT}")
        cp.close()
        return "lb.control (Maglev ring, one UDP and one TCP VIP, 4 backends)"

    def forwards(self) -> bool:
        """Whether the loaded program sends a UDP packet to the VIP back out (XDP_TX)."""
        from lb.consts import XDP_TX
        from lb.dataplane.testrun import TestRunner

        frame = _udp_frame(CLIENT, str(VIP), 40000, VIP_PORT, 60)
        return TestRunner(self.fd).run(frame).verdict == XDP_TX

    def stat(self, name: str) -> int:
        """One of the balancer's global counters (STAT_*), summed over CPUs."""
        t = self.b.glob_stats
        return sum(int(v) for v in t[t.Key(STAT_INDEX[name])])

    def drops(self) -> int:
        """The balancer's own XDP_DROP counter."""
        return self.stat("STAT_XDP_DROP")

    def prefill(self, clients: int, ports: int) -> float:
        """Put clients x ports UDP flows to the VIP in the connection table; returns seconds.

        One vectorised write through lb.dataplane.conntab (hashes and slots computed with numpy, the
        table written in place through its mapping), before any traffic runs.
        """
        import numpy as np

        from lb.dataplane.conntab import ConnTable
        from lb.dataplane.flowhash import Flows

        t0 = time.monotonic()
        n = clients * ports
        flow = np.arange(n)
        flows = Flows.v4(int(ipaddress.IPv4Address(TABLE_NET)) + flow // ports, int(VIP),
                         SPORT_MIN + flow % ports, VIP_PORT, socket.IPPROTO_UDP)
        with ConnTable(self.b) as table:
            written = table.insert_many(flows, self.real_idx, self.vip_num, udp=True)
        secs = time.monotonic() - t0
        if written < n:
            # A set of 8 that more than 8 prefilled flows hash to keeps 8: the rest miss once.
            print(f"[forwarding] prefill: {n - written} of {n} flows found their set full",
                  file=sys.stderr)
        return secs

    def _est_flows(self) -> Any:
        import numpy as np

        from lb.dataplane.flowhash import Flows

        ports = self.est_ports
        flow = np.arange(EST_CLIENTS * ports)
        return Flows.v4(int(ipaddress.IPv4Address(EST_NET)) + flow // ports, int(VIP),
                        SPORT_MIN + flow % ports, VIP_PORT, socket.IPPROTO_TCP)

    def _est_flow(self, k: int) -> Any:
        from lb.dataplane.flowhash import Flow5

        ports = self.est_ports
        return Flow5(ipaddress.IPv4Address(int(ipaddress.IPv4Address(EST_NET)) + k // ports),
                     VIP, SPORT_MIN + k % ports, VIP_PORT, socket.IPPROTO_TCP)

    def _on_backend(self) -> list[int]:
        from lb.dataplane.conntab import ConnTable

        with ConnTable(self.b) as table:
            return [k for k in range(EST_CLIENTS * self.est_ports)
                    if (e := table.lookup(self._est_flow(k))) is not None
                    and e.real_idx == self.real_idx]  # fmt: skip

    def establish(self, ports: int) -> list[int]:
        """Empty the table, then write syn_flood's EST_CLIENTS x `ports` established TCP
        flows (all on BACKENDS[0]); returns the ids of those the table holds (a set of 8
        that more hash to keeps 8)."""
        from lb.dataplane.conntab import ConnTable

        self.est_ports = ports
        with ConnTable(self.b) as table:
            table.clear()  # the earlier scenarios' flows would fill some sets first
            table.insert_many(self._est_flows(), self.real_idx, self.tcp_vip_num)
        return self._on_backend()

    def survival(self, before: list[int]) -> dict[str, Any]:
        """How many of the established flows `before` are still in the table on their
        backend, and whether a sample of their ACKs still goes to it (outer destination
        BACKENDS[0], a table hit)."""
        from lb.consts import XDP_TX
        from lb.dataplane.testrun import TestRunner

        kept = len(set(self._on_backend()) & set(before))
        runner = TestRunner(self.fd)
        sample = before[::max(1, len(before) // EST_SAMPLE)]
        hits0 = self.stat("STAT_LRU_HIT")
        on_backend = 0
        for k in sample:
            f = self._est_flow(k)
            res = runner.run(_tcp_ack_frame(str(f.src), str(VIP), f.sport, VIP_PORT))
            outer = res.packet[ETH_IP - 20 + 16:ETH_IP] if res.verdict == XDP_TX else b""
            on_backend += outer == BACKENDS[0].packed
        return {
            "flows": EST_CLIENTS * self.est_ports, "in_table_before": len(before),
            "in_table_after": kept, "survival": round(kept / len(before), 6) if before else None,
            "sample": len(sample), "sample_forwarded_to_backend": on_backend,
            "sample_table_hits": self.stat("STAT_LRU_HIT") - hits0,
        }

    def close(self) -> None:
        """Unload, and drop the control plane's scratch store."""
        self.b.close()
        if self._state_dir is not None:
            self._state_dir.cleanup()


class LoadedKatran:
    """Katran's balancer (bench/katran/harness.py) with the lab's UDP and TCP VIP, the same
    four backends and the same Maglev ring as LoadedBalancer's."""

    def __init__(self, obj: Path) -> None:
        from bench.katran import harness
        from lb.control.maglev import Endpoint, build_ring, ring_to_values

        index = {str(a): i for i, a in enumerate(BACKENDS, start=1)}
        ring = list(ring_to_values(build_ring([Endpoint(str(a)) for a in BACKENDS],
                                              RING_SIZE), index))
        vips = [harness.KatranVip(num, VIP, VIP_PORT, proto, ring)
                for num, proto in ((0, socket.IPPROTO_UDP), (1, socket.IPPROTO_TCP))]
        self.k = harness.Katran(obj, Path(f"/sys/fs/bpf/{PREFIX}-katran"),
                                gateway_mac=ROUTER_MAC,
                                reals={i: a for i, a in enumerate(BACKENDS, start=1)},
                                vips=vips, lru_size=CONN_TABLE_SIZE, flood_guard=True)

    @property
    def fd(self) -> int:
        """Program fd."""
        return self.k.prog_fd

    def forwards(self) -> bool:
        """Whether it sends a UDP packet to the VIP back out (XDP_TX)."""
        from lb.consts import XDP_TX
        from lb.dataplane.testrun import TestRunner

        frame = _udp_frame(CLIENT, str(VIP), 40000, VIP_PORT, 60)
        return TestRunner(self.fd).run(frame).verdict == XDP_TX

    def lru_counts(self) -> tuple[int, int]:
        """(hits, misses) of Katran's LRU (its own counters)."""
        c = self.k.counters()
        misses = c["miss_syn"] + c["miss_other"]
        return c["vip_packets"] - misses, misses

    def close(self) -> None:
        """Unload (the pins go too)."""
        self.k.close()


def _katran() -> tuple[LoadedKatran | None, str | None]:
    """Katran when KATRAN_SRC is set: (loaded, None), else (None, why not)."""
    from bench.katran import harness

    src = harness.source()
    if src is None:
        return None, harness.HOW_TO
    try:
        obj, commit = harness.build(src)
        k = LoadedKatran(obj)
    except Exception as e:
        return None, f"Katran did not build or load: {e}"
    _say(f"katran: {obj} (commit {commit})")
    if not k.forwards():
        k.close()
        return None, "Katran does not forward (no XDP_TX on a VIP packet)"
    return k, None


def _udp_frame(src: str, dst: str, sport: int, dport: int, size: int) -> bytes:
    """A UDP frame from the router to the LB, padded to `size` bytes (no FCS)."""
    import struct

    payload = bytes(size - 42)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    csum = _csum(ip)
    ip = ip[:10] + csum.to_bytes(2, "big") + ip[12:]
    eth = bytes.fromhex(LB_MAC.replace(":", "") + ROUTER_MAC.replace(":", "")) + b"\x08\x00"
    return eth + ip + udp


def _tcp_ack_frame(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A TCP ACK frame from the router to the LB (checksums not needed by the program)."""
    import struct

    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + _csum(ip).to_bytes(2, "big") + ip[12:]
    eth = bytes.fromhex(LB_MAC.replace(":", "") + ROUTER_MAC.replace(":", "")) + b"\x08\x00"
    frame = eth + ip + tcp
    return frame + bytes(max(0, 60 - len(frame)))


def _csum(data: bytes) -> int:
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# Measurement.


class BenchError(RuntimeError):
    """The benchmark could not measure (a tool missing, trafgen died, nothing moved)."""


@dataclass(frozen=True)
class Scenario:
    """One program under test on the LB interface, with the traffic sent to it."""

    name: str
    prog: str  # drop | floor | balancer | kernel
    traffic: Traffic
    mode: netlink.XdpMode = "native"


class Bench:
    """The lab, the loaded programs and the measuring loop."""

    def __init__(self, lab_: Lab, progs: BenchPrograms, lb: LoadedBalancer | None,
                 timing: Timing, katran: LoadedKatran | None = None) -> None:
        self.lab = lab_
        self.progs = progs
        self.lb = lb
        self.katran = katran
        self.timing = timing

    def fd_of(self, prog: str) -> int | None:
        """The program fd to attach on the LB interface for a scenario (None: no XDP)."""
        if prog == "drop":
            return int(self.progs.drop.fd)
        if prog == "floor":
            return int(self.progs.floor.fd)
        if prog == "balancer":
            if self.lb is None:
                raise BenchError("the balancer is not loaded")
            return self.lb.fd
        if prog == "katran":
            if self.katran is None:
                raise BenchError("Katran is not loaded")
            return self.katran.fd
        return None

    def forwarded(self, prog: str) -> int:
        """Packets the scenario has forwarded so far (dropped, for drop_limit)."""
        if prog == "drop":
            return percpu_packets(self.progs.drop_count)
        return percpu_packets(self.progs.sink_count)

    def program_drops(self, prog: str) -> int:
        """Drops the program under test counted itself."""
        if prog == "balancer" and self.lb is not None:
            return self.lb.drops()
        return 0

    def lb_side_drops(self, prog: str) -> int:
        """Frames that reached the LB but were not sent on, as the kernel counts them."""
        e = ethtool_counters(self.lab.lb, LB_IF)
        lb_link = link_counters(self.lab.lb, LB_IF)
        gen_link = link_counters(self.lab.gen, GEN_IF)
        return (e.get("rx_drops", 0) + e.get("rx_xdp_tx_errors", 0) + lb_link["rx_dropped"]
                + gen_link["tx_dropped"] + self.program_drops(prog))

    def run(self, sc: Scenario) -> Measurement:
        """Attach the scenario's program, send, and measure forwarded packets per window."""
        t = self.timing
        fd = self.fd_of(sc.prog)
        attach = (netlink.xdp_attached(self.lab.lb, LB_IF, fd, sc.mode) if fd is not None
                  else contextlib.nullcontext())
        m = Measurement()
        max_s = t.warmup_s + t.windows * t.window_s + 10.0
        sink0 = (percpu_packets(self.progs.sink_count, SINK_ALL),
                 percpu_packets(self.progs.sink_count, SINK_ENCAP))
        lru0 = self.lru_counts(sc.prog)
        with attach, netlink.iproute(self.lab.gen) as ipr, \
                trafgen(self.lab.gen, GEN_IF, sc.traffic, max_s) as proc:
            idx = ipr.link_lookup(ifname=GEN_IF)[0]

            def offered() -> int:
                st = ipr.get_links(idx)[0].get("IFLA_STATS64")
                return int(st.get("tx_packets", 0)) + int(st.get("tx_dropped", 0))

            time.sleep(t.warmup_s)
            if proc.poll() is not None:
                raise BenchError(f"trafgen exited early ({proc.returncode}): "
                                 f"{(proc.stdout.read() if proc.stdout else '')[-500:]}")
            path_pids = trafgen_workers(proc.pid)
            path_pids += [p for p in (ksoftirqd(c) for c in range(sc.traffic.cpus)) if p]
            d0 = self.lb_side_drops(sc.prog)
            c0, o0, t0 = self.forwarded(sc.prog), offered(), time.monotonic()
            u0 = cpu_time_ns(path_pids)
            start = t0
            for _ in range(t.windows):
                time.sleep(t.window_s)
                c1, o1, t1 = self.forwarded(sc.prog), offered(), time.monotonic()
                u1 = cpu_time_ns(path_pids)
                dt = t1 - t0
                m.windows.append(Window(
                    mpps=(c1 - c0) / dt / 1e6,
                    offered_mpps=(o1 - o0) / dt / 1e6,
                    ns_per_packet=(u1 - u0) / (c1 - c0) if c1 > c0 else None,
                    cpu_share=(u1 - u0) / 1e9 / dt / sc.traffic.cpus,
                ))
                c0, o0, t0, u0 = c1, o1, t1, u1
            m.span_s = t0 - start
            m.lb_drops = self.lb_side_drops(sc.prog) - d0
            if proc.poll() is not None:
                raise BenchError(f"trafgen stopped during the measurement ({proc.returncode})")
        # Traffic has stopped: these two counts are exact, unlike mid-run samples.
        m.sink_all = percpu_packets(self.progs.sink_count, SINK_ALL) - sink0[0]
        m.sink_encap = percpu_packets(self.progs.sink_count, SINK_ENCAP) - sink0[1]
        lru1 = self.lru_counts(sc.prog)
        m.lru_hits, m.lru_misses = lru1[0] - lru0[0], lru1[1] - lru0[1]
        return m

    def lru_counts(self, prog: str) -> tuple[int, int]:
        """(hits, misses) of the balancer's connection table; zeros for other programs."""
        if prog == "katran" and self.katran is not None:
            return self.katran.lru_counts()
        if prog != "balancer" or self.lb is None:
            return 0, 0
        lb = self.lb
        return (lb.stat("STAT_LRU_HIT"),
                lb.stat("STAT_LRU_MISS_SYN") + lb.stat("STAT_LRU_MISS_OTHER"))


def headline(
    base: Traffic, *, floor_again: bool = True
) -> tuple[list[Scenario], list[Scenario], list[Scenario]]:
    """The headline scenarios in three phases (phases keep the connection table honest).

    With `floor_again`, fwd_floor is measured again next to the later scenarios too, so the
    floor they are compared with spans the whole run.
    """
    phase_a = [
        Scenario("drop_limit", "drop", base),
        Scenario("fwd_floor", "floor", base),
        Scenario("lb_native", "balancer", base),
        Scenario("lb_one_flow", "balancer", Traffic(base.proto, base.frame, "one", base.cpus)),
        Scenario("lb_generic", "balancer", base, "generic"),
        Scenario("kernel_fwd", "kernel", Traffic(base.proto, base.frame, base.flows, base.cpus,
                                                 dst=str(BACKENDS[0]))),
        Scenario("katran_native", "katran", base),
        Scenario("katran_one_flow", "katran",
                 Traffic(base.proto, base.frame, "one", base.cpus)),
    ]
    floor = [Scenario("fwd_floor", "floor", base)] if floor_again else []
    # After the prefill: traffic spread over exactly the 1,000,000 flows in the table.
    phase_b = [Scenario("lb_1m_flows", "balancer",
                        Traffic("udp", base.frame, "table", base.cpus)), *floor]
    # Last: the flood fills the connection table with flows nobody sends again.
    phase_c = [Scenario("syn_flood", "balancer",
                        Traffic("syn", base.frame, "random", base.cpus)), *floor]
    return phase_a, phase_b, phase_c


def matrix_traffic(base: Traffic) -> list[Traffic]:
    """Protocol x frame size x sender CPUs for drop_limit / fwd_floor / lb_native."""
    return [Traffic(proto, frame, "seq", cpus)
            for proto in ("udp", "syn") for frame in (64, 512) for cpus in (1, 2)
            if Traffic(proto, frame, "seq", cpus) != base]


def _matrix_row(tr: Traffic, results: dict[str, Measurement]) -> dict[str, Any]:
    """The headline traffic's matrix row, from the headline scenarios."""
    row: dict[str, Any] = {"traffic": tr.label}
    for name in ("drop_limit", "fwd_floor", "lb_native"):
        if name in results:
            ns = results[name].ns_per_packet
            row[name] = round(results[name].mpps, 4)
            row[f"{name}_ns"] = round(ns, 1) if ns else None
    row["lb_to_floor"] = _ratio(row.get("lb_native", 0.0), row.get("fwd_floor", 0.0))
    row["lb_to_floor_cpu"] = _ratio(row.get("fwd_floor_ns") or 0.0,
                                    row.get("lb_native_ns") or 0.0)
    return row


def _progress(m: Measurement) -> str:
    ns = m.ns_per_packet
    return (f"{m.mpps:6.3f} Mpps, {ns or 0:5.0f} ns/pkt of sender CPU (windows: "
            + " ".join(f"{w.mpps:.2f}@{w.cpu_share:.0%}" for w in m.windows) + ")")


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if a > 0 and b > 0 else None


def _check_tools() -> None:
    missing = [t for t in ("trafgen", "ethtool", "timeout", "nsenter")
               if subprocess.run(["which", t], capture_output=True).returncode != 0]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (run scripts/setup.sh)")
    if os.geteuid() != 0:
        raise BenchError("needs root (XDP, namespaces)")


def measure_all(timing: Timing, base: Traffic) -> dict[str, Any]:
    """Build the lab, run every scenario, and return the figures."""
    _check_tools()
    t_start = time.monotonic()
    results: dict[str, Measurement] = {}
    skipped: dict[str, str] = {}
    labels: dict[str, str] = {}
    matrix: list[dict[str, Any]] = []
    notes: list[str] = []
    multicore: dict[str, Any] = {}
    survival: dict[str, Any] = {}
    progs = BenchPrograms()
    lbal: LoadedBalancer | None = None
    katran, why = _katran()
    if why is not None:
        _say(why)
        skipped.update(dict.fromkeys(KATRAN_SCENARIOS, why))
    try:
        try:
            lbal = LoadedBalancer()
        except Exception as e:
            skipped.update({n: f"balancer did not load: {e}" for n in SCENARIOS
                            if n.startswith(("lb_", "syn_"))})
        if lbal is not None and not lbal.forwards():
            skipped.update({n: "the balancer does not forward yet (no XDP_TX on a VIP packet)"
                            for n in SCENARIOS if n.startswith(("lb_", "syn_"))})
        with lab() as lab_:
            bench = Bench(lab_, progs, lbal, timing, katran)
            netlink.xdp_attach(lab_.gen, GEN_IF, int(progs.sink.fd), "native")

            def run_phase(scenarios: list[Scenario]) -> None:
                for _ in range(timing.rounds):
                    for sc in scenarios:
                        if sc.name in skipped:
                            continue
                        m = bench.run(sc)
                        _say(f"{sc.name:<12} {sc.traffic.label:<14} {_progress(m)}")
                        labels[sc.name] = f"{sc.traffic.label} {sc.traffic.flows} flows"
                        if sc.name in results:
                            results[sc.name].merge(m)
                        else:
                            results[sc.name] = m

            phase_a, phase_b, phase_c = headline(base, floor_again=timing.matrix)
            run_phase(phase_a)
            if "lb_1m_flows" not in skipped and lbal is not None:
                secs = lbal.prefill(TABLE_CLIENTS, TABLE_PORTS)
                notes.append(f"prefilled {TABLE_CLIENTS * TABLE_PORTS} flows in {secs:.1f} s")
                _say(notes[-1])
            run_phase(phase_b)
            est = (lbal.establish(timing.est_ports)
                   if lbal is not None and "syn_flood" not in skipped else [])
            run_phase(phase_c)
            if est and lbal is not None:
                survival = lbal.survival(est)
                _say(f"syn_flood: {survival['in_table_after']} of {len(est)} established"
                     f" flows still in the table; {survival['sample_forwarded_to_backend']} of"
                     f" {survival['sample']} sampled ACKs to their backend")
            if timing.matrix:
                matrix.append(_matrix_row(base, results))
                for tr in matrix_traffic(base):
                    row: dict[str, Any] = {"traffic": tr.label}
                    for name, prog in (("drop_limit", "drop"), ("fwd_floor", "floor"),
                                       ("lb_native", "balancer")):
                        if name in skipped:
                            continue
                        m = bench.run(Scenario(name, prog, tr))
                        _say(f"matrix {name:<12} {tr.label:<14} {_progress(m)}")
                        row[name] = round(m.mpps, 4)
                        ns = m.ns_per_packet
                        row[f"{name}_ns"] = round(ns, 1) if ns else None
                    row["lb_to_floor"] = _ratio(row.get("lb_native", 0.0),
                                                row.get("fwd_floor", 0.0))
                    row["lb_to_floor_cpu"] = _ratio(row.get("fwd_floor_ns") or 0.0,
                                                    row.get("lb_native_ns") or 0.0)
                    matrix.append(row)
                multicore = measure_multicore(bench, base, results, skipped)
    finally:
        programmed_by = lbal.programmed_by if lbal is not None else None
        if katran is not None:
            katran.close()
        if lbal is not None:
            lbal.close()
        progs.close()
    scenarios = summarise(results, labels)
    if "syn_flood" in scenarios and survival:
        scenarios["syn_flood"]["established"] = survival
    target = {"goal": 0.95}
    if "lb_native" in scenarios:
        native = scenarios["lb_native"]
        target.update({
            "lb_native_to_floor": native["ratio_to_floor"],
            "lb_native_to_floor_cpu": native["ratio_to_floor_cpu"],
            "met": (native["ratio_to_floor_cpu"] or 0.0) >= 0.95,
        })
    return {
        "scenarios": scenarios,
        "skipped": skipped,
        "target": target,
        "matrix": matrix,
        "multicore": multicore,
        "method": {
            "topology": "trafgen -> veth -> LB (program under test; XDP_TX back out, on a "
                        "stick) -> veth peer XDP sink (counts per CPU, drops)",
            "warmup_s": timing.warmup_s, "window_s": timing.window_s,
            "windows": timing.windows, "rounds": timing.rounds,
            "mpps": "median of window rates (forwarded packets at the sink / wall time), "
                    "pooled over rounds",
            "ns_per_packet": "median over windows of sender-CPU time (trafgen workers + "
                             "ksoftirqd of the sender CPUs, /proc/PID/schedstat) per "
                             "forwarded packet: what the path costs whatever else runs",
            "programmed_by": programmed_by,
            "conn_table_size": CONN_TABLE_SIZE, "ring_size": RING_SIZE,
            "frames": "sizes include the 4-byte FCS trafgen does not write",
        },
        "notes": notes,
        "duration_s": round(time.monotonic() - t_start, 1),
    }


def measure_multicore(bench: Bench, base: Traffic, results: dict[str, Measurement],
                      skipped: dict[str, str]) -> dict[str, Any]:
    """MULTICORE's programs with 2 sender CPUs, next to their 1-CPU headline figures:
    {name: {"mpps_1cpu", "mpps_2cpu", "scaling", "ns_1cpu", "ns_2cpu"}}."""
    out: dict[str, Any] = {}
    two = Traffic(base.proto, base.frame, base.flows, 2)
    for name, prog in MULTICORE:
        if name in skipped or name not in results:
            continue
        m = bench.run(Scenario(name, prog, two))
        _say(f"multicore {name:<12} {two.label:<14} {_progress(m)}")
        one = results[name]
        out[name] = {
            "mpps_1cpu": round(one.mpps, 4), "mpps_2cpu": round(m.mpps, 4),
            "scaling": _ratio(m.mpps, one.mpps),
            "ns_1cpu": round(one.ns_per_packet, 1) if one.ns_per_packet else None,
            "ns_2cpu": round(m.ns_per_packet, 1) if m.ns_per_packet else None,
        }
    return out


def summarise(results: dict[str, Measurement], labels: dict[str, str]) -> dict[str, Any]:
    """Per-scenario figures, with ratios to the floor and to XDP_DROP of the same run."""
    floor = results.get("fwd_floor", Measurement())
    drop = results.get("drop_limit", Measurement())
    out: dict[str, Any] = {}
    for name in SCENARIOS:
        if name not in results:
            continue
        m = results[name]
        ns = m.ns_per_packet
        clean = m.clean()
        share = _median([w.cpu_share for w in clean])
        offered = _median([w.offered_mpps for w in clean])
        out[name] = {
            "mpps": round(m.mpps, 4),
            "ratio_to_floor": _ratio(m.mpps, floor.mpps),
            "ratio_to_drop": _ratio(m.mpps, drop.mpps),
            "ns_per_packet": round(ns, 1) if ns else None,
            "mpps_per_cpu": round(1e3 / ns, 4) if ns else None,
            "ratio_to_floor_cpu": _ratio(floor.ns_per_packet or 0.0, ns or 0.0),
            "ratio_to_drop_cpu": _ratio(drop.ns_per_packet or 0.0, ns or 0.0),
            "cpu_share": round(share, 3) if share is not None else None,
            "clean_windows": sum(w.cpu_share >= CLEAN_SHARE for w in m.windows),
            "windows_used": len(clean),
            "offered_mpps": round(offered, 4) if offered is not None else None,
            "lb_drop_mpps": round(m.lb_drops / m.span_s / 1e6, 4) if m.span_s else None,
            "encap_fraction": (round(m.sink_encap / m.sink_all, 4)
                               if m.sink_all and name != "drop_limit" else None),
            "lru_hit_fraction": (round(m.lru_hits / (m.lru_hits + m.lru_misses), 4)
                                 if m.lru_hits + m.lru_misses else None),
            "windows_mpps": [round(w.mpps, 4) for w in m.windows],
            "windows_ns": [round(w.ns_per_packet, 1) if w.ns_per_packet else None
                           for w in m.windows],
            "windows_cpu_share": [round(w.cpu_share, 3) for w in m.windows],
            "traffic": labels[name],
        }
    return out


def main(smoke: bool = False, results_dir: Path | None = None) -> dict[str, Any]:
    """Run the forwarding benchmark, write bench/results/forwarding.json, return the figures."""
    from bench.common import environment, merge_results

    timing = SMOKE if smoke else FULL
    figures = measure_all(timing, Traffic("udp", 64, "seq", 1))
    figures["smoke"] = smoke
    figures["env"] = environment()
    path = merge_results(NAME, figures, results_dir)
    _say(f"wrote {path}")
    return figures


def _cli(argv: list[str] | None = None) -> int:
    # Ctrl-C runs the cleanup even if this process started with SIGINT ignored. (No SIGTERM
    # handler: pyroute2 stops its forked netns helpers with SIGTERM; see bench/run.py.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="short windows, no matrix")
    args = ap.parse_args(argv)
    figures = main(smoke=args.smoke)
    for name, sc in figures["scenarios"].items():
        print(f"{name:<12} {sc['mpps']:7.3f} Mpps  {sc['ns_per_packet'] or 0:6.0f} ns/pkt  "
              f"floor x{sc['ratio_to_floor_cpu']} (CPU time), x{sc['ratio_to_floor']} (wall)")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
