"""`lbctl vip list|get|add|set|rm`."""

from __future__ import annotations

import argparse
import time
from typing import Any

from lb.client import vip_path
from lbctl.backends import backends_table
from lbctl.base import EXIT_OK, EXIT_USAGE, CliError, Leaf, Parser, split_hostport, vip_id_arg
from lbctl.client import client_from
from lbctl.output import emit, table


def vips_table(data: Any) -> str:
    """VIPs as a table: id, encapsulation, outer source, flags, backends in the ring."""
    rows = []
    for v in data["data"]:
        flags = [k for k in ("hash_src_only", "lru_bypass") if v[k]]
        if v.get("allow"):
            flags.append(f"allow:{len(v['allow'])}")
        if v.get("deny"):
            flags.append(f"deny:{len(v['deny'])}")
        active = sum(1 for b in v["backends"] if b["in_ring"])
        rows.append(
            [
                v["id"],
                v["encap"],
                v["effective_outer_source"],
                ",".join(flags) or "-",
                f"{active}/{len(v['backends'])}",
            ]
        )
    return table(["VIP", "ENCAP", "OUTER-SRC", "FLAGS", "IN-RING/BACKENDS"], rows)


def vip_text(v: Any) -> str:
    """One VIP: its settings, then its backends."""
    head = (
        f"{v['id']}  encap={v['encap']} outer_source={v['effective_outer_source']}"
        f" hash_src_only={v['hash_src_only']} lru_bypass={v['lru_bypass']}"
    )
    if v.get("ring_fingerprint"):
        head += f" ring={v['ring_fingerprint'][:16]}"
    if "second_chance_on" in v:
        head += "\n" + _second_text(v)
    for key in ("allow", "deny"):
        if v.get(key):
            head += f"\n{key}: {' '.join(v[key])}"
    return head + "\n" + backends_table({"data": v["backends"]})


def _second_text(v: Any) -> str:
    """The VIP's second chance: on or off, its window length, the open window."""
    if not v["second_chance_on"]:
        why = "switched off" if v.get("second_chance") is False else "IPIP VIP"
        return f"second chance: off ({why})"
    line = f"second chance: on, window {v['second_chance_window_s']:g} s"
    w = v.get("second_window")
    if w:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(w["until"]))
        prev = ",".join(f"{a}" + (f"*{wt}" if wt != 1 else "") for a, wt in w["backends"])
        line += f"; open until {until} (longer while a backend drains), previous ring: {prev}"
    else:
        line += "; no window open"
    return line


def cmd_vip_list(args: argparse.Namespace) -> int:
    """lbctl vip list."""
    emit(args, client_from(args).get("/v1/vips"), vips_table)
    return EXIT_OK


def cmd_vip_get(args: argparse.Namespace) -> int:
    """lbctl vip get VIP."""
    emit(args, client_from(args).get(vip_path(args.vip)), vip_text)
    return EXIT_OK


def cmd_vip_add(args: argparse.Namespace) -> int:
    """lbctl vip add PROTO ADDR:PORT."""
    addr, port = split_hostport(args.address, "address")
    body: dict[str, Any] = {"protocol": args.protocol, "address": addr, "port": port}
    for key in ("hash_src_only", "lru_bypass", "encap", "outer_source", "second_chance",
                "second_chance_window_s"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    body.update(_ranges(args))
    _, _, v = client_from(args).request("POST", "/v1/vips", body)
    emit(args, v, lambda v: f"created {v['id']}")
    return EXIT_OK


def cmd_vip_set(args: argparse.Namespace) -> int:
    """lbctl vip set VIP [--encap ...] [--hash-src-only|--no-hash-src-only] ..."""
    body = {
        k: getattr(args, k)
        for k in ("hash_src_only", "lru_bypass", "encap", "outer_source", "second_chance",
                  "second_chance_window_s")
        if getattr(args, k) is not None
    }
    body.update(_ranges(args))
    if not body:
        raise CliError("nothing to change: give --encap, --outer-source, --allow, --deny or a"
                       " flag", EXIT_USAGE)
    _, _, v = client_from(args).request("PATCH", vip_path(args.vip), body)
    emit(args, v, vip_text)
    return EXIT_OK


def cmd_vip_rm(args: argparse.Namespace) -> int:
    """lbctl vip rm VIP."""
    client_from(args).request("DELETE", vip_path(args.vip))
    emit(args, {"deleted": args.vip}, lambda d: f"deleted {d['deleted']}")
    return EXIT_OK


def _ranges(args: argparse.Namespace) -> dict[str, list[str]]:
    # --allow P (repeatable, or comma-separated) replaces the list; --no-allow empties it.
    out: dict[str, list[str]] = {}
    for key in ("allow", "deny"):
        given = getattr(args, key)
        if getattr(args, f"no_{key}", False):
            if given:
                raise CliError(f"--{key} and --no-{key} contradict each other", EXIT_USAGE)
            out[key] = []
        elif given:
            out[key] = [p.strip() for g in given for p in g.split(",") if p.strip()]
    return out


def _vip_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--encap", choices=["ipip", "gue"])
    sp.add_argument("--outer-source", choices=["rss", "lb"])
    sp.add_argument("--hash-src-only", action=argparse.BooleanOptionalAction, default=None)
    sp.add_argument("--lru-bypass", action=argparse.BooleanOptionalAction, default=None)
    sp.add_argument("--second-chance", action=argparse.BooleanOptionalAction, default=None,
                    help="second hop for flows after ring changes (GUE VIPs; default on)")
    sp.add_argument("--second-chance-window", dest="second_chance_window_s", type=float,
                    metavar="SECONDS", help="how long moved slots keep their second hop")
    sp.add_argument("--allow", action="append", metavar="PREFIX",
                    help="source prefix let in (repeat, or comma-separate); replaces the list")
    sp.add_argument("--deny", action="append", metavar="PREFIX",
                    help="source prefix dropped (repeat, or comma-separate); replaces the list")
    sp.add_argument("--no-allow", action="store_true", help="empty the allow list")
    sp.add_argument("--no-deny", action="store_true", help="empty the deny list")


def add_commands(sub: Any, leaf: Leaf) -> None:
    """`lbctl vip ...`."""
    vip = sub.add_parser("vip", help="VIPs").add_subparsers(
        dest="sub", required=True, parser_class=Parser
    )
    leaf(vip, "list", cmd_vip_list, "list VIPs")
    leaf(vip, "get", cmd_vip_get, "show one VIP").add_argument(
        "vip", type=vip_id_arg, help="tcp:198.18.0.10:80"
    )
    sp = leaf(vip, "add", cmd_vip_add, "create a VIP")
    sp.add_argument("protocol", choices=["tcp", "udp"])
    sp.add_argument("address", help="ADDRESS:PORT, IPv6 as [ADDRESS]:PORT; port 0 = every port")
    _vip_flags(sp)
    sp = leaf(vip, "set", cmd_vip_set, "change a VIP's flags or encapsulation")
    sp.add_argument("vip", type=vip_id_arg)
    _vip_flags(sp)
    leaf(vip, "rm", cmd_vip_rm, "delete a VIP").add_argument("vip", type=vip_id_arg)
