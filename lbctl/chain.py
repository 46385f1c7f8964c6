"""`lbctl chain [show] | add --slot N --pin PATH | remove --slot N`: the XDP chain, the
operator's filters in front of the balancer (docs/chain.md)."""

from __future__ import annotations

import argparse
from typing import Any

from lbctl.base import EXIT_OK, Leaf, Parser
from lbctl.client import client_from
from lbctl.output import emit, table


def chain_text(c: Any) -> str:
    """The chain for people: on or off, then one row per slot."""
    head = ("chain: on (xdp_root runs the filters, then the balancer)" if c["enabled"]
            else "chain: off (the balancer runs on the interface by itself)")
    rows = [[str(s["slot"]), s["role"], "-" if s["prog_id"] is None else str(s["prog_id"]),
             s["name"] or "-", s["pin"] or "-"]
            for s in c["slots"] if s["prog_id"] is not None or s["role"] == "balancer"]
    if not rows:
        return head
    return head + "\n\n" + table(["SLOT", "ROLE", "PROG ID", "NAME", "PIN"], rows)


def cmd_chain_show(args: argparse.Namespace) -> int:
    """lbctl chain [show]."""
    emit(args, client_from(args).get("/v1/chain"), chain_text)
    return EXIT_OK


def cmd_chain_add(args: argparse.Namespace) -> int:
    """lbctl chain add --slot N --pin PATH."""
    c = client_from(args).post("/v1/chain", {"slot": args.slot, "pin": args.pin})
    emit(args, c, lambda c: f"slot {args.slot}: {args.pin}\n" + chain_text(c))
    return EXIT_OK


def cmd_chain_remove(args: argparse.Namespace) -> int:
    """lbctl chain remove --slot N."""
    client = client_from(args)
    client.delete(f"/v1/chain/{args.slot}")
    emit(args, client.get("/v1/chain"), lambda c: f"slot {args.slot} emptied\n" + chain_text(c))
    return EXIT_OK


def add_commands(sub: Any, leaf: Leaf) -> None:
    """`lbctl chain show|add|remove` (`lbctl chain` alone shows)."""
    top = leaf(sub, "chain", cmd_chain_show,
               "the XDP chain: operator filters that run before the balancer")
    grp = top.add_subparsers(dest="sub", required=False, parser_class=Parser)
    leaf(grp, "show", cmd_chain_show, "the chain's slots and their programs")
    sp = leaf(grp, "add", cmd_chain_add,
              "run a pinned XDP program in a filter slot (replaces what runs there, atomically)")
    sp.add_argument("--slot", type=int, required=True, help="filter slot, 0 first")
    sp.add_argument("--pin", required=True,
                    help="bpffs path of the pinned XDP program (bpftool prog load ... PATH)")
    sp = leaf(grp, "remove", cmd_chain_remove, "empty a filter slot")
    sp.add_argument("--slot", type=int, required=True, help="the filter slot")
