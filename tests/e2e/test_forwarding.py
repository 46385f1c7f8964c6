"""Real connections through the VIP: client -> router -> LB (XDP) -> backend (decap) -> client.

Thousands of new TCP (HTTP) connections and UDP exchanges per case, through an IPv4 and an
IPv6 VIP, with the LB's program attached in native and in generic XDP mode; the backends
answer with their names, so the client counts where each flow landed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from lb.dataplane import netlink
from lb.lab import network as labmod
from lb.lab.network import Lab, LabApi
from tests.e2e.conftest import Vips, daemon_running, ensure_daemon

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

CONNECTIONS = 2000
TOLERANCE = 0.15
WEIGHTS = (1, 2, 1)


@pytest.fixture(
    scope="module", params=["native", pytest.param("generic", marks=pytest.mark.slow)]
)
def api(request: pytest.FixtureRequest, lab: Lab, lab_daemon: LabApi) -> Iterator[LabApi]:
    """The daemon, with the balancer attached in the mode of the parameter."""
    if request.param == "native":
        ensure_daemon(lab)
        assert netlink.link_info(lab.lb_ns, labmod.LB_IF).xdp_mode == "native"
        yield lab_daemon
        return
    labmod.stop_daemon(lab)
    try:
        with daemon_running(dataclasses.replace(lab, xdp_mode="generic")) as client:
            assert netlink.link_info(lab.lb_ns, labmod.LB_IF).xdp_mode == "generic"
            yield client
    finally:
        # Back to the shared native daemon for the modules that follow.
        ensure_daemon(lab)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize(
    ("vip_family", "backend_family", "encap"),
    [(4, 4, "ipip"), (6, 6, "ipip"), (4, 6, "ipip"), (4, 4, "gue"), (6, 6, "gue")],
    ids=["ipv4", "ipv6", "ipv4-in-ipv6", "ipv4-gue", "ipv6-gue"],
)
def test_connections_spread_over_backends_by_weight(
    lab: Lab, vips: Vips, protocol: str, vip_family: int, backend_family: int, encap: str
) -> None:
    """Each backend gets its weight's share of new flows, within 15 %, and none fails."""
    weights = {f"b{i}": WEIGHTS[(i - 1) % len(WEIGHTS)] for i in lab.backend_ids}
    addr = (lab.backend4 if backend_family == 4 else lab.backend6)
    vip = lab.vip4 if vip_family == 4 else lab.vip6
    port = labmod.HTTP_PORT if protocol == "tcp" else labmod.UDP_PORT
    vips.create(protocol, vip, port, [(addr(i), weights[f"b{i}"]) for i in lab.backend_ids],
                encap=encap)

    if protocol == "tcp":
        tally = labmod.http_requests(lab, vip, CONNECTIONS)
    else:
        tally = labmod.udp_requests(lab, vip, CONNECTIONS)

    assert not tally.failures, f"connections failed: {dict(tally.failures)}"
    assert tally.total == CONNECTIONS
    total_weight = sum(weights.values())
    for name, w in weights.items():
        share = CONNECTIONS * w / total_weight
        got = tally.per_backend.get(name, 0)
        assert abs(got - share) <= TOLERANCE * share, (
            f"{name} (weight {w}) got {got} of {CONNECTIONS} flows, expected {share:.0f}"
            f" +/- {TOLERANCE:.0%}: {dict(tally.per_backend)}"
        )


def test_counters_follow_the_traffic(lab: Lab, vips: Vips, api: LabApi) -> None:
    """The LB's per-backend counters see the packets of every backend that answered."""
    vips.create("tcp", lab.vip4, labmod.HTTP_PORT,
                [(lab.backend4(i), 1) for i in lab.backend_ids])
    tally = labmod.http_requests(lab, lab.vip4, 300)
    assert not tally.failures and len(tally.per_backend) == lab.backends
    stats = api.get("/v1/stats")
    text = str(stats)
    for i in lab.backend_ids:
        assert lab.backend4(i) in text, f"no counters for backend {i}: {stats}"


@pytest.mark.slow
def test_xdp_decap_variant_forwards(test_prefix: str) -> None:
    """A lab whose backends decapsulate in XDP instead of tc carries both families."""
    spec = Lab(prefix=f"{test_prefix}y", backends=2, decap="xdp")
    with labmod.running(spec):
        progs = netlink.link_info(spec.backend_ns(1), labmod.BACKEND_IF).xdp_prog_name
        assert progs == "xdp_decap"
        with daemon_running(spec) as client:
            v = Vips(client)
            v.create("tcp", spec.vip4, labmod.HTTP_PORT, [(spec.backend4(1), 1),
                                                          (spec.backend6(2), 1)])
            v.create("udp", spec.vip6, labmod.UDP_PORT, [(spec.backend6(i), 1)
                                                         for i in spec.backend_ids])
            http = labmod.http_requests(spec, spec.vip4, 400)
            udp = labmod.udp_requests(spec, spec.vip6, 400)
    for tally in (http, udp):
        assert not tally.failures, dict(tally.failures)
        assert set(tally.per_backend) == {"b1", "b2"}
