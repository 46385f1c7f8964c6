"""`make demo-dataplane`: load the balancer, push real packets through it (BPF_PROG_TEST_RUN).

The project's main job in miniature, without a network: compile the data plane, program one
IPv4 VIP with three backends straight into the maps (the ring built by lb.control.maglev), then
show per packet what the program did: TCP SYNs encapsulated towards their backend, an ACK
that follows its flow through the connection table, an ICMP echo answered from XDP, a packet
too big for the path answered with "fragmentation needed", traffic that is not ours passed to
the stack; then how 3,000 new flows spread over the backends, and the counters.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections import Counter
from typing import Any

from lb.config import DataplaneConfig, RuntimeConfig
from lb.consts import GLOB_STATS, VERDICT_NAMES, XDP_TX
from lb.control.maglev import Endpoint, build_ring, ring_to_values
from lb.dataplane.keys import set_addr
from lb.dataplane.loader import Balancer, write_runtime_config
from lb.dataplane.testrun import TestRunner

VIP = ipaddress.IPv4Address("198.18.0.10")
BACKENDS = [ipaddress.IPv4Address(f"198.18.1.{i}") for i in (2, 3, 4)]
LB_MAC, PEER_MAC, GW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:aa", "02:00:00:00:00:fe"
SPREAD_FLOWS = 3000


def _say(msg: str) -> None:
    print(msg, flush=True)


def _program(b: Balancer, cfg: DataplaneConfig) -> None:
    write_runtime_config(b, RuntimeConfig(
        gateway_mac=GW_MAC, src_v4=ipaddress.IPv4Address("198.18.0.1"), max_frame=1514))
    index_of: dict[str, int] = {}
    for idx, addr in enumerate(BACKENDS, start=1):
        real = b.reals.Leaf()
        set_addr(real.addr, addr)
        b.reals[b.reals.Key(idx)] = real
        index_of[str(addr)] = idx
    ring = build_ring([Endpoint(str(a)) for a in BACKENDS], cfg.ring_size)
    values = ring_to_values(ring, index_of)
    keys = (b.ch_rings.Key * cfg.ring_size)(*range(cfg.ring_size))
    b.ch_rings.items_update_batch(keys, (b.ch_rings.Leaf * cfg.ring_size)(*values))
    meta = b.vip_map.Leaf()
    meta.vip_num = 0
    b.vip_map[b.vip_key(VIP, 80, "tcp")] = meta
    b.vip_addrs[b.vip_addr_key(VIP)] = b.vip_addrs.Leaf(1)


def _describe(res: Any) -> str:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    verdict = VERDICT_NAMES.get(res.verdict, str(res.verdict))
    if res.verdict != XDP_TX:
        return verdict
    out = Ether(res.packet)
    if out.dst == GW_MAC and IP in out:
        return (f"{verdict} encapsulated to {out[IP].dst} (outer source {out[IP].src}) "
                f"via the gateway {out.dst}")
    if ICMP in out:
        kind = "echo reply" if out[ICMP].type == 0 else (
            f"ICMP frag-needed, MTU {out[ICMP].nexthopmtu}")
        return f"{verdict} {kind} from {out[IP].src} back to {out[IP].dst}"
    return verdict


def main() -> int:
    """Run the demo; returns the process exit code."""
    from scapy.layers.inet import ICMP, IP, TCP
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw

    cfg = DataplaneConfig(ring_size=4099, max_vips=4, max_reals=16, conn_table_size=65536)
    _say("[1/5] compiling the balancer with BCC ...")
    t0 = time.monotonic()
    b = Balancer(cfg)
    _say(f"      loaded program fd {b.prog_fd} in {time.monotonic() - t0:.1f} s")
    try:
        _say(f"[2/5] VIP tcp {VIP}:80 -> backends {', '.join(map(str, BACKENDS))} "
             f"(Maglev ring of {cfg.ring_size} slots)")
        _program(b, cfg)
        runner = TestRunner(b.prog_fd)

        def eth() -> Any:
            return Ether(src=PEER_MAC, dst=LB_MAC)

        _say("[3/5] packets, one by one:")
        # Ephemeral ports as clients pick them (scattered, not counting up).
        ports = [32768 + (i * 7919) % 28000 for i in range(1, 9)]
        pkts: list[tuple[str, bytes]] = [
            (f"SYN 198.18.2.{i}:{port}",
             bytes(eth() / IP(src=f"198.18.2.{i}", dst=str(VIP))
                   / TCP(sport=port, dport=80, flags="S")))
            for i, port in enumerate(ports, start=1)
        ]
        pkts += [
            (f"ACK 198.18.2.1:{ports[0]} (known)",
             bytes(eth() / IP(src="198.18.2.1", dst=str(VIP))
                   / TCP(sport=ports[0], dport=80, flags="A"))),
            ("ICMP echo to the VIP",
             bytes(eth() / IP(src="198.18.2.1", dst=str(VIP)) / ICMP(id=1, seq=1))),
            ("1500-byte packet, DF",
             bytes(eth() / IP(src="198.18.2.1", dst=str(VIP), flags="DF")
                   / TCP(sport=ports[0], dport=80, flags="A") / Raw(b"x" * 1460))),
            ("ARP frame", bytes(eth() / ARP(psrc="198.18.2.1", pdst=str(VIP)))),
            ("TCP to non-VIP 198.18.9.9",
             bytes(eth() / IP(src="198.18.2.1", dst="198.18.9.9") / TCP(dport=80))),
        ]
        for label, frame in pkts:
            res = runner.run(frame)
            _say(f"      {label:<30} {_describe(res)}")

        _say(f"[4/5] {SPREAD_FLOWS} new flows (SYNs from distinct clients), per backend:")
        tpl = bytearray(bytes(eth() / IP(src="198.19.0.0", dst=str(VIP))
                              / TCP(sport=1024, dport=80, flags="S")))
        seen: Counter[str] = Counter()
        for i in range(SPREAD_FLOWS):
            tpl[28:30] = i.to_bytes(2, "big")  # low half of the client address
            out = runner.run(bytes(tpl)).packet
            seen[str(ipaddress.IPv4Address(out[30:34]))] += 1
        for addr in BACKENDS:
            n = seen[str(addr)]
            _say(f"      {addr!s:<14} {n:>5} flows  {n / SPREAD_FLOWS:6.1%}  "
                 + "#" * round(40 * n / SPREAD_FLOWS))

        _say("[5/5] counters (summed over CPUs):")
        for i, name in enumerate(GLOB_STATS):
            total = sum(b.glob_stats[b.glob_stats.Key(i)])
            if total:
                _say(f"      {name:<22} {total}")
        vs = b.vip_stats[b.vip_stats.Key(0)]
        _say(f"      VIP {VIP}:80  packets {sum(c.packets for c in vs)}, "
             f"bytes {sum(c.bytes for c in vs)}, new flows {sum(c.new_conns for c in vs)}")
        for idx, addr in enumerate(BACKENDS, start=1):
            rs = b.real_stats[b.real_stats.Key(idx)]
            _say(f"      backend {addr!s:<14} packets {sum(c.packets for c in rs)}, "
                 f"bytes {sum(c.bytes for c in rs)}")
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
