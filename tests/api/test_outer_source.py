"""`outer_source: lb` with no LB source configured (issue 14, item 7), on a real daemon: the
source is taken from the interface's address and shown, a family the interface has no address
of is refused naming the setting, and nothing leaves from 0.0.0.0.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from tests.api.test_daemon import IFACE, Daemon, _free_port, daemon_env, lbctl  # noqa: F401

pytestmark = [pytest.mark.bpf, pytest.mark.netns]


def test_outer_source_lb_takes_the_interface_address_and_refuses_a_missing_family(
    daemon_env: dict[str, str],  # noqa: F811
) -> None:
    env = daemon_env
    ns = env["XLB_NETNS"]
    subprocess.run(["ip", "-n", ns, "addr", "add", "198.18.0.1/24", "dev", IFACE], check=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    d = Daemon(env, "--port", str(port))
    try:
        d.wait_ready(url)
        log = d.log.read_text()
        assert f"IPv4 source 198.18.0.1, taken from {IFACE}" in log, log
        assert "no IPv6 source (runtime.src_v6 unset" in log, log
        cli = env | {"XLB_URL": url}
        p = lbctl(cli, "vip", "add", "udp", "198.18.0.10:53", "--encap", "gue")
        assert p.returncode == 0, p.stderr
        p = lbctl(cli, "backend", "add", "udp:198.18.0.10:53", "198.18.1.2")
        assert p.returncode == 0, p.stderr
        p = lbctl(cli, "backend", "add", "udp:198.18.0.10:53", "2001:db8:1::2")
        assert p.returncode == 1, p.stderr
        assert "runtime.src_v6 is not set" in p.stderr and "XLB_RUNTIME__SRC_V6" in p.stderr
        # What the live program does with a packet of the VIP: GUE from the interface's address.
        p = lbctl(cli, "-o", "json", "explain", "udp", "198.18.2.1:40000", "198.18.0.10:53")
        assert p.returncode == 0, p.stderr
        e = json.loads(p.stdout)
        assert e["encap"] == "gue" and e["backend"] == "198.18.1.2", e
        assert e["outer_source"] == "198.18.0.1", e
    finally:
        assert d.stop() in (0, -signal.SIGTERM), d.log.read_text()
