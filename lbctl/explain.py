"""`lbctl explain PROTO SRC:PORT DST:PORT`: which backend a flow goes to, and why."""

from __future__ import annotations

import argparse
from typing import Any

from lbctl.base import EXIT_OK, Leaf, hostport, split_hostport
from lbctl.client import client_from
from lbctl.output import emit


def _explain_text(e: Any) -> str:
    f = e["flow"]
    src = hostport(f["source"], f["source_port"])
    dst = hostport(f["destination"], f["destination_port"])
    why = {
        "conn_table": "its connection-table entry",
        "ring": "its Maglev ring slot (new flow)",
        "not_a_vip": "the destination is not a VIP",
        "no_backend": "the VIP has no backend in its ring",
        "dropped": "the program dropped it",
        "passed": "the program passed it to the kernel stack",
    }[e["reason"]]
    lines = [f"{f['protocol']} {src} -> {dst}: {e['verdict']}"]
    if e["backend"]:
        lines.append(
            f"  backend   {e['backend']}  ({e['encap']}, outer source {e['outer_source']})"
        )
    if e.get("second_hop"):
        lines.append(f"  then      {e['second_hop']}  (second hop: the slot's previous backend,"
                     " if the first does not have the flow)")
    lines.append(f"  because   {why}")
    if e["vip_id"]:
        lines.append(f"  VIP       {e['vip_id']}")
    if e["in_conn_table"]:
        lines.append(f"  conn table entry -> {e['conn_table_backend']}")
    return "\n".join(lines)


def cmd_explain(args: argparse.Namespace) -> int:
    """lbctl explain PROTO SRC:PORT DST:PORT."""
    src, sport = split_hostport(args.source, "source")
    dst, dport = split_hostport(args.destination, "destination")
    query = {"protocol": args.protocol, "src": src, "sport": sport, "dst": dst, "dport": dport}
    emit(args, client_from(args).get("/v1/explain", query=query), _explain_text)
    return EXIT_OK


def add_commands(sub: Any, leaf: Leaf) -> None:
    """`lbctl explain`."""
    sp = leaf(sub, "explain", cmd_explain, "which backend a flow goes to, and why")
    sp.add_argument("protocol", choices=["tcp", "udp"])
    sp.add_argument("source", help="client ADDRESS:PORT")
    sp.add_argument("destination", help="VIP ADDRESS:PORT")
