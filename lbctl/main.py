"""lbctl: the operator's command line, a client of the REST API (plus `serve` and `detach`).

Where the daemon is and the token come from, first found wins: the flags `--url` / `--token`
/ `--token-file`, the environment `XLB_URL` / `XLB_TOKEN` / `XLB_TOKEN_FILE`, the file
`~/.config/xlb/lbctl.toml` (keys `url`, `token`, `token_file`; `XLB_LBCTL_CONFIG` names
another), then `http://127.0.0.1:9780` and the daemon's default token file `/etc/xlb/token`
when it is readable. `--url unix:///run/xlb/api.sock` talks over a unix socket.

Output: tables for people, `-o json` (or yaml) for scripts. Exit codes: 0 done, 1 the API
refused (its problem detail is printed), 2 bad usage, 3 the daemon cannot be reached.

Only the standard library is used for HTTP, so the client starts fast and never imports the
server; `serve` imports uvicorn and the app when it runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode, urlsplit

DEFAULT_URL = "http://127.0.0.1:9780"
DEFAULT_TOKEN_FILE = Path("/etc/xlb/token")
CONFIG_PATH = Path.home() / ".config" / "xlb" / "lbctl.toml"

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class CliError(Exception):
    """An error to print (without a traceback) before exiting with `code`."""

    def __init__(self, message: str, code: int = EXIT_API) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- HTTP ----------------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class Client:
    """A small JSON client of the xlb API."""

    def __init__(
        self, url: str, token: str | None, *, cacert: str | None = None, timeout: float = 30.0
    ) -> None:
        self.url = url
        self.token = token
        parts = urlsplit(url)
        self._scheme = parts.scheme
        if parts.scheme == "unix":
            self._target = parts.path
        elif parts.scheme in ("http", "https"):
            if not parts.hostname:
                raise CliError(f"--url {url!r} has no host", EXIT_USAGE)
            self._target = parts.netloc
        else:
            raise CliError(
                f"--url {url!r}: use http://HOST:PORT, https://HOST:PORT or unix:///PATH",
                EXIT_USAGE,
            )
        self._base = parts.path.rstrip("/") if parts.scheme != "unix" else ""
        self._cacert = cacert
        self._timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self._scheme == "unix":
            return _UnixConnection(self._target, self._timeout)
        if self._scheme == "https":
            ctx = ssl.create_default_context(cafile=self._cacert)
            return http.client.HTTPSConnection(self._target, timeout=self._timeout, context=ctx)
        return http.client.HTTPConnection(self._target, timeout=self._timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """Send one request; returns (status, headers, decoded body). CliError on failure."""
        url = self._base + path + (f"?{urlencode(query)}" if query else "")
        hdrs = {"Accept": "application/json, application/problem+json", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        conn = self._connection()
        try:
            conn.request(method, url, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            rheaders = {k.lower(): v for k, v in resp.getheaders()}
        except (OSError, http.client.HTTPException) as e:
            msg = f"cannot reach the xlb daemon at {self.url}: {e}"
            raise CliError(msg, EXIT_UNREACHABLE) from None
        finally:
            conn.close()
        ctype = rheaders.get("content-type", "")
        decoded: Any = raw.decode(errors="replace")
        if "json" in ctype and raw:
            decoded = json.loads(raw)
        if resp.status >= 400:
            raise CliError(_problem_text(resp.status, decoded))
        return resp.status, rheaders, decoded

    def get(self, path: str, **kw: Any) -> Any:
        """GET and return the decoded body."""
        return self.request("GET", path, **kw)[2]


def _problem_text(status: int, body: Any) -> str:
    if isinstance(body, dict) and "detail" in body:
        text = str(body["detail"])
        if body.get("field") and str(body["field"]) not in text:
            text += f" (field: {body['field']})"
        kind = str(body.get("type", "")).rsplit(":", 1)[-1]
        return f"{text} [{status} {kind}]" if kind else f"{text} [{status}]"
    return f"HTTP {status}: {str(body)[:500]}"


def vip_path(vip_id: str) -> str:
    """URL path of a VIP (brackets and other reserved characters percent-encoded)."""
    return "/v1/vips/" + quote(vip_id, safe=":")


# --- configuration ------------------------------------------------------------------------


def _config_file() -> dict[str, Any]:
    path = Path(os.environ.get("XLB_LBCTL_CONFIG") or CONFIG_PATH)
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CliError(f"cannot read {path}: {e}", EXIT_USAGE) from None


def _read_token(path: str | Path) -> str | None:
    try:
        first = Path(path).read_text().splitlines()
    except OSError:
        return None
    return first[0].strip() if first and first[0].strip() else None


def client_from(args: argparse.Namespace) -> Client:
    """The API client the flags, environment and config file describe."""
    cfg = _config_file()
    url = args.url or os.environ.get("XLB_URL") or cfg.get("url") or DEFAULT_URL
    token = args.token or os.environ.get("XLB_TOKEN") or None
    token_file = args.token_file or os.environ.get("XLB_TOKEN_FILE")
    if token is None and token_file:
        token = _read_token(token_file)
        if token is None:
            raise CliError(f"cannot read a token from {token_file}", EXIT_USAGE)
    if token is None:
        token = cfg.get("token") or None
    if token is None and cfg.get("token_file"):
        token = _read_token(str(cfg["token_file"]))
    if token is None and os.access(DEFAULT_TOKEN_FILE, os.R_OK):
        token = _read_token(DEFAULT_TOKEN_FILE)
    cacert = args.cacert or os.environ.get("XLB_CACERT") or cfg.get("cacert")
    return Client(str(url), token, cacert=cacert)


# --- output --------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    """Print `data` as JSON/YAML when asked, else through `render`."""
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        import yaml

        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        text = render(data)
        if text:
            print(text)


def human(n: float) -> str:
    """1234567 -> 1.2M."""
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            if unit == "" and (n == int(n) or abs(n) >= 10):
                return f"{n:.0f}"
            return f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def _vips_table(data: Any) -> str:
    rows = []
    for v in data["data"]:
        flags = [k for k in ("hash_src_only", "lru_bypass") if v[k]]
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


def _vip_text(v: Any) -> str:
    head = (
        f"{v['id']}  encap={v['encap']} outer_source={v['effective_outer_source']}"
        f" hash_src_only={v['hash_src_only']} lru_bypass={v['lru_bypass']}"
    )
    return head + "\n" + _backends_table({"data": v["backends"]})


def _backends_table(data: Any) -> str:
    rows = [
        [b["address"], b["weight"], b["state"], "yes" if b["in_ring"] else "no"]
        for b in data["data"]
    ]
    return table(["BACKEND", "WEIGHT", "STATE", "IN-RING"], rows)


def _rate(c: dict[str, Any]) -> str:
    return "-" if c.get("per_s") is None else human(float(c["per_s"])) + "/s"


def _stats_text(s: Any) -> str:
    out = []
    ct = s["conn_table"]
    glob = s["global"]
    out.append(
        f"window {s['window_s']:.1f}s   conn table {ct['entries']}/{ct['capacity']} entries "
        f"(estimate)   hits {ct['hits']}   misses {ct['misses']}"
    )
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
            ]
        )
    out.append(table(["VIP", "PACKETS", "PPS", "BYTES", "BPS", "NEW-CONNS", "CPS"], vrows))
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
    return "\n\n".join(out)


def _plan_text(p: Any) -> str:
    lines = []
    for v in p["added_vips"]:
        lines.append(f"+ VIP {v}")
    for v in p["removed_vips"]:
        lines.append(f"- VIP {v}")
    for v in p["changed_vips"]:
        lines.append(
            f"~ VIP {v['vip_id']}"
            + ("  (flags/encapsulation change)" if v["flags_changed"] else "")
        )
        for b in v["added_backends"]:
            lines.append(f"    + backend {b}")
        for b in v["removed_backends"]:
            lines.append(f"    - backend {b}")
        for c in v["changed_backends"]:
            bef, aft = c["before"], c["after"]
            what = []
            if bef["weight"] != aft["weight"]:
                what.append(f"weight {bef['weight']} -> {aft['weight']}")
            if bef["state"] != aft["state"]:
                what.append(f"state {bef['state']} -> {aft['state']}")
            lines.append(f"    ~ backend {c['address']}: {', '.join(what)}")
        lines.append(f"    ring slots moving: {100 * float(v['moved_fraction']):.2f}%")
    if not lines:
        lines.append("no change")
    if p["dry_run"]:
        lines.append(f"dry run: nothing changed (generation {p['from_generation']})")
    elif p.get("to_generation") is not None:
        lines.append(f"applied: generation {p['from_generation']} -> {p['to_generation']}")
    else:
        lines.append(f"nothing to apply (generation {p['from_generation']})")
    return "\n".join(lines)


def _explain_text(e: Any) -> str:
    f = e["flow"]
    src = _hostport(f["source"], f["source_port"])
    dst = _hostport(f["destination"], f["destination_port"])
    why = {
        "conn_table": "its connection-table entry",
        "ring": "its Maglev ring slot (new flow)",
        "not_a_vip": "the destination is not a VIP",
        "no_backend": "the VIP has no backend in its ring",
        "dropped": "the program dropped it",
        "passed": "the program passed it to the kernel stack",
    }[e["reason"]]
    lines = [f"{f['protocol']} {src} -> {dst}: {e['verdict']}"]
    if e["backend"]:
        lines.append(
            f"  backend   {e['backend']}  ({e['encap']}, outer source {e['outer_source']})"
        )
    lines.append(f"  because   {why}")
    if e["vip_id"]:
        lines.append(f"  VIP       {e['vip_id']}")
    if e["in_conn_table"]:
        lines.append(f"  conn table entry -> {e['conn_table_backend']}")
    return "\n".join(lines)


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """`198.18.0.10:80` / `[2001:db8::10]:53` -> (address, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise CliError(f"{what}: {text!r} is not ADDRESS:PORT (IPv6 as [ADDR]:PORT)", EXIT_USAGE)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in host and not text.startswith("["):
        raise CliError(f"{what}: write IPv6 as [ADDR]:PORT, got {text!r}", EXIT_USAGE)
    return host, int(port)


# --- commands -------------------------------------------------------------------------------


def cmd_vip_list(args: argparse.Namespace) -> int:
    """lbctl vip list."""
    emit(args, client_from(args).get("/v1/vips"), _vips_table)
    return EXIT_OK


def cmd_vip_get(args: argparse.Namespace) -> int:
    """lbctl vip get VIP."""
    emit(args, client_from(args).get(vip_path(args.vip)), _vip_text)
    return EXIT_OK


def cmd_vip_add(args: argparse.Namespace) -> int:
    """lbctl vip add PROTO ADDR:PORT."""
    addr, port = split_hostport(args.address, "address")
    body: dict[str, Any] = {"protocol": args.protocol, "address": addr, "port": port}
    for key in ("hash_src_only", "lru_bypass", "encap", "outer_source"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    _, _, v = client_from(args).request("POST", "/v1/vips", body)
    emit(args, v, lambda v: f"created {v['id']}")
    return EXIT_OK


def cmd_vip_set(args: argparse.Namespace) -> int:
    """lbctl vip set VIP [--encap ...] [--hash-src-only|--no-hash-src-only] ..."""
    body = {
        k: getattr(args, k)
        for k in ("hash_src_only", "lru_bypass", "encap", "outer_source")
        if getattr(args, k) is not None
    }
    if not body:
        raise CliError("nothing to change: give --encap, --outer-source or a flag", EXIT_USAGE)
    _, _, v = client_from(args).request("PATCH", vip_path(args.vip), body)
    emit(args, v, _vip_text)
    return EXIT_OK


def cmd_vip_rm(args: argparse.Namespace) -> int:
    """lbctl vip rm VIP."""
    client_from(args).request("DELETE", vip_path(args.vip))
    emit(args, {"deleted": args.vip}, lambda d: f"deleted {d['deleted']}")
    return EXIT_OK


def cmd_backend_list(args: argparse.Namespace) -> int:
    """lbctl backend list VIP."""
    emit(args, client_from(args).get(vip_path(args.vip) + "/backends"), _backends_table)
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
    path = vip_path(args.vip) + "/backends/" + quote(args.address, safe=":")
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
    path = vip_path(args.vip) + "/backends/" + quote(args.address, safe=":")
    client_from(args).request("DELETE", path)
    emit(
        args,
        {"removed": args.address, "vip": args.vip},
        lambda d: f"removed {d['removed']} from {d['vip']}",
    )
    return EXIT_OK


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


def cmd_explain(args: argparse.Namespace) -> int:
    """lbctl explain PROTO SRC:PORT DST:PORT."""
    src, sport = split_hostport(args.source, "source")
    dst, dport = split_hostport(args.destination, "destination")
    query = {"protocol": args.protocol, "src": src, "sport": sport, "dst": dst, "dport": dport}
    emit(args, client_from(args).get("/v1/explain", query=query), _explain_text)
    return EXIT_OK


def _load_state_file(path: str) -> Any:
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e}", EXIT_USAGE) from None
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise CliError(f"{path} is not valid YAML/JSON: {e}", EXIT_USAGE) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a mapping with a 'vips' list", EXIT_USAGE)
    return data


def cmd_apply(args: argparse.Namespace) -> int:
    """lbctl apply -f FILE [--dry-run] [--if-generation N]."""
    body = _load_state_file(args.file)
    body.pop("generation", None)
    headers = {"If-Match": f'"{args.if_generation}"'} if args.if_generation is not None else None
    query = {"dry_run": "true"} if args.dry_run else None
    _, _, plan = client_from(args).request("PUT", "/v1/state", body, query=query, headers=headers)
    emit(args, plan, _plan_text)
    return EXIT_OK


def cmd_get_state(args: argparse.Namespace) -> int:
    """lbctl get state [-o yaml|json]."""
    import yaml

    data = client_from(args).get("/v1/state")
    if args.output == "table":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        emit(args, data, str)
    return EXIT_OK


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
    app = create_app(settings=settings, lb_settings=lb_settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
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


# `lbctl lab` and `lbctl doctor` own their options: their modules parse the rest.
_DELEGATES = {"lab": "lb.lab.network", "doctor": "lb.ops.doctor"}


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise CliError(f"{module} is not part of this installation", EXIT_USAGE) from None
    main = getattr(mod, "main", None)
    if main is None:
        raise CliError(f"{module} has no main(argv)", EXIT_USAGE)
    rc = main(argv)
    return int(rc or 0)


# --- parser ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise CliError(f"{self.prog}: {message}", EXIT_USAGE)


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
    p = _Parser(prog="lbctl", description="Operate an xlb load balancer through its REST API.")
    p.set_defaults(url=None, token=None, token_file=None, cacert=None, output="table")
    for a in common._actions:
        if a.option_strings:
            p._add_action(a)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def leaf(parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> Any:
        sp = parent.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    vip = sub.add_parser("vip", help="VIPs").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    leaf(vip, "list", cmd_vip_list, "list VIPs")
    leaf(vip, "get", cmd_vip_get, "show one VIP").add_argument("vip", help="tcp:198.18.0.10:80")
    sp = leaf(vip, "add", cmd_vip_add, "create a VIP")
    sp.add_argument("protocol", choices=["tcp", "udp"])
    sp.add_argument("address", help="ADDRESS:PORT, IPv6 as [ADDRESS]:PORT; port 0 = every port")
    _vip_flags(sp)
    sp = leaf(vip, "set", cmd_vip_set, "change a VIP's flags or encapsulation")
    sp.add_argument("vip")
    _vip_flags(sp)
    leaf(vip, "rm", cmd_vip_rm, "delete a VIP").add_argument("vip")

    be = sub.add_parser("backend", help="backends of a VIP").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    leaf(be, "list", cmd_backend_list, "list a VIP's backends").add_argument("vip")
    sp = leaf(be, "add", cmd_backend_add, "add a backend to a VIP")
    sp.add_argument("vip")
    sp.add_argument("address")
    sp.add_argument("--weight", type=int, default=1)
    sp.add_argument("--state", choices=["active", "draining", "disabled"])
    sp = leaf(be, "set", cmd_backend_set, "change a backend's weight or state")
    sp.add_argument("vip")
    sp.add_argument("address")
    sp.add_argument("--weight", type=int)
    sp.add_argument("--state", choices=["active", "draining", "disabled"])
    for name, fn, text in (
        ("drain", cmd_backend_drain, "no new flows to a backend; its tracked flows go on"),
        ("enable", cmd_backend_enable, "make a drained or disabled backend active again"),
        ("rm", cmd_backend_rm, "remove a backend from a VIP"),
    ):
        sp = leaf(be, name, fn, text)
        sp.add_argument("vip")
        sp.add_argument("address")
        if name == "drain":
            from lbctl.health import add_drain_flags

            add_drain_flags(sp)

    from lbctl.health import add_health_commands

    add_health_commands(sub, leaf)

    sp = leaf(sub, "stats", cmd_stats, "counters and rates")
    sp.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS")
    sp.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    sp.add_argument("--per-cpu", action="store_true")

    sp = leaf(sub, "explain", cmd_explain, "which backend a flow goes to, and why")
    sp.add_argument("protocol", choices=["tcp", "udp"])
    sp.add_argument("source", help="client ADDRESS:PORT")
    sp.add_argument("destination", help="VIP ADDRESS:PORT")

    sp = leaf(sub, "apply", cmd_apply, "replace the whole state from a YAML/JSON file")
    sp.add_argument("-f", "--file", required=True, help="state file ('-' = stdin)")
    sp.add_argument("--dry-run", action="store_true", help="only show the plan")
    sp.add_argument(
        "--if-generation", type=int, help="refuse unless the state is at this generation"
    )

    get = sub.add_parser("get", help="read a resource").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    leaf(get, "state", cmd_get_state, "the whole state (YAML by default)")

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

    # Listed for --help; main() hands their arguments to lb.lab.network / lb.ops.doctor untouched.
    sub.add_parser("lab", help="the network lab: up|down|status (lb.lab)", add_help=False)
    sub.add_parser("doctor", help="check this host or a lab (lb.doctor)", add_help=False)
    return p


def _vip_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--encap", choices=["ipip", "gue"])
    sp.add_argument("--outer-source", choices=["rss", "lb"])
    sp.add_argument("--hash-src-only", action=argparse.BooleanOptionalAction, default=None)
    sp.add_argument("--lru-bypass", action=argparse.BooleanOptionalAction, default=None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lbctl`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # The lab and the doctor own their options (and their --help).
        if argv and argv[0] in ("lab", "doctor"):
            return _delegate(_DELEGATES[argv[0]], argv[1:])
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
