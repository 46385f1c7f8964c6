"""`lbctl doctor` on a host: with the balancer attached (native XDP) to a veth in a namespace
of the test's own and one VIP seeded in its maps, traffic that the data plane drops
(fragments to the VIP) and frames the driver drops (XDP_TX out of a veth whose peer has no
XDP program) fail the LB hop with the counter that grew; a quiet interface passes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from lb.dataplane import netlink, netns
from lb.dataplane.host import Host, open_host
from lb.ops import doctor
from lb.settings import load_settings
from lbctl import doctor as doctor_cli
from tests.kernel import flows

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

LB_IF, PEER_IF = "xd0", "xd1"
PEER_MAC = flows.CLIENT_MAC
T = TypeVar("T")


@dataclass
class Attached:
    """The namespace, the config file the doctor reads, and the running data plane."""

    ns: str
    config: Path
    host: Host

    def send(self, frame: bytes, count: int, stop: threading.Event) -> None:
        """Send `frame` from the peer up to `count` times, until `stop` is set."""
        from scapy.sendrecv import sendp

        def body() -> None:
            for _ in range(count):
                if stop.is_set():
                    return
                sendp(frame, iface=PEER_IF, verbose=False)
                stop.wait(0.01)

        netns.call_in(self.ns, body)


@pytest.fixture(scope="module")
def attached(tmp_path_factory: pytest.TempPathFactory, test_prefix: str) -> Iterator[Attached]:
    """The balancer attached natively to xd0 (peer xd1 without XDP) with flows' VIP seeded."""
    import shutil
    import subprocess

    ns = f"{test_prefix}-doc"
    pins = Path(f"/sys/fs/bpf/{test_prefix}_doctor")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        netns.run(ns, ["ip", "link", "add", LB_IF, "type", "veth", "peer", "name", PEER_IF,
                       "address", PEER_MAC])
        for dev in (LB_IF, PEER_IF):
            netns.run(ns, ["ip", "link", "set", dev, "up"])
        base = tmp_path_factory.mktemp("doctor")
        config = flows.write_config(base / "xlb.toml", pins, base / "state")
        config.write_text(f'interface = "{LB_IF}"\nnetns = "{ns}"\nxdp_mode = "native"\n'
                          + config.read_text())
        with open_host(load_settings(config)) as host:
            flows.seed(host.balancer)
            yield Attached(ns, config, host)
            host.detach()
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(pins, ignore_errors=True)


def _fragment(lb_mac: str) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(Ether(src=PEER_MAC, dst=lb_mac)
                 / IP(src=str(flows.CLIENT), dst=str(flows.VIP), flags="MF")
                 / UDP(sport=4000, dport=flows.DPORT) / (b"x" * 32))


def _doctor_under(a: Attached, frame: bytes | None, run: Callable[[], T]) -> T:
    """The doctor's report while the peer keeps sending `frame` (bounded)."""
    stop = threading.Event()
    sender = None
    if frame is not None:
        sender = threading.Thread(target=a.send, args=(frame, 500, stop), daemon=True)
        sender.start()
    try:
        return run()
    finally:
        stop.set()
        if sender is not None:
            sender.join(10)


def _failed(report: doctor.Report) -> dict[str, str]:
    return {f.check: f.hop for f in report.failed}


def test_a_quiet_interface_has_no_drops(attached: Attached) -> None:
    report = doctor.check_host(str(attached.config), interval=0.3)
    counters = [f for f in report.findings if f.check == "drop counters"]
    assert counters and counters[0].status == "ok", report.render()
    assert not [c for c in _failed(report) if c.startswith(("drops", "XDP errors"))]


def test_data_plane_drops_name_the_lb_hop_and_the_reason(attached: Attached) -> None:
    lb_mac = netlink.link_info(attached.ns, LB_IF).mac
    report = _doctor_under(attached, _fragment(lb_mac),
                           lambda: doctor.check_host(str(attached.config), interval=1.0))
    failed = _failed(report)
    assert failed.get("drops STAT_FRAG") == f"LB {LB_IF}", report.render()
    assert f"first failing hop: LB {LB_IF}" in report.render()


def test_driver_xdp_errors_name_the_lb_hop(attached: Attached, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    """The tracked flow's packets are XDP_TXed back out of xd0; xd1 has no XDP program, so
    the veth driver drops them and counts xdp_tx_errors."""
    frame = flows.packet(netlink.link_info(attached.ns, LB_IF).mac)
    code = _doctor_under(attached, frame, lambda: _cli(attached))
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"LB {LB_IF}" in out and "XDP errors (ethtool -S)" in out, out
    assert "xdp_tx_errors" in out, out


def _cli(a: Attached) -> int:
    return doctor_cli.main(["--config", str(a.config), "--interval", "1", "-q"])
