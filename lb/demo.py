"""`make demo`: load the balancer and push real packets through it with BPF_PROG_TEST_RUN.

Until the network lab exists this is the project's main job in miniature: compile the data
plane, program one VIP with three backends straight into the maps, send TCP SYNs from many
clients, and print per packet what the program did and, at the end, the counters.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections import Counter

from lb.config import DataplaneConfig, RuntimeConfig
from lb.consts import GLOB_STATS, VERDICT_NAMES, XDP_TX
from lb.dataplane import Balancer, set_addr
from lb.testrun import TestRunner

VIP = ipaddress.IPv4Address("198.18.0.10")
BACKENDS = [ipaddress.IPv4Address(f"198.18.1.{i}") for i in (2, 3, 4)]
LB_MAC, GW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _program(b: Balancer, cfg: DataplaneConfig) -> None:
    rt = RuntimeConfig(gateway_mac=GW_MAC, src_v4=ipaddress.IPv4Address("198.18.0.1"))
    leaf = b.lb_cfg.Leaf()
    for i, octet in enumerate(bytes.fromhex(rt.gateway_mac.replace(":", ""))):
        leaf.gw_mac[i] = octet
    leaf.max_frame = rt.max_frame
    leaf.udp_timeout_ns = int(rt.udp_timeout_s * 1e9)
    b.lb_cfg[b.lb_cfg.Key(0)] = leaf
    for idx, addr in enumerate(BACKENDS, start=1):
        real = b.reals.Leaf()
        set_addr(real.addr, addr)
        b.reals[b.reals.Key(idx)] = real
    # A stand-in ring (slot i -> backend 1 + i % 3) until Maglev drives it.
    for slot in range(cfg.ring_size):
        b.ch_rings[b.ch_rings.Key(slot)] = b.ch_rings.Leaf(1 + slot % len(BACKENDS))
    meta = b.vip_map.Leaf()
    meta.vip_num = 0
    b.vip_map[b.vip_key(VIP, 80, "tcp")] = meta


def main() -> int:
    """Run the demo; returns the process exit code."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    cfg = DataplaneConfig(ring_size=4099, max_vips=4, max_reals=16, conn_table_size=65536)
    _say("[1/4] compiling the balancer with BCC ...")
    t0 = time.monotonic()
    b = Balancer(cfg)
    _say(f"      loaded program fd {b.prog_fd} in {time.monotonic() - t0:.1f} s")
    try:
        _say(f"[2/4] VIP tcp {VIP}:80 -> backends {', '.join(map(str, BACKENDS))}")
        _program(b, cfg)
        runner = TestRunner(b.prog_fd)
        _say("[3/4] 12 TCP SYNs from different clients, one ARP frame, one non-VIP packet:")
        seen: Counter[str] = Counter()
        pkts = [
            (f"client 198.18.2.{i}:{40000 + i}",
             Ether(src="02:00:00:00:00:aa", dst=LB_MAC)
             / IP(src=f"198.18.2.{i}", dst=str(VIP)) / TCP(sport=40000 + i, dport=80, flags="S"))
            for i in range(1, 13)
        ]
        pkts.append(("ARP frame", Ether(src="02:00:00:00:00:aa", dst=LB_MAC, type=0x0806)
                     / (b"\0" * 28)))
        pkts.append(("non-VIP 198.18.9.9", Ether(src="02:00:00:00:00:aa", dst=LB_MAC)
                     / IP(src="198.18.2.1", dst="198.18.9.9") / TCP(dport=80)))
        for label, pkt in pkts:
            res = runner.run(bytes(pkt))
            verdict = VERDICT_NAMES.get(res.verdict, str(res.verdict))
            where = ""
            if res.verdict == XDP_TX:
                outer = Ether(res.packet)
                where = f" -> encapsulated to {outer[IP].dst} via {outer.dst}"
                seen[outer[IP].dst] += 1
            _say(f"      {label:<24} {verdict}{where} ({res.duration_ns} ns)")
        if seen:
            _say("      per backend: " + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))
        _say("[4/4] global counters (summed over CPUs):")
        for i, name in enumerate(GLOB_STATS):
            total = sum(b.glob_stats[b.glob_stats.Key(i)])
            if total:
                _say(f"      {name:<22} {total}")
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
