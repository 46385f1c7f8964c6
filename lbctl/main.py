"""lbctl: the operator's command line, a client of the REST API (plus `serve` and `detach`).

Where the daemon is and the token come from: lbctl.client (flags, XLB_URL / XLB_TOKEN /
XLB_TOKEN_FILE, ~/.config/xlb/lbctl.toml, then http://127.0.0.1:9780 and /etc/xlb/token).
`--url unix:///run/xlb/api.sock` talks over a unix socket.

Output: tables for people, `-o json` (or yaml) for scripts. Exit codes: 0 done, 1 the API
refused (its problem detail is printed), 2 bad usage, 3 the daemon cannot be reached, 4 `lbctl
serve` could not start (one line naming the setting and the fix).

One module per command group (vips, backends, health, stats, explain, state, serve); `lab`
and `doctor` own their options (lbctl.lab, lbctl.doctor). Only the standard library is used
for HTTP, so the client starts fast and never imports the server; `serve` imports uvicorn and
the app when it runs. lbctl is the composition layer: the one place that reaches the lab.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lbctl import (
    backend_host,
    backends,
    chain,
    explain,
    fleet,
    health,
    host,
    install,
    monitor,
    serve,
    state,
    stats,
    verify,
    vips,
)
from lbctl.base import EXIT_API, EXIT_OK, CliError, Command, Parser
from lbctl.client import DEFAULT_URL

#: Commands that parse their own options (and answer their own --help).
OWN_OPTIONS = ("lab", "doctor")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of lbctl."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection and output")
    g.add_argument("--url", default=argparse.SUPPRESS, help=f"API URL (env XLB_URL; {DEFAULT_URL})")
    g.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (env XLB_TOKEN)")
    g.add_argument("--token-file", default=argparse.SUPPRESS, help="file holding the token")
    g.add_argument("--cacert", default=argparse.SUPPRESS, help="CA bundle for https URLs")
    g.add_argument(
        "-o",
        "--output",
        choices=["table", "json", "yaml"],
        default=argparse.SUPPRESS,
        help="output format (default: table)",
    )
    p = Parser(prog="lbctl", description="Operate an xlb load balancer through its REST API.")
    p.set_defaults(url=None, token=None, token_file=None, cacert=None, output="table")
    for a in common._actions:
        if a.option_strings:
            p._add_action(a)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def leaf(parent: Any, name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(
            name, parents=[common], help=help, description=help
        )
        sp.set_defaults(fn=fn)
        return sp

    for group in (vips, backends, health, stats, explain, state, verify, fleet, host, chain,
                  monitor):
        group.add_commands(sub, leaf)
    serve.add_commands(sub)
    install.add_commands(sub)
    backend_host.add_commands(sub)

    # Listed for --help; main() hands their arguments to lbctl.lab / lbctl.doctor untouched.
    sub.add_parser("lab", help="the network lab: up|down|status (lb.lab)", add_help=False)
    sub.add_parser("doctor", help="check this host or a lab (lb.doctor)", add_help=False)
    return p


def _own_options(command: str, argv: list[str]) -> int:
    if command == "lab":
        from lbctl import lab

        return lab.main(argv)
    from lbctl import doctor

    return doctor.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lbctl`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # The lab and the doctor own their options (and their --help).
        if argv and argv[0] in OWN_OPTIONS:
            return _own_options(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.fn(args))
    except CliError as e:
        print(f"lbctl: error: {e.message}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # an lb error from serve/detach, printed without a traceback
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        print(f"lbctl: error: {detail}", file=sys.stderr)
        return EXIT_API


if __name__ == "__main__":
    sys.exit(main())
