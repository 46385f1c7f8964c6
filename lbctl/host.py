"""`lbctl host status|drain|undrain`: this LB host in the fleet (BGP announcement, drain)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lbctl.base import EXIT_API, EXIT_OK, EXIT_USAGE, CliError, Leaf, Parser
from lbctl.client import client_from
from lbctl.output import emit, table


def _age(t: float | None) -> str:
    return "-" if t is None else f"{max(0.0, time.time() - t):.0f}s"


def host_text(h: Any) -> str:
    """The host status for people: announcement, reason, sessions."""
    if not h["bgp_enabled"]:
        return f"BGP: off ({h['reason']})"
    sp = h["speaker"] or {}
    lines = [
        f"drained:    {'yes, for ' + _age(h['drained_since']) if h['drained'] else 'no'}",
        f"announcing: {', '.join(sp.get('routes') or []) or 'nothing'}  ({h['reason']})",
        f"speaker:    {'BIRD pid ' + str(sp['pid']) if sp.get('running') else 'not running'}",
    ]
    if h["last_error"]:
        lines.append(f"error:      {h['last_error']}")
    rows = [[p["address"], str(p["asn"]), "up" if p["up"] else "DOWN", p["state"],
             _age(p["since"]), str(p["routes_exported"]), p["info"] or "-"]
            for p in h["peers"]]
    if rows:
        lines += ["", table(["PEER", "ASN", "SESSION", "STATE", "SINCE", "ROUTES", "INFO"],
                            rows)]
    return "\n".join(lines)


def cmd_host_status(args: argparse.Namespace) -> int:
    """lbctl host status."""
    emit(args, client_from(args).get("/v1/host"), host_text)
    return EXIT_OK


def cmd_host_drain(args: argparse.Namespace) -> int:
    """lbctl host drain [--wait]: withdraw this host's routes (persisted until undrain)."""
    if args.wait and (args.timeout <= 0 or args.quiet <= 0 or args.poll <= 0):
        raise CliError("--timeout, --quiet and --poll must be positive", EXIT_USAGE)
    client = client_from(args)
    h = client.post("/v1/host/drain", {})
    if not args.wait:
        emit(args, h, lambda h: "drained: the VIP routes are withdrawn\n" + host_text(h))
        return EXIT_OK
    # Done when packets to the VIPs stop arriving: no counter movement for --quiet seconds.
    deadline = time.monotonic() + args.timeout
    last, still_since = h["vip_packets"], time.monotonic()
    while True:
        time.sleep(args.poll)
        h = client.get("/v1/host")
        now = time.monotonic()
        if h["vip_packets"] != last:
            last, still_since = h["vip_packets"], now
            if args.output == "table":
                print(f"packets to the VIPs still arriving ({last} so far)", file=sys.stderr,
                      flush=True)
        elif now - still_since >= args.quiet:
            emit(args, h, lambda h: f"drained: no packet to the VIPs for {args.quiet:g} s")
            return EXIT_OK
        if now >= deadline:
            emit(args, h, lambda h: f"timed out after {args.timeout:g} s: packets to the VIPs"
                                    " still arrive (the routes are withdrawn)")
            return EXIT_API


def cmd_host_undrain(args: argparse.Namespace) -> int:
    """lbctl host undrain: announce the VIPs again."""
    h = client_from(args).post("/v1/host/undrain", {})
    emit(args, h, lambda h: "undrained\n" + host_text(h))
    return EXIT_OK


def add_commands(sub: Any, leaf: Leaf) -> None:
    """`lbctl host status|drain|undrain`."""
    grp = sub.add_parser("host", help="this LB host in the fleet (BGP, drain)").add_subparsers(
        dest="sub", required=True, parser_class=Parser
    )
    leaf(grp, "status", cmd_host_status, "BGP sessions, announced routes, drain flag")
    sp = leaf(grp, "drain", cmd_host_drain,
              "withdraw this host's VIP routes (kept withdrawn until undrain)")
    sp.add_argument("--wait", action="store_true",
                    help="wait until packets to the VIPs stop arriving")
    sp.add_argument("--timeout", type=float, default=120.0,
                    help="with --wait: give up after this many seconds (120)")
    sp.add_argument("--quiet", type=float, default=2.0,
                    help="with --wait: seconds without a packet that count as drained (2)")
    sp.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    leaf(grp, "undrain", cmd_host_undrain, "announce this host's VIPs again")
