"""`lbctl serve` (the daemon: load, reconcile, attach, serve the API) and `lbctl detach`.

Only these commands import the server (uvicorn, xlb_api) and the data plane, when they run.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

from lbctl.base import EXIT_API, EXIT_OK, EXIT_USAGE, CliError
from lbctl.client import DEFAULT_TOKEN_FILE


def _lb_settings(args: argparse.Namespace) -> Any:
    from lb.settings import load_settings

    overrides: dict[str, Any] = {}
    if getattr(args, "interface", None):
        overrides["interface"] = args.interface
    if getattr(args, "netns", None):
        overrides["netns"] = args.netns
    return load_settings(args.config, **overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    """lbctl serve: run the daemon (load, reconcile, attach, serve the API)."""
    import logging

    import uvicorn

    from xlb_api.main import create_app
    from xlb_api.server import plain_http_warning, uvicorn_config
    from xlb_api.settings import ApiSettings, ensure_token_file

    updates: dict[str, Any] = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "uds": args.uds,
            "ssl_certfile": args.ssl_certfile,
            "ssl_keyfile": args.ssl_keyfile,
            "token_file": args.token_file,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    if args.detach_on_exit:
        updates["detach_on_exit"] = True
    settings = ApiSettings(**updates)
    if settings.token is None:
        tf = settings.token_file or DEFAULT_TOKEN_FILE
        settings = settings.model_copy(update={"token_file": tf})
        if ensure_token_file(tf):
            print(f"lbctl: created a token in {tf} (mode 0600)", file=sys.stderr)
    if settings.expected_token() is None:
        raise CliError(f"no token: {settings.token_file} is empty", EXIT_USAGE)
    lb_settings = _lb_settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    warning = plain_http_warning(settings)
    if warning is not None:
        logging.getLogger("xlb.api").warning(warning)
    app = create_app(settings=settings, lb_settings=lb_settings)
    config = uvicorn_config(app, settings, timeout_graceful_shutdown=5)
    uds = settings.uds
    sockets = None
    if uds is not None:
        # Bound here so the socket has its mode before anyone can connect.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        uds.unlink(missing_ok=True)
        uds.parent.mkdir(parents=True, exist_ok=True)
        sock.bind(str(uds))
        uds.chmod(settings.uds_mode)
        sockets = [sock]

    class Server(uvicorn.Server):
        async def _serve(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn re-raises SIGTERM/SIGINT after a clean shutdown (the process then dies
            # of it), so the socket file is removed here, before that.
            try:
                await super()._serve(sockets)
            finally:
                if uds is not None:
                    uds.unlink(missing_ok=True)

    server = Server(config)
    server.run(sockets=sockets)
    return EXIT_OK if server.started else EXIT_API


def cmd_detach(args: argparse.Namespace) -> int:
    """lbctl detach: take the balancer off its interface (maps stay pinned)."""
    from lb.dataplane import attach as xdp

    s = _lb_settings(args)
    if not s.interface:
        raise CliError("no interface configured: give --interface or XLB_INTERFACE", EXIT_USAGE)
    removed = xdp.detach(s.interface, netns=s.netns)
    where = s.interface + (f" in netns {s.netns}" if s.netns else "")
    if removed is None or removed.prog_id is None:
        print(f"nothing attached to {where}")
    else:
        print(f"detached {removed.prog_name or 'program'} (id {removed.prog_id}) from {where}")
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """`lbctl serve` and `lbctl detach` (no connection flags: they are the daemon's side)."""
    sp = sub.add_parser("serve", help="run the daemon", description="Run the xlb daemon.")
    sp.set_defaults(fn=cmd_serve)
    sp.add_argument("--config", help="xlb TOML configuration (env XLB_CONFIG)")
    sp.add_argument("--interface", help="attach to this interface (env XLB_INTERFACE)")
    sp.add_argument("--netns", help="named network namespace of the interface")
    sp.add_argument("--host", help="listen address (default 127.0.0.1)")
    sp.add_argument("--port", type=int, help="listen port (default 9780)")
    sp.add_argument("--uds", type=Path, help="listen on this unix socket (mode 0660)")
    sp.add_argument("--ssl-certfile", type=Path, help="TLS certificate (PEM)")
    sp.add_argument("--ssl-keyfile", type=Path, help="TLS private key (PEM)")
    sp.add_argument(
        "--token-file", type=Path, dest="token_file", help="token file (created if missing)"
    )
    sp.add_argument("--detach-on-exit", action="store_true", help="detach the program on shutdown")
    sp.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])

    sp = sub.add_parser("detach", help="take the balancer off its interface")
    sp.set_defaults(fn=cmd_detach)
    sp.add_argument("--config", help="xlb TOML configuration (env XLB_CONFIG)")
    sp.add_argument("--interface")
    sp.add_argument("--netns")
