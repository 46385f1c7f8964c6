"""`lbctl serve` (the daemon: load, reconcile, attach, serve the API) and `lbctl detach`.

Only these commands import the server (uvicorn, xlb_api) and the data plane, when they run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lbctl.base import EXIT_OK, EXIT_START, EXIT_USAGE, CliError, port_arg
from lbctl.client import CLIENT_ENV, DEFAULT_TOKEN_FILE

#: Variables only the test suite reads (kept out of the unknown-variable warning).
TEST_ENV = frozenset({"XLB_CRASH_AT", "XLB_FUZZ_SEED", "XLB_TEST_HOME"})


def _lb_settings(args: argparse.Namespace) -> Any:
    from lb.settings import load_settings

    overrides: dict[str, Any] = {}
    if getattr(args, "interface", None):
        overrides["interface"] = args.interface
    if getattr(args, "netns", None):
        overrides["netns"] = args.netns
    return load_settings(args.config, **overrides)


def _settings_error(e: Any) -> str:
    """One line naming each invalid API setting, its rule and where it came from."""
    parts = []
    for err in e.errors():
        name = ".".join(str(x) for x in err["loc"])
        flag = "--" + name.replace("_", "-")
        parts.append(f"{name}: {err['msg']} (got {err.get('input')!r}; {flag} or "
                     f"XLB_API_{name.upper()})")
    return "; ".join(parts)


def _check_state_dir(path: Path) -> None:
    # Checked before the data plane loads, so the operator learns in one line, not at the
    # first store write.
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".xlb-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CliError(
            f"cannot start: state_dir {path}: {e.strerror or e}; choose a writable directory "
            "(XLB_STATE_DIR, or state_dir in the --config file)",
            EXIT_START,
        ) from None


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise CliError(
            f"cannot start: cannot listen on {host}:{port}: {e.strerror or e}; choose another "
            "address or port (--host/--port, XLB_API_HOST/XLB_API_PORT)",
            EXIT_START,
        ) from None
    return sock


def _start_error(e: BaseException) -> CliError:
    from lb.errors import XlbError

    if isinstance(e, XlbError):
        where = f" [setting {e.field}: {env_name(e.field)}]" if e.field else ""
        return CliError(f"cannot start: {e.detail}{where}", EXIT_START)
    if isinstance(e, OSError):
        return CliError(f"cannot start: {e}", EXIT_START)
    return CliError(f"cannot start: {type(e).__name__}: {e} (run with --log-level debug for "
                    "the traceback)", EXIT_START)


def env_name(field: str) -> str:
    """The environment variable of a data-plane setting (`dataplane.max_vips` and the like)."""
    short = {"max_vips": "dataplane.max_vips", "max_reals": "dataplane.max_reals",
             "ring_size": "dataplane.ring_size", "conn_table_size": "dataplane.conn_table_size"}
    path = short.get(field, field)
    if path == "config":
        return "--config or XLB_CONFIG"
    return "XLB_" + "__".join(path.upper().split("."))


def warn_unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Print (and return) a warning for each XLB_* variable no part of xlb reads."""
    import difflib

    from lb.settings import known_env_names
    from xlb_api.settings import ApiSettings

    env = os.environ if environ is None else environ
    known = known_env_names() | {f"XLB_API_{f.upper()}" for f in ApiSettings.model_fields}
    known |= CLIENT_ENV | TEST_ENV
    out = []
    for name in sorted(n for n in env if n.startswith("XLB_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        out.append(f"lbctl: warning: unknown environment variable {name} (ignored){hint}")
    for line in out:
        print(line, file=sys.stderr)
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    """lbctl serve: run the daemon (load, reconcile, attach, serve the API)."""
    import logging
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    import uvicorn
    from pydantic import ValidationError

    from xlb_api.main import create_app, open_daemon
    from xlb_api.server import plain_http_warning, uvicorn_config
    from xlb_api.settings import ApiSettings, ensure_token_file

    warn_unknown_env()
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
    try:
        settings = ApiSettings(**updates)
    except ValidationError as e:
        raise CliError(f"invalid API settings: {_settings_error(e)}", EXIT_USAGE) from None
    if settings.token is None:
        tf = settings.token_file or DEFAULT_TOKEN_FILE
        settings = settings.model_copy(update={"token_file": tf})
        if ensure_token_file(tf):
            print(f"lbctl: created a token in {tf} (mode 0600)", file=sys.stderr)
    if settings.expected_token() is None:
        raise CliError(f"no token: {settings.token_file} is empty", EXIT_USAGE)
    try:
        lb_settings = _lb_settings(args)
    except Exception as e:
        raise _start_error(e) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    warning = plain_http_warning(settings)
    if warning is not None:
        logging.getLogger("xlb.api").warning(warning)
    _check_state_dir(lb_settings.state_dir)
    uds = settings.uds
    if uds is not None:
        # Bound here so the socket has its mode before anyone can connect.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        uds.unlink(missing_ok=True)
        uds.parent.mkdir(parents=True, exist_ok=True)
        sock.bind(str(uds))
        uds.chmod(settings.uds_mode)
    else:
        # Bound before the data plane loads: a taken port fails in one line, at once.
        sock = _bind(settings.host, settings.port)
    sockets = [sock]
    # Opened before uvicorn starts (in a worker thread: BCC and netlink block, and pyroute2
    # runs its own event loop), so a failing start is one line naming the setting.
    owned = ExitStack()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xlb-open") as pool:
            runtime = pool.submit(
                open_daemon, owned, settings, lb_settings, repin=args.repin
            ).result()
    except Exception as e:
        logging.getLogger("xlb.api").debug("start failed", exc_info=e)
        owned.close()
        sock.close()
        if uds is not None:
            uds.unlink(missing_ok=True)
        raise _start_error(e) from None
    app = create_app(settings=settings, lb_settings=lb_settings, opened=(runtime, owned))
    config = uvicorn_config(app, settings, timeout_graceful_shutdown=5)

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
    try:
        server.run(sockets=sockets)
    finally:
        owned.close()  # a no-op once the app's lifespan closed it
    return EXIT_OK if server.started else EXIT_START


def _withdraw_bgp(s: Any) -> None:
    # The daemon announces the VIPs only while the balancer is attached; with the daemon
    # stopped (the unit's speaker outlives it) nobody would withdraw them, and the router
    # would keep sending to a host that no longer balances. Routes go first, as with
    # --detach-on-exit; the speaker keeps its sessions, and `lbctl serve` announces again.
    from lb.fleet.bgp import Speaker, SpeakerError

    sp = Speaker(s.bgp, s.state_dir / "bgp")
    if sp.pid() is None or not sp.announced():
        return
    try:
        sp.announce(set())
    except SpeakerError as e:
        raise CliError(f"not detached: withdrawing the VIP routes from BGP failed ({e}); "
                       "detach anyway with --no-withdraw") from e
    print("withdrew this host's VIP routes from BGP (the speaker keeps its sessions)")


def cmd_detach(args: argparse.Namespace) -> int:
    """lbctl detach: take the balancer off its interface (maps stay pinned)."""
    from lb.dataplane import attach as xdp

    s = _lb_settings(args)
    if not s.interface:
        raise CliError("no interface configured: give --interface or XLB_INTERFACE", EXIT_USAGE)
    if s.bgp.enabled and not args.no_withdraw:
        _withdraw_bgp(s)
    removed = xdp.detach(s.interface, netns=s.netns, pin_dir=s.pin_dir)
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
    sp.add_argument("--port", type=port_arg, help="listen port, 0..65535 (default 9780)")
    sp.add_argument("--uds", type=Path, help="listen on this unix socket (mode 0660)")
    sp.add_argument("--ssl-certfile", type=Path, help="TLS certificate (PEM)")
    sp.add_argument("--ssl-keyfile", type=Path, help="TLS private key (PEM)")
    sp.add_argument(
        "--token-file", type=Path, dest="token_file", help="token file (created if missing)"
    )
    sp.add_argument("--detach-on-exit", action="store_true", help="detach the program on shutdown")
    sp.add_argument(
        "--repin",
        action="store_true",
        help="drop pinned maps that do not match the configuration (their flows, rings and "
        "counters) and start fresh; the VIPs are rewritten from the store",
    )
    sp.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])

    sp = sub.add_parser(
        "detach", help="take the balancer off its interface",
        description="Take the balancer off its interface (maps stay pinned). With bgp.enabled,"
        " this host's VIP routes are withdrawn from BGP first, so the router stops sending.")
    sp.set_defaults(fn=cmd_detach)
    sp.add_argument("--config", help="xlb TOML configuration (env XLB_CONFIG)")
    sp.add_argument("--interface")
    sp.add_argument("--netns")
    sp.add_argument("--no-withdraw", action="store_true",
                    help="detach without withdrawing the VIP routes from BGP first")
