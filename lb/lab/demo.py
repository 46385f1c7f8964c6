"""`make demo`: the whole load balancer, end to end, in a network lab, in under a minute.

It builds the lab (client, router, LB and three backends in namespaces), starts the daemon in
the LB's namespace, creates a VIP and its backends with the REST calls a user would make
(printed as they go), sends real HTTP connections through the VIP, prints where they landed
and the data plane's counters, removes a backend under long-lived connections to show that
the others survive, runs `lbctl doctor`, and tears everything down, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import Counter
from types import FrameType
from typing import Any

from lb.client import vip_path
from lb.lab import network as labmod
from lb.lab.network import Lab, LabApi, Stream

PREFIX = "xlbdemo"
WEIGHTS = {1: 1, 2: 2, 3: 1}
REQUESTS = 3000
STREAMS = 12
STEPS = 7
BAR = 40


class Demo:
    """Progress printing with elapsed time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.step = 0

    def head(self, title: str) -> None:
        """Start the next numbered step."""
        self.step += 1
        print(f"\n[{self.step}/{STEPS}] {title}  ({time.monotonic() - self.t0:4.1f} s)",
              flush=True)

    @staticmethod
    def say(msg: str) -> None:
        """One line of detail."""
        print(f"      {msg}", flush=True)


def _show_call(line: str) -> None:
    # LabApi echoes "METHOD path body" then "  -> status".
    print(f"      {'$ ' if not line.startswith('  ->') else '  '}{line.strip()}", flush=True)


def _bars(d: Demo, lab: Lab, per_backend: Counter[str], weights: dict[int, int]) -> None:
    total = sum(per_backend.values()) or 1
    wsum = sum(weights.values()) or 1
    for i in lab.backend_ids:
        got = per_backend.get(f"b{i}", 0)
        w = weights.get(i, 0)
        share = got / total
        bar = "#" * round(share * BAR)
        d.say(f"b{i} {lab.backend4(i):<12} weight {w}  {bar:<{BAR}} {got:5d}  {share:6.1%}"
              f"  (expected {w / wsum:6.1%})")


def _value(entry: Any) -> int:
    return int(entry.get("value", 0)) if isinstance(entry, dict) else int(entry or 0)


def _counters(d: Demo, lab: Lab, api: LabApi) -> None:
    st = api.get("/v1/stats")
    glob = st.get("global", {})
    shown = ["STAT_XDP_TX", "STAT_LRU_MISS_SYN", "STAT_LRU_HIT", "STAT_XDP_PASS",
             "STAT_PASS_NON_VIP", "STAT_XDP_DROP", "STAT_NO_BACKEND"]
    d.say("data plane (glob_stats): " + ", ".join(
        f"{k.removeprefix('STAT_')} {_value(glob.get(k))}" for k in shown if k in glob))
    for v in st.get("vips", []):
        c = v.get("counters", {})
        d.say(f"VIP {v.get('vip_id')}: {_value(c.get('packets'))} packets, "
              f"{_value(c.get('new_conns'))} new connections")
    for b in st.get("backends", []):
        c = b.get("counters", {})
        i = lab.backend_of(str(b.get("address")))
        d.say(f"backend {b.get('address')} (b{i}): {_value(c.get('packets'))} packets, "
              f"{_value(c.get('bytes'))} bytes encapsulated to it")
    ct = st.get("conn_table")
    if isinstance(ct, dict):
        d.say(f"connection table: {ct.get('entries')} of {ct.get('capacity')} entries")


def run(d: Demo, lab: Lab) -> int:
    """The demo's steps; the caller tears the lab down."""
    d.head(f"network lab '{lab.prefix}': client -> router -> LB (XDP) -> {lab.backends} "
           "backends, direct server return")
    labmod.up(lab, progress=d.say)
    d.say(f"LB on a stick: lb0 {lab.lb4} in {lab.lb_ns}, gateway MAC {lab.gateway_mac} "
          f"(the router), {lab.xdp_mode} XDP")

    d.head("daemon: lbctl serve in the LB namespace (compiles and attaches the data plane)")
    pid = labmod.start_daemon(lab)
    d.say(f"pid {pid}, REST API on {lab.api_socket}")

    d.head("configure with the REST API, as a user would")
    api = LabApi(lab, echo=_show_call)
    vip = api.post("/v1/vips", {"protocol": "tcp", "address": lab.vip4, "port": 80})
    vid = str(vip["id"])
    backends_path = f"{vip_path(vid)}/backends"
    for i in lab.backend_ids:
        api.post(backends_path, {"address": lab.backend4(i), "weight": WEIGHTS.get(i, 1)})
    api.post("/v1/vips", {"protocol": "tcp", "address": lab.vip6, "port": 80,
                          "backends": [{"address": lab.backend6(i)} for i in lab.backend_ids]})
    api.echo = None

    d.head(f"{REQUESTS} HTTP connections to http://{lab.vip4}/ and 600 to "
           f"http://[{lab.vip6}]/ from the client")
    t = time.monotonic()
    tally = labmod.http_requests(lab, lab.vip4, REQUESTS)
    tally6 = labmod.http_requests(lab, lab.vip6, 600)
    secs = time.monotonic() - t
    d.say(f"{tally.total + tally6.total} answered, "
          f"{sum(tally.failures.values()) + sum(tally6.failures.values())} failed "
          f"({(tally.total + tally6.total) / secs:.0f} connections/s); IPv4 VIP, by the name "
          "each backend answered with:")
    _bars(d, lab, tally.per_backend, WEIGHTS)
    d.say(f"IPv6 VIP (equal weights): {dict(sorted(tally6.per_backend.items()))}")
    _counters(d, lab, api)

    d.head(f"remove backend b2 under {STREAMS} long-lived TCP connections")
    api_vid = vid
    stream_vip = api.post("/v1/vips", {
        "protocol": "tcp", "address": lab.vip4, "port": labmod.STREAM_PORT,
        "backends": [{"address": lab.backend4(i)} for i in lab.backend_ids]})
    streams = [Stream(lab, lab.vip4) for _ in range(STREAMS)]
    try:
        by = Counter(s.backend for s in streams)
        d.say(f"connections open: {dict(sorted(by.items()))}, each echoing every 50 ms")
        time.sleep(0.5)
        before = {id(s): s.echoes for s in streams}
        api.echo = _show_call
        api.delete(f"{vip_path(str(stream_vip['id']))}/backends/{lab.backend4(2)}")
        api.delete(f"{backends_path}/{lab.backend4(2)}")
        api.echo = None
        time.sleep(1.5)
        kept = [s for s in streams if s.backend != "b2"]
        ok = [s for s in kept if s.alive and s.echoes > before[id(s)]]
        d.say(f"connections to b1/b3: {len(ok)}/{len(kept)} alive and still echoing "
              f"(+{min((s.echoes - before[id(s)] for s in kept), default=0)} echoes or more "
              "each since the removal)")
        gone = [s for s in streams if s.backend == "b2"]
        if gone:
            d.say(f"connections to b2: {sum(1 for s in gone if not s.alive)}/{len(gone)} ended "
                  "(their backend is gone; PATCH state=draining first lets them finish)")
        after = labmod.http_requests(lab, lab.vip4, 600)
        d.say(f"600 new connections after the removal: {dict(sorted(after.per_backend.items()))}"
              f", {sum(after.failures.values())} failed")
    finally:
        for s in streams:
            s.close()
    del api_vid

    d.head("lbctl doctor --lab: every hop checked, one probe per VIP")
    from lb.lab import doctor

    report = doctor.check_lab(lab)
    counts = Counter(f.status for f in report.findings)
    d.say(f"{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failed")
    for f in report.findings:
        if f.status != "ok":
            d.say(f"{f.status}: {f.hop}: {f.check}: {f.detail}")
    failed = bool(report.failed) or bool(tally.failures) or len(ok) != len(kept)
    return 1 if failed else 0


_MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # pyroute2 forks short-lived helpers (netns sockets) and stops them with SIGTERM: a fork
    # must die quietly, never run the demo's teardown from its copy of our stack.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    p = argparse.ArgumentParser(prog="python -m lb.lab.demo", description=__doc__.splitlines()[0])
    p.add_argument("--xdp-mode", choices=["native", "generic"], default="native")
    p.add_argument("--decap", choices=["tc", "xdp"], default="tc")
    p.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    p.add_argument("--prefix", default=PREFIX, help=f"name prefix of the lab (default {PREFIX})")
    a = p.parse_args(argv)
    prefix = a.prefix
    if os.geteuid() != 0:
        print("the demo needs root (namespaces, BPF, XDP)", file=sys.stderr)
        return 2
    lab = Lab(prefix=prefix, backends=3, xdp_mode=a.xdp_mode, decap=a.decap)
    d = Demo()
    if labmod.lab_namespaces(prefix) or lab.run_dir.exists():
        d.say(f"removing what an earlier demo left behind: {len(labmod.down(prefix))} objects")
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    rc = 1
    try:
        rc = run(d, lab)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        rc = 130
    finally:
        if a.keep and rc == 0:
            print(f"\nlab {prefix} left up: lbctl lab status --prefix {prefix}; "
                  f"lbctl lab down --prefix {prefix}")
        else:
            d.head("tear down: daemon, servers, namespaces, pins")
            # Ctrl-C during teardown must not leave half a lab behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            removed = labmod.down(prefix)
            d.say(f"removed {len(removed)} objects; nothing of the lab is left")
    print(f"\ndemo {'finished' if rc == 0 else 'FAILED' if rc != 130 else 'interrupted'} in "
          f"{time.monotonic() - d.t0:.1f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
