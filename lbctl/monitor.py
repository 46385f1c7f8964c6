"""`lbctl monitor` (the data plane's events as they happen) and `lbctl capture` (a pcap file).

Both read the daemon's REST API (GET /v1/events, GET /v1/capture), so they work without
root, with the token, from any host that may reach the API; the daemon owns the ring.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lbctl.base import EXIT_OK, Leaf
from lbctl.client import client_from


def line(ev: dict[str, Any]) -> str:
    """One readable line of a described event."""
    t = time.strftime("%H:%M:%S", time.localtime(ev["time_ns"] / 1e9))
    ms = (ev["time_ns"] // 1_000_000) % 1000
    f = ev.get("flow", {})
    proto = f.get("protocol", f.get("ethertype", "?"))
    src, dst = f.get("source", "?"), f.get("destination", "?")
    if "source_port" in f:
        src, dst = _hostport(src, f["source_port"]), _hostport(dst, f["destination_port"])
    text = f"{t}.{ms:03d} {ev['type']:<5} {ev['reason'].removeprefix('STAT_').lower():<16} " \
           f"{proto} {src} -> {dst}"
    if f.get("tcp_flags"):
        text += f" [{f['tcp_flags']}]"
    if ev.get("vip"):
        text += f" vip {ev['vip']}"
    if f.get("backend"):
        text += f" backend {f['backend']} ({f.get('encap')}, {ev.get('why', '?')})"
    if ev.get("guard"):
        text += f" guard -> {ev['guard']}"
    return text


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def cmd_monitor(args: argparse.Namespace) -> int:
    """lbctl monitor [--vip ID] [--reason NAME] [--type T] [--sample N] [--count N]."""
    query: dict[str, Any] = {"type": args.type or [], "reason": args.reason or [],
                             "vip": args.vip or [], "sample": args.sample}
    if args.count:
        query["count"] = args.count
    if args.duration:
        query["duration"] = args.duration
    kind = ""
    try:
        for raw in client_from(args).stream("/v1/events", query=query,
                                            accept="text/event-stream"):
            text = raw.decode(errors="replace").rstrip("\n")
            if text.startswith("event: "):
                kind = text[7:]
            elif text.startswith("data: "):
                data = json.loads(text[6:])
                if args.output == "json":
                    print(json.dumps({"event": kind, **data}), flush=True)
                elif kind == "lost":
                    print(f"-- lost: {data['dropped']} by this client (too slow), "
                          f"{data['ring_lost']} to a full ring", flush=True)
                else:
                    print(line(data), flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_capture(args: argparse.Namespace) -> int:
    """lbctl capture -w FILE.pcap [--vip ID] [--count N] [--duration S]."""
    query: dict[str, Any] = {"vip": args.vip or [], "count": args.count,
                             "duration": args.duration}
    out = Path(args.write)
    size = 0
    with out.open("wb") as f:
        try:
            for chunk in client_from(args).stream("/v1/capture", query=query,
                                                  accept="application/vnd.tcpdump.pcap"):
                f.write(chunk)
                size += len(chunk)
        except KeyboardInterrupt:
            pass
    frames = _frames(out)
    print(f"{frames} frames ({size} bytes) written to {out}", file=sys.stderr)
    return EXIT_OK


def _frames(path: Path) -> int:
    data, n, off = path.read_bytes(), 0, 24
    while off + 16 <= len(data):
        off += 16 + int.from_bytes(data[off + 8:off + 12], "little")
        n += 1
    return n


def add_commands(sub: Any, leaf: Leaf) -> None:
    """`lbctl monitor`, `lbctl capture`."""
    sp = leaf(sub, "monitor", cmd_monitor, "stream the data plane's events (drops, new flows, ...)")
    sp.add_argument("--vip", action="append", help="only this VIP (id; repeatable)")
    sp.add_argument("--reason", action="append",
                    help="only this reason (counter name, e.g. no_backend; repeatable)")
    sp.add_argument("--type", action="append",
                    choices=["drop", "pass", "flow", "fwd", "icmp", "guard"],
                    help="only this type (repeatable; default all)")
    sp.add_argument("--sample", type=int, default=1, help="report 1 in N packets (default 1)")
    sp.add_argument("--count", type=int, help="stop after N events")
    sp.add_argument("--duration", type=float, help="stop after S seconds")
    sp = leaf(sub, "capture", cmd_capture,
              "write the frames as received and as sent (encapsulated) to a pcap file")
    sp.add_argument("-w", "--write", required=True, metavar="FILE.pcap")
    sp.add_argument("--vip", action="append", help="only this VIP (id; repeatable)")
    sp.add_argument("--count", type=int, default=100, help="frames to write (default 100)")
    sp.add_argument("--duration", type=float, default=10.0,
                    help="stop after S seconds (default 10)")
