"""`lbctl doctor` on a lab: silent on a healthy one, names the hop when one thing is broken.

Each test breaks exactly one thing the way operators do by accident, asserts that the doctor
fails at that hop (both the configuration check and the probe through the VIP), and repairs
it, so the next test starts from a healthy lab.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lb.dataplane import netlink, netns
from lb.dataplane.loader import prog_fd_by_id
from lb.lab import network as labmod
from lb.lab.doctor import check_lab
from lb.lab.network import Lab, LabApi
from lb.ops import doctor
from lbctl import doctor as doctor_cli
from tests.e2e.conftest import Vips, ensure_daemon

pytestmark = [pytest.mark.netns, pytest.mark.bpf]


@pytest.fixture(scope="module")
def api(lab: Lab, lab_daemon: LabApi) -> Iterator[LabApi]:
    """The daemon with a TCP IPv4 VIP and a UDP IPv6 VIP over every backend."""
    ensure_daemon(lab)
    v = Vips(lab_daemon)
    v.create("tcp", lab.vip4, labmod.HTTP_PORT, [(lab.backend4(i), 1) for i in lab.backend_ids])
    v.create("udp", lab.vip6, labmod.UDP_PORT, [(lab.backend6(i), 1) for i in lab.backend_ids])
    try:
        yield lab_daemon
    finally:
        v.cleanup()


def _failures(report: doctor.Report) -> set[tuple[str, str]]:
    return {(f.hop, f.check.split(" ")[0]) for f in report.failed}


def test_healthy_lab_has_no_failure(lab: Lab, api: LabApi) -> None:
    """Every check passes and every probe is answered on a lab as `lab up` builds it."""
    report = check_lab(lab)
    assert not report.failed, report.render(verbose=False)
    probes = [f for f in report.findings if f.hop.startswith("probe ")]
    assert len(probes) == 2 and all(f.status == "ok" for f in probes)


def test_names_the_veth_peer_without_xdp(lab: Lab, api: LabApi) -> None:
    """Without a program on rt-lb, native XDP_TX frames vanish: doctor names that link."""
    netlink.xdp_detach(lab.router_ns, labmod.RT_LB_IF)
    try:
        report = check_lab(lab)
    finally:
        netlink.attach_xdp_pass(lab.router_ns, labmod.RT_LB_IF)
    failed = _failures(report)
    assert ("router rt-lb", "XDP") in failed, report.render(verbose=False)
    assert ("LB -> router rt-lb", "probe") in failed, report.render(verbose=False)
    assert report.failed[0].hop == "router rt-lb"


def test_names_checksum_offload_on_the_client(lab: Lab, api: LabApi) -> None:
    """tx checksumming on the client: backends drop the packets; doctor names the client."""
    netns.set_offload(lab.client_ns, labmod.CLIENT_IF, "tx", on=True)
    try:
        report = check_lab(lab)
    finally:
        netns.set_offload(lab.client_ns, labmod.CLIENT_IF, "tx", on=False)
    failed = _failures(report)
    assert ("client cl0", "checksum") in failed, report.render(verbose=False)
    assert any(hop.startswith("backend b") and what == "probe" for hop, what in failed), \
        report.render(verbose=False)
    assert "bad checksums" in " ".join(f.detail for f in report.failed)


def test_names_the_backend_without_decap(lab: Lab, api: LabApi) -> None:
    """One backend loses its decap program: doctor names that backend, not the LB."""
    b1 = netlink.tc_ingress_progs(lab.backend_ns(1), labmod.BACKEND_IF)
    netlink.tc_detach(lab.backend_ns(2), labmod.BACKEND_IF)
    try:
        report = check_lab(lab)
    finally:
        fd = prog_fd_by_id(b1[0][0])
        try:
            netlink.tc_attach_ingress(lab.backend_ns(2), labmod.BACKEND_IF, fd, "tc_decap")
        finally:
            os.close(fd)
    failed = _failures(report)
    assert ("backend b2", "decapsulation") in failed, report.render(verbose=False)
    assert ("backend b2", "probe") in failed, report.render(verbose=False)
    assert not any(hop.startswith("LB") for hop, _ in failed)


def test_names_the_router_that_does_not_send_the_vip_to_the_lb(
    lab: Lab, api: LabApi, vip_route_restored: None
) -> None:
    """A VIP route pointing elsewhere is named at the router."""
    netlink.replace_route(lab.router_ns, labmod.VIP_NET6, lab.backend6(1))
    report = check_lab(lab, probe=False)
    assert ("router", "VIP") in _failures(report), report.render(verbose=False)


def test_cli_exit_status(lab: Lab, api: LabApi, capsys: pytest.CaptureFixture[str]) -> None:
    """`lbctl doctor --lab PREFIX` exits 0 on a healthy lab and prints the summary."""
    assert doctor_cli.main(["--lab", lab.prefix, "--no-probe", "-q"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_host_check_reads_the_daemons_settings(lab: Lab, api: LabApi) -> None:
    """The host mode (settings file + namespace) finds the attached balancer and the MTU."""
    report = doctor.check_host(str(lab.config_file), lab.lb_ns)
    assert not report.failed, report.render(verbose=False)
    checks = {(f.check, f.status) for f in report.findings}
    assert ("XDP program", "ok") in checks and ("MTU", "ok") in checks


def test_backend_check_names_a_vip_missing_from_lo(lab: Lab, api: LabApi) -> None:
    """The backend mode finds the decap program and names a VIP the backend does not hold."""
    report = doctor.check_backend_host([lab.vip4, "198.18.0.99"], None, lab.backend_ns(1),
                                       lab.decap_pin_dir)
    failed = [(f.check, f.detail) for f in report.failed]
    assert len(failed) == 1 and failed[0][0] == "VIP on lo" and "198.18.0.99" in failed[0][1]
    assert ("decapsulation", "ok") in {(f.check, f.status) for f in report.findings}
