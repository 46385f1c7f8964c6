"""Prometheus metrics of the host in a fleet: ring fingerprints, BGP announcement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from lb.errors import XlbError
from xlb_api.deps import Runtime


class FleetCollector(Collector):
    """Session up/down and routes per peer, routes announced, drain flag; nothing if BGP off."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        """Yield the ring fingerprints and the BGP metric families."""
        control = self._rt.control
        ring = InfoMetricFamily(
            "xlb_vip_ring", "fingerprint of a VIP's ring slots (equal on hosts that agree)",
            labels=["vip"],
        )
        for v in control.list_vips():
            with contextlib.suppress(XlbError):  # deleted meanwhile
                ring.add_metric([v.id], {"fingerprint": control.ring_fingerprint(v.id)})
        yield ring
        ann = self._rt.announcer
        if ann is None:
            return
        st = ann.status()
        sp = st.speaker
        up = GaugeMetricFamily("xlb_bgp_session_up", "1 when the BGP session is established",
                               labels=["peer"])
        exp = GaugeMetricFamily("xlb_bgp_routes_exported", "VIP routes announced to a peer",
                                labels=["peer"])
        for p in sp.peers if sp else []:
            up.add_metric([p.address], 1 if p.up else 0)
            exp.add_metric([p.address], p.routes_exported)
        yield up
        yield exp
        ann_g = GaugeMetricFamily("xlb_bgp_routes_announced",
                                  "VIP addresses the speaker is configured to announce")
        ann_g.add_metric([], len(sp.routes) if sp and sp.running else 0)
        yield ann_g
        run = GaugeMetricFamily("xlb_bgp_speaker_running", "1 when the BGP speaker (BIRD) runs")
        run.add_metric([], 1 if sp and sp.running else 0)
        yield run
        dr = GaugeMetricFamily("xlb_host_drained", "1 when the operator drained this host")
        dr.add_metric([], 1 if st.drained else 0)
        yield dr
