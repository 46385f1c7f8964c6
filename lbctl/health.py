"""lbctl's health-check commands: `health show|set|rm`, `backend drain --wait`, and the
health section of `lbctl stats`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from lb.client import backend_path, vip_path
from lbctl.base import EXIT_API, EXIT_OK, EXIT_USAGE, CliError, Leaf, Parser, vip_id_arg
from lbctl.client import Client, client_from
from lbctl.output import emit, table

#: `lbctl health set` flags -> HealthCheck fields.
_FIELDS = {
    "type": "type",
    "mode": "mode",
    "port": "port",
    "interval": "interval_s",
    "timeout": "timeout_s",
    "rise": "rise",
    "fall": "fall",
    "jitter": "jitter",
    "path": "path",
    "host": "host",
    "expect": "expect_status",
    "udp_payload": "udp_payload_hex",
    "udp_expect": "udp_expect_hex",
    "max_down": "max_down_fraction",
    "slow_start": "slow_start_s",
    "flap_threshold": "flap_threshold",
    "flap_half_life": "flap_half_life_s",
}


def _age(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}s"


def health_table(data: Any) -> str:
    """The pairs of every checked VIP as a table, then the recent transitions."""
    if not data.get("enabled", True):
        return "the daemon runs no health checker"
    rows = []
    for v in data["vips"]:
        c = v["check"]
        flags = " ALL-DOWN(last healthy set kept)" if v["all_down"] else ""
        for b in v["backends"]:
            notes = []
            if b["held_by_floor"]:
                notes.append("held by floor")
            if b["suppressed"]:
                notes.append(f"flapping (penalty {b['penalty']:.2f})")
            if b["ramp"] is not None:
                notes.append(f"slow start {100 * b['ramp']:.0f}%")
            if b["last_error"] and b["status"] == "down":
                notes.append(str(b["last_error"]))
            rows.append([
                v["vip_id"] + flags, b["address"], f"{c['type']}/{c['mode']}", b["status"],
                b["ring"], f"{b['transitions']['down']}/"
                f"{b['transitions']['up']}", _age(b["since_s"]), "; ".join(notes) or "-",
            ])
    out = [table(["VIP", "BACKEND", "CHECK", "HEALTH", "RING", "DOWNS/UPS", "SINCE",
                  "NOTES"], rows) if rows else "no VIP has a health check"]
    events = data.get("events", [])[-10:]
    if events:
        out.append(table(
            ["WHEN", "VIP", "BACKEND", "EVENT", "DETAIL"],
            [[time.strftime("%H:%M:%S", time.localtime(e["time"])), e["vip_id"],
              e["backend"] or "-", e["kind"], e["detail"]] for e in events],
        ))
    return "\n\n".join(out)


def cmd_health_show(args: argparse.Namespace) -> int:
    """lbctl health show [VIP]."""
    client = client_from(args)
    data = client.get("/v1/health")
    if args.vip:
        wanted = client.get(vip_path(args.vip))["id"]
        data = {**data, "vips": [v for v in data["vips"] if v["vip_id"] == wanted],
                "events": [e for e in data["events"] if e["vip_id"] == wanted]}
    emit(args, data, health_table)
    return EXIT_OK


def cmd_health_set(args: argparse.Namespace) -> int:
    """lbctl health set VIP [--type ...] ...: set (replace) a VIP's health check."""
    body: dict[str, Any] = {}
    for flag, field in _FIELDS.items():
        v = getattr(args, flag)
        if v is not None:
            body[field] = v
    _, _, v = client_from(args).request("PUT", vip_path(args.vip) + "/health_check", body)
    emit(args, v, lambda v: f"health check of {v['id']}: " + ", ".join(
        f"{k}={val}" for k, val in v["health_check"].items() if val is not None))
    return EXIT_OK


def cmd_health_rm(args: argparse.Namespace) -> int:
    """lbctl health rm VIP: stop checking a VIP's backends."""
    client_from(args).request("DELETE", vip_path(args.vip) + "/health_check")
    emit(args, {"vip": args.vip}, lambda d: f"health check of {d['vip']} removed")
    return EXIT_OK


def add_commands(sub: Any, leaf: Leaf) -> None:
    """Add `lbctl health show|set|rm` to the parser."""
    grp = sub.add_parser("health", help="health checks of VIPs' backends")
    hsub = grp.add_subparsers(dest="sub", required=True, parser_class=Parser)
    leaf(hsub, "show", cmd_health_show, "health of every checked backend, recent events") \
        .add_argument("vip", nargs="?", type=vip_id_arg, help="only this VIP")
    sp = leaf(hsub, "set", cmd_health_set, "set a VIP's health check (unset flags: defaults)")
    sp.add_argument("vip", type=vip_id_arg)
    sp.add_argument("--type", choices=["tcp", "http", "https", "udp"])
    sp.add_argument("--mode", choices=["direct", "tunnel"])
    sp.add_argument("--port", type=int, help="port to probe (default: the VIP's)")
    sp.add_argument("--interval", type=float, help="seconds between probes (2)")
    sp.add_argument("--timeout", type=float, help="probe timeout in seconds (1)")
    sp.add_argument("--rise", type=int, help="good probes in a row to come back (2)")
    sp.add_argument("--fall", type=int, help="failed probes in a row to go down (3)")
    sp.add_argument("--jitter", type=float, help="interval jitter fraction (0.1)")
    sp.add_argument("--path", help="http(s) path (/)")
    sp.add_argument("--host", help="http(s) Host header")
    sp.add_argument("--expect", type=int, action="append", help="healthy HTTP status (200)")
    sp.add_argument("--udp-payload", help="udp request in hex (default: a DNS query)")
    sp.add_argument("--udp-expect", help="udp answer prefix in hex")
    sp.add_argument("--max-down", type=float, help="safety floor: most weight out (0.5)")
    sp.add_argument("--slow-start", type=float, help="seconds a returning backend ramps (0)")
    sp.add_argument("--flap-threshold", type=float, help="damping penalty to hold down (3)")
    sp.add_argument("--flap-half-life", type=float, help="damping half-life in s (60)")
    leaf(hsub, "rm", cmd_health_rm, "stop checking a VIP's backends").add_argument(
        "vip", type=vip_id_arg
    )


def add_drain_flags(sp: argparse.ArgumentParser) -> None:
    """`lbctl backend drain --wait [--timeout S]`."""
    sp.add_argument("--wait", action="store_true",
                    help="wait until the backend's tracked flows reach zero")
    sp.add_argument("--timeout", type=float, default=300.0,
                    help="with --wait: give up after this many seconds (300)")
    sp.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)


def wait_drained(args: argparse.Namespace) -> int:
    """Poll a draining backend's live flows until zero (0) or the timeout (1)."""
    if args.timeout <= 0 or args.poll <= 0:
        raise CliError("--timeout and --poll must be positive", EXIT_USAGE)
    client: Client = client_from(args)
    path = backend_path(args.vip, args.address) + "/flows"
    deadline = time.monotonic() + args.timeout
    last = -1
    while True:
        f = client.get(path)
        if f["flows"] != last and args.output == "table":
            print(f"{f['address']}: {f['flows']} live flows", file=sys.stderr, flush=True)
            last = f["flows"]
        if f["drained"]:
            emit(args, f, lambda f: f"drained {f['address']} on {f['vip_id']}: no live flows")
            return EXIT_OK
        if time.monotonic() >= deadline:
            emit(args, f, lambda f: f"timed out after {args.timeout:g} s: {f['address']} "
                                    f"still has {f['flows']} live flows")
            return EXIT_API
        time.sleep(min(args.poll, max(0.0, deadline - time.monotonic())))


def stats_with_health(client: Client, render: Callable[[Any], str]) -> Callable[[Any], str]:
    """`lbctl stats`'s renderer followed by the health table (when any VIP is checked)."""

    def both(data: Any) -> str:
        text = render(data)
        try:
            health = client.get("/v1/health")
        except CliError:
            return text  # an older daemon without health checking
        if health.get("vips"):
            text += "\n\n" + health_table(health)
        return text

    return both
