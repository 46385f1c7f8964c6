"""`lbctl backend-host up|down|status`: this host as a DSR backend (lb.install.backend).

    lbctl backend-host up --interface IF --vip ADDR [ADDR...] [--mode tc|xdp]
    lbctl backend-host down --interface IF
    lbctl backend-host status --interface IF [-o json]

Runs on the backend itself, as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON); the unit
xlb-backend@IF.service runs `up` at start and `down` at stop.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lbctl.base import EXIT_API, EXIT_OK, CliError


def _host(args: argparse.Namespace) -> Any:
    from lb.install.backend import BackendHost
    from lb.install.layout import BACKEND_PIN_DIR, BACKEND_STATE_DIR

    return BackendHost(interface=args.interface, netns=args.netns,
                       state_dir=args.state_dir or BACKEND_STATE_DIR,
                       pin_root=args.pin_root or BACKEND_PIN_DIR)


def _fail(e: Any) -> CliError:
    """An lb error as the one line lbctl prints (exit 1)."""
    return CliError(e.detail, EXIT_API)


def cmd_up(args: argparse.Namespace) -> int:
    """backend-host up: decap on the interface, VIPs on lo, ARP and rp_filter sysctls."""
    from lb.errors import XlbError
    from lb.install.backend import up

    vips = [v for arg in args.vip for v in arg.replace(",", " ").split()]
    try:
        st = up(_host(args), vips, args.mode)
    except XlbError as e:
        raise _fail(e) from None
    changed = ", ".join(f"{k}={v}->" for k, v in st.sysctls_before.items()) or "none"
    print(f"backend-host up on {st.interface}: decap ({st.mode}) for "
          f"{', '.join(st.decap_addrs)}; VIPs on lo: {', '.join(st.vips)}"
          f" (added {len(st.vips_added)}); sysctls changed from: {changed}")
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    """backend-host down: undo what up changed, sysctls back to their old values."""
    from lb.errors import XlbError
    from lb.install.backend import down

    try:
        st = down(_host(args))
    except XlbError as e:
        raise _fail(e) from None
    print(f"backend-host down on {st.interface}: decap detached, {len(st.vips_added)} VIPs "
          f"removed from lo, {len(st.sysctls_before)} sysctls restored")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """backend-host status: what is up, live, and the decap counters."""
    from lb.errors import XlbError
    from lb.install.backend import status

    try:
        st = status(_host(args))
    except XlbError as e:
        raise _fail(e) from None
    if args.output == "json":
        print(json.dumps(st, indent=1))
        return EXIT_OK
    vips = ", ".join(f"{v}{'' if on else ' (NOT on lo)'}" for v, on in st["vips"].items())
    lines = [f"interface:  {st['interface']}" + (f" (netns {st['netns']})" if st["netns"] else ""),
             f"decap:      {st['mode']}, {'attached' if st['attached'] else 'NOT ATTACHED'}"
             f" for {', '.join(st['decap_addrs'])}",
             f"VIPs on lo: {vips}",
             "sysctls:    " + ", ".join(f"{k.split('.', 3)[3]}={v}"
                                        for k, v in st["sysctls"].items()),
             "counters:"]
    lines += [f"  {k.removeprefix('DECAP_STAT_').lower():<16} {v}"
              for k, v in st["counters"].items()]
    print("\n".join(lines))
    return EXIT_OK if st["attached"] and all(st["vips"].values()) else EXIT_API


def add_commands(sub: Any) -> None:
    """`lbctl backend-host up|down|status`."""
    bp = sub.add_parser("backend-host", help="this host as a DSR backend: up|down|status",
                        description="Set this host up as a backend of some VIPs.")
    verbs = bp.add_subparsers(dest="verb", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--interface", required=True, help="the uplink the tunnel arrives on")
        sp.add_argument("--netns", help="named network namespace (default: this one)")
        sp.add_argument("--state-dir", type=Path, help="default /var/lib/xlb-backend")
        sp.add_argument("--pin-root", type=Path, help="default /sys/fs/bpf/xlb-backend")

    sp = verbs.add_parser("up", help="decap, VIPs on lo, sysctls")
    sp.set_defaults(fn=cmd_up)
    common(sp)
    sp.add_argument("--vip", nargs="+", required=True, action="extend",
                    help="VIP addresses (repeat, or space/comma separated)")
    sp.add_argument("--mode", choices=["tc", "xdp"], default="tc",
                    help="decap as tc ingress (default) or XDP")
    sp = verbs.add_parser("down", help="undo up, restore the sysctls")
    sp.set_defaults(fn=cmd_down)
    common(sp)
    sp = verbs.add_parser("status", help="state, live checks and decap counters")
    sp.set_defaults(fn=cmd_status)
    common(sp)
    sp.add_argument("-o", "--output", choices=["table", "json"], default="table")
