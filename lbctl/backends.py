"""`lbctl backend list|add|set|drain|enable|rm`."""

from __future__ import annotations

import argparse
from typing import Any

from lb.client import backend_path, vip_path
from lbctl.base import EXIT_OK, EXIT_USAGE, CliError, Leaf, Parser, address_arg, vip_id_arg
from lbctl.client import client_from
from lbctl.output import emit, table


def backends_table(data: Any) -> str:
    """Backends as a table: address, weight, state, in the ring."""
    rows = [
        [b["address"], b["weight"], b["state"], "yes" if b["in_ring"] else "no"]
        for b in data["data"]
    ]
    return table(["BACKEND", "WEIGHT", "STATE", "IN-RING"], rows)


def cmd_backend_list(args: argparse.Namespace) -> int:
    """lbctl backend list VIP."""
    emit(args, client_from(args).get(vip_path(args.vip) + "/backends"), backends_table)
    return EXIT_OK


def cmd_backend_add(args: argparse.Namespace) -> int:
    """lbctl backend add VIP ADDRESS [--weight N] [--state S]."""
    body: dict[str, Any] = {"address": args.address, "weight": args.weight}
    if args.state:
        body["state"] = args.state
    _, _, b = client_from(args).request("POST", vip_path(args.vip) + "/backends", body)
    emit(
        args,
        b,
        lambda b: f"added {b['address']} to {args.vip} (weight {b['weight']}, {b['state']})",
    )
    return EXIT_OK


def _patch_backend(args: argparse.Namespace, body: dict[str, Any], verb: str) -> int:
    path = backend_path(args.vip, args.address)
    _, _, b = client_from(args).request("PATCH", path, body)
    emit(
        args,
        b,
        lambda b: f"{verb} {b['address']} on {args.vip} (weight {b['weight']}, {b['state']})",
    )
    return EXIT_OK


def cmd_backend_set(args: argparse.Namespace) -> int:
    """lbctl backend set VIP ADDRESS [--weight N] [--state S]."""
    body = {k: getattr(args, k) for k in ("weight", "state") if getattr(args, k) is not None}
    if not body:
        raise CliError("nothing to change: give --weight or --state", EXIT_USAGE)
    return _patch_backend(args, body, "updated")


def cmd_backend_drain(args: argparse.Namespace) -> int:
    """lbctl backend drain VIP ADDRESS [--wait]: no new flows, tracked flows go on."""
    rc = _patch_backend(args, {"state": "draining"}, "draining")
    if getattr(args, "wait", False):
        from lbctl.health import wait_drained

        return wait_drained(args)
    return rc


def cmd_backend_enable(args: argparse.Namespace) -> int:
    """lbctl backend enable VIP ADDRESS: back to active."""
    return _patch_backend(args, {"state": "active"}, "enabled")


def cmd_backend_rm(args: argparse.Namespace) -> int:
    """lbctl backend rm VIP ADDRESS."""
    path = backend_path(args.vip, args.address)
    client_from(args).request("DELETE", path)
    emit(
        args,
        {"removed": args.address, "vip": args.vip},
        lambda d: f"removed {d['removed']} from {d['vip']}",
    )
    return EXIT_OK


def add_commands(sub: Any, leaf: Leaf) -> None:
    """`lbctl backend ...`."""
    from lbctl.health import add_drain_flags

    be = sub.add_parser("backend", help="backends of a VIP").add_subparsers(
        dest="sub", required=True, parser_class=Parser
    )
    leaf(be, "list", cmd_backend_list, "list a VIP's backends").add_argument("vip", type=vip_id_arg)
    sp = leaf(be, "add", cmd_backend_add, "add a backend to a VIP")
    sp.add_argument("vip", type=vip_id_arg)
    sp.add_argument("address", type=address_arg)
    sp.add_argument("--weight", type=int, default=1)
    sp.add_argument("--state", choices=["active", "draining", "disabled"])
    sp = leaf(be, "set", cmd_backend_set, "change a backend's weight or state")
    sp.add_argument("vip", type=vip_id_arg)
    sp.add_argument("address", type=address_arg)
    sp.add_argument("--weight", type=int)
    sp.add_argument("--state", choices=["active", "draining", "disabled"])
    for name, fn, text in (
        ("drain", cmd_backend_drain, "no new flows to a backend; its tracked flows go on"),
        ("enable", cmd_backend_enable, "make a drained or disabled backend active again"),
        ("rm", cmd_backend_rm, "remove a backend from a VIP"),
    ):
        sp = leaf(be, name, fn, text)
        sp.add_argument("vip", type=vip_id_arg)
        sp.add_argument("address", type=address_arg)
        if name == "drain":
            add_drain_flags(sp)
