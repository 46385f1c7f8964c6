"""`lbctl stats [--watch [SECONDS]] [--per-cpu]`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lbctl.base import EXIT_OK, Leaf
from lbctl.client import client_from
from lbctl.output import emit, human, table


def _rate(c: dict[str, Any]) -> str:
    return "-" if c.get("per_s") is None else human(float(c["per_s"])) + "/s"


def _protection_text(p: dict[str, Any]) -> str:
    """Two lines: the SYN guard's mode and state, then what the protections counted."""
    c = p["counters"]

    def n(name: str) -> str:
        return str(c[name]["value"]) if name in c else "-"

    if p["syn_guard"] == "off":
        state = "off (every SYN inserts)"
    elif p["flood"]:
        cpus = ",".join(str(x) for x in p["flood_cpus"]) or "all"
        state = f"{p['syn_guard']}: FLOOD MODE on CPU {cpus} (SYNs follow the ring statelessly)"
    else:
        state = f"{p['syn_guard']}: normal"
    return (
        f"SYN guard {state}   threshold {p['syn_per_window']} SYNs/CPU per "
        f"{p['window_ms']:.0f} ms window\n"
        f"  flood windows {n('flood_windows')}   stateless SYNs {n('syn_stateless')}   "
        f"no-evict {n('no_evict')}   src denied {n('src_denied')}   "
        f"rate-limited replies: echo {n('echo_limited')}, too-big {n('too_big_limited')}"
    )


def _stats_text(s: Any) -> str:
    out = []
    ct = s["conn_table"]
    glob = s["global"]
    mode = s.get("xdp_mode")
    out.append(
        f"XDP {mode} ({s.get('xdp_mode_reason')})" if mode else "XDP not attached"
    )
    out.append(
        f"window {s['window_s']:.1f}s   conn table {ct['entries']} live flows, "
        f"{ct.get('slots_used', '?')}/{ct['capacity']} slots used (estimate)   "
        f"hits {ct['hits']}   misses {ct['misses']}"
    )
    prot = s.get("protection")
    if prot:
        out.append(_protection_text(prot))
    rows = [
        [name, c["value"], _rate(c)] for name, c in glob.items() if c["value"] or c.get("per_s")
    ]
    out.append(table(["COUNTER", "TOTAL", "RATE"], rows or [["(all zero)", 0, "-"]]))
    vrows = []
    for v in s["vips"]:
        c = v["counters"]
        vrows.append(
            [
                v["vip_id"],
                c["packets"]["value"],
                _rate(c["packets"]),
                human(c["bytes"]["value"]) + "B",
                _rate(c["bytes"]).replace("/s", "B/s"),
                c.get("new_conns", {}).get("value", "-"),
                _rate(c["new_conns"]) if "new_conns" in c else "-",
                c.get("src_denied", {}).get("value", "-"),
            ]
        )
    out.append(
        table(["VIP", "PACKETS", "PPS", "BYTES", "BPS", "NEW-CONNS", "CPS", "SRC-DENIED"], vrows)
    )
    brows = []
    for b in s["backends"]:
        c = b["counters"]
        brows.append(
            [
                b["address"],
                c["packets"]["value"],
                _rate(c["packets"]),
                human(c["bytes"]["value"]) + "B",
                _rate(c["bytes"]).replace("/s", "B/s"),
            ]
        )
    out.append(table(["BACKEND", "PACKETS", "PPS", "BYTES", "BPS"], brows))
    prows = []
    for v in s["vips"]:
        for b in v.get("backends", []):
            c = b["counters"]
            prows.append(
                [
                    v["vip_id"],
                    b["address"],
                    c["packets"]["value"],
                    _rate(c["packets"]),
                    human(c["bytes"]["value"]) + "B",
                    c["new_conns"]["value"],
                    _rate(c["new_conns"]),
                ]
            )
    if prows:
        out.append(
            table(["VIP", "BACKEND", "PACKETS", "PPS", "BYTES", "NEW-CONNS", "CPS"], prows)
        )
    return "\n\n".join(out)


def cmd_stats(args: argparse.Namespace) -> int:
    """lbctl stats [--watch [SECONDS]]."""
    from lbctl.health import stats_with_health

    client = client_from(args)
    query = {"per_cpu": "true"} if args.per_cpu else None
    if args.watch is None:
        emit(args, client.get("/v1/stats", query=query), stats_with_health(client, _stats_text))
        return EXIT_OK
    n = 0
    while args.count is None or n < args.count:
        data = client.get("/v1/stats", query=query)
        if args.output == "table" and sys.stdout.isatty():
            print("\033[H\033[2J", end="")
        emit(args, data, stats_with_health(client, _stats_text))
        n += 1
        if args.count is not None and n >= args.count:
            break
        sys.stdout.flush()
        time.sleep(args.watch)
    return EXIT_OK


def add_commands(sub: Any, leaf: Leaf) -> None:
    """`lbctl stats`."""
    sp = leaf(sub, "stats", cmd_stats, "counters and rates")
    sp.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS")
    sp.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    sp.add_argument("--per-cpu", action="store_true")
