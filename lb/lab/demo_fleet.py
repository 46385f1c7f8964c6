"""`make demo-fleet`: three LB hosts behind an ECMP router, announcing by BGP; one drained
under traffic.

It builds a fleet lab (`lab up --lb-hosts 3`: the router runs BIRD 2 with a session per LB
host), starts a daemon on each host, gives every host the same state, shows the router's
multipath route and each host's share of 900 new connections, then drains one host under 60
long-lived connections (its routes are withdrawn, its flows move to the others and keep their
backends), and tears everything down, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from lb.client import vip_path
from lb.lab import network as labmod
from lb.lab.demo import BAR, Demo, _interrupt
from lb.lab.network import Lab, LabApi
from lb.lab.router import kernel_nexthops

PREFIX = "xlbfleet"
HOSTS = 3
REQUESTS = 900
STREAMS = 60
STEPS = 5


class FleetDemo(Demo):
    """The lab demo's printing, with this demo's step count."""

    def head(self, title: str) -> None:
        """Start the next numbered step."""
        self.step += 1
        print(f"\n[{self.step}/{STEPS}] {title}  ({time.monotonic() - self.t0:4.1f} s)",
              flush=True)


def _new_conns(h: Lab, vid: str) -> int:
    return int(LabApi(h).get(vip_path(vid) + "/stats")["counters"]["new_conns"]["value"])


def _shares(d: Demo, lab: Lab, vid: str, before: list[int]) -> list[int]:
    per = [_new_conns(h, vid) - b for h, b in zip(lab.hosts(), before, strict=True)]
    total = max(1, sum(per))
    for h, n in zip(lab.hosts(), per, strict=True):
        bar = "#" * round(BAR * n / total)
        d.say(f"{h.lb_ns:<14} {h.lb4:<12} {n:5d}  {bar}")
    return per


def _wait(cond: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.05)
    return False


def run(d: Demo, lab: Lab) -> int:
    """The demo's steps; the caller tears the lab down."""
    d.head(f"fleet lab '{lab.prefix}': client -> router (BIRD, ECMP) -> {HOSTS} LB hosts -> "
           f"{lab.backends} backends")
    labmod.up(lab, progress=d.say)
    d.head("a daemon on each LB host (lbctl serve; its BGP speaker: BIRD 2)")
    for h in lab.hosts():
        pid = labmod.start_daemon(h)
        d.say(f"{h.lb_ns}: daemon pid {pid}, API {h.api_socket}")

    d.head("the same state on every host; each announces the VIP once attached and applied")
    bs = [{"address": lab.backend4(i)} for i in lab.backend_ids]
    state = {"vips": [
        {"protocol": "tcp", "address": lab.vip4, "port": 80, "backends": bs},
        {"protocol": "tcp", "address": lab.vip4, "port": labmod.STREAM_PORT, "backends": bs},
    ]}
    for h in lab.hosts():
        LabApi(h).request("PUT", "/v1/state", state)
    _wait(lambda: len(kernel_nexthops(lab.router_ns, lab.vip4)) == HOSTS)
    d.say(f"router: {lab.vip4} via {', '.join(kernel_nexthops(lab.router_ns, lab.vip4))}")
    vid = f"tcp:{lab.vip4}:80"
    fps = {LabApi(h).get(vip_path(vid))["ring_fingerprint"][:16] for h in lab.hosts()}
    d.say(f"ring fingerprint of {vid} on the {HOSTS} hosts: {', '.join(sorted(fps))}"
          f" ({'they agree' if len(fps) == 1 else 'THEY DIFFER'})")

    d.head(f"{REQUESTS} new HTTP connections: each host's share (new connections it balanced)")
    before = [_new_conns(h, vid) for h in lab.hosts()]
    tally = labmod.http_requests(lab, lab.vip4, REQUESTS)
    d.say(f"{tally.total} answered, {sum(tally.failures.values())} failed; per backend "
          f"{dict(sorted(tally.per_backend.items()))}")
    _shares(d, lab, vid, before)

    victim = lab.host(2)
    d.head(f"drain {victim.lb_ns} under {STREAMS} long-lived connections (lbctl host drain)")
    streams = labmod.open_streams(lab, lab.vip4, STREAMS)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        LabApi(victim).post("/v1/host/drain", {})
        _wait(lambda: victim.lb4 not in kernel_nexthops(lab.router_ns, lab.vip4))
        d.say(f"router dropped {victim.lb4} after {time.monotonic() - t0:.2f} s: "
              f"{lab.vip4} via {', '.join(kernel_nexthops(lab.router_ns, lab.vip4))}")
        echoes = [s.echoes for s in streams]
        time.sleep(2.0)
        alive = sum(1 for s, e in zip(streams, echoes, strict=True) if s.alive and s.echoes > e)
        d.say(f"long-lived connections still echoing: {alive}/{STREAMS} (broken: "
              f"{STREAMS - alive})")
        before = [_new_conns(h, vid) for h in lab.hosts()]
        after = labmod.http_requests(lab, lab.vip4, 300)
        d.say(f"300 new connections, {sum(after.failures.values())} failed:")
        per = _shares(d, lab, vid, before)
    finally:
        for s in streams:
            s.close()
    LabApi(victim).post("/v1/host/undrain", {})
    _wait(lambda: len(kernel_nexthops(lab.router_ns, lab.vip4)) == HOSTS)
    d.say(f"undrained: {lab.vip4} via {', '.join(kernel_nexthops(lab.router_ns, lab.vip4))}")
    ok = not tally.failures and alive == STREAMS and per[1] == 0 and not after.failures
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run the fleet demo; returns the process exit code."""
    p = argparse.ArgumentParser(prog="python -m lb.lab.demo_fleet",
                                description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    p.add_argument("--prefix", default=PREFIX, help=f"name prefix of the lab (default {PREFIX})")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (namespaces, BPF, XDP)", file=sys.stderr)
        return 2
    lab = Lab(prefix=a.prefix, backends=3, lb_hosts=HOSTS)
    d = FleetDemo()
    if labmod.lab_namespaces(a.prefix) or lab.run_dir.exists():
        d.say(f"removing what an earlier demo left behind: {len(labmod.down(a.prefix))} objects")
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
            print(f"\nlab {a.prefix} left up: lbctl lab down --prefix {a.prefix}", flush=True)
        else:
            labmod.down(a.prefix)
    print(f"\nfleet demo finished ({'ok' if rc == 0 else 'FAILED'}, "
          f"{time.monotonic() - d.t0:.0f} s)", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
