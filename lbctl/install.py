"""`lbctl install`, `lbctl uninstall` and `lbctl prepare-pins` (lb.install.installer).

    lbctl install --wheel dist/xlb-*.whl [--root DIR] [--prefix /opt/xlb] [--python PY]
    lbctl uninstall [--purge] [--root DIR] [--prefix /opt/xlb]

Standard library only, so it runs from the wheel before anything is installed:
`PYTHONPATH=xlb-0.1.0-*.whl python3 -m lbctl install --wheel xlb-0.1.0-*.whl`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lbctl.base import EXIT_OK, EXIT_START, CliError


def _target(args: argparse.Namespace) -> Any:
    from lb.install.installer import Target

    if not args.prefix.is_absolute() or not args.root.is_dir():
        raise CliError(f"--prefix must be absolute and --root a directory (got {args.prefix}, "
                       f"{args.root})", EXIT_START)
    return Target(root=args.root, prefix=args.prefix)


def cmd_install(args: argparse.Namespace) -> int:
    """lbctl install: the wheel into a venv, units, user, config, token."""
    from lb.install.installer import InstallError, install

    try:
        install(args.wheel, _target(args), python=args.python)
    except InstallError as e:
        raise CliError(f"install: {e}", EXIT_START) from None
    return EXIT_OK


def cmd_uninstall(args: argparse.Namespace) -> int:
    """lbctl uninstall: the venv and units; --purge also config, state, pins, user."""
    from lb.install.installer import InstallError, uninstall

    try:
        uninstall(_target(args), purge=args.purge)
    except InstallError as e:
        raise CliError(f"uninstall: {e}", EXIT_START) from None
    return EXIT_OK


def cmd_prepare_pins(args: argparse.Namespace) -> int:
    """lbctl prepare-pins: the unit's pin directory on bpffs, owned by the daemon's user."""
    from lb.install.installer import InstallError, prepare_pins

    try:
        prepare_pins(args.pin_dir, args.user)
    except (InstallError, KeyError, OSError) as e:
        raise CliError(f"prepare-pins: {e}", EXIT_START) from None
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """`lbctl install`, `uninstall` and `prepare-pins` (the host's side: no connection flags)."""
    from lb.install import layout
    from lb.install.installer import SYSTEM_PYTHON

    def where(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--root", type=Path, default=Path("/"),
                        help="install under this directory instead of / (staging, images)")
        sp.add_argument("--prefix", type=Path, default=layout.PREFIX,
                        help=f"the venv (default {layout.PREFIX})")

    sp = sub.add_parser("install", help="install xlb from its wheel (venv, units, user, config)",
                        description="Install xlb from its wheel (docs/install.md).")
    sp.set_defaults(fn=cmd_install)
    sp.add_argument("--wheel", type=Path, required=True, help="the built xlb-*.whl")
    sp.add_argument("--python", type=Path, default=SYSTEM_PYTHON,
                    help=f"interpreter the venv is made from (default {SYSTEM_PYTHON})")
    where(sp)
    sp = sub.add_parser("uninstall", help="remove the venv and units (--purge: all)",
                        description="Remove an installed xlb; config and state stay unless "
                        "--purge.")
    sp.set_defaults(fn=cmd_uninstall)
    sp.add_argument("--purge", action="store_true",
                    help="also remove /etc/xlb, the state, the pins and the xlb user")
    where(sp)
    sp = sub.add_parser("prepare-pins", help="the daemon's pin directory (run by the unit)")
    sp.set_defaults(fn=cmd_prepare_pins)
    sp.add_argument("--user", default=layout.USER)
    sp.add_argument("--pin-dir", type=Path, default=layout.PIN_DIR)
