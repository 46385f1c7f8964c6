"""`lbctl doctor`: check an xlb lab or host hop by hop and name the hop that drops.

    lbctl doctor --lab [PREFIX]        a lab made by `lbctl lab up` (default prefix xlab)
    lbctl doctor [--config FILE]       this host, from the xlb settings (interface, pins, ...)
    lbctl doctor --backend --vip ADDR  this host as a backend (decap or tunnel, VIP on lo, ARP,
                                       rp_filter on tunnel devices, checksum errors)

Exit status: 0 when nothing failed, 1 when a check failed. The checks are lb.ops.doctor's
(hosts) and lb.lab.doctor's (labs, imported only for --lab).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from lb.ops.doctor import Report, check_backend_host, check_host


def main(argv: list[str] | None = None) -> int:
    """`lbctl doctor [--lab [PREFIX]] [--config FILE] [--no-probe] [--json] [-q]`."""
    p = argparse.ArgumentParser(prog="lbctl doctor", description=__doc__.splitlines()[0])
    p.add_argument("--lab", nargs="?", const="", metavar="PREFIX",
                   help="check a lab (default prefix xlab)")
    p.add_argument("--config", help="xlb settings file for a host check")
    p.add_argument("--backend", action="store_true", help="check this host as a backend")
    p.add_argument("--vip", action="append", default=[], help="a VIP the backend serves")
    p.add_argument("--interface", help="the backend's uplink (default: the default route's)")
    p.add_argument("--netns", help="named namespace to check instead of this one")
    p.add_argument("--decap-pins", type=Path, help="pin directory of the decap maps")
    p.add_argument("--no-probe", action="store_true", help="no probe traffic through the VIPs")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="host checks: read the drop counters this far apart (0: the totals)")
    p.add_argument("--json", action="store_true", help="findings as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and failures")
    a = p.parse_args(argv)
    if a.lab is not None:
        # Imported only here, so a host check never loads the lab.
        from lb.lab.doctor import check_lab
        from lb.lab.network import DEFAULT_PREFIX, Lab

        report: Report = check_lab(Lab.load(a.lab or DEFAULT_PREFIX), probe=not a.no_probe)
    elif a.backend:
        report = check_backend_host(a.vip, a.interface, a.netns, a.decap_pins, a.interval)
    else:
        report = check_host(a.config, a.netns, a.interval)
    if a.json:
        print(json.dumps([asdict(f) for f in report.findings], indent=1))
    else:
        print(report.render(verbose=not a.quiet))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
