"""Prometheus metrics of the health checker (registered next to api.metrics')."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from xlb_api.deps import Runtime


class HealthCollector(Collector):
    """Per-pair health, transitions, safety-floor state; nothing when health is off."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Yield the health metric families."""
        hm = self._rt.health
        if hm is None:
            return
        snap = hm.snapshot()
        labels = ["vip", "backend"]
        up = GaugeMetricFamily(
            "xlb_health_up", "1 when the backend passes its check", labels=labels
        )
        ring = GaugeMetricFamily(
            "xlb_health_in_ring", "1 when health leaves the backend in the ring", labels=labels
        )
        trans = CounterMetricFamily(
            "xlb_health_transitions", "health transitions by direction",
            labels=[*labels, "to"],
        )
        probes = CounterMetricFamily("xlb_health_probes", "probes run", labels=labels)
        held = GaugeMetricFamily(
            "xlb_health_floor_held", "down backends the safety floor keeps in", labels=["vip"]
        )
        alldown = GaugeMetricFamily(
            "xlb_health_all_down", "1 when every backend of the VIP fails", labels=["vip"]
        )
        for v in snap["vips"]:
            vid = v["vip_id"]
            held.add_metric([vid], len(v["held"]))
            alldown.add_metric([vid], 1 if v["all_down"] else 0)
            for b in v["backends"]:
                key = [vid, b["address"]]
                up.add_metric(key, 1 if b["status"] == "up" else 0)
                ring.add_metric(key, 1 if b["in_ring"] else 0)
                probes.add_metric(key, b["probes"])
                for to, n in b["transitions"].items():
                    trans.add_metric([*key, to], n)
        events = CounterMetricFamily(
            "xlb_health_events", "health events by kind since start", labels=["kind"]
        )
        for kind, n in sorted(snap["totals"].items()):
            events.add_metric([kind], n)
        yield from (up, ring, trans, probes, held, alldown, events)
        tunnel = snap.get("tunnel")
        if tunnel is not None and tunnel["state"] != "unused":
            ready = GaugeMetricFamily(
                "xlb_health_tunnel_ready",
                "1 when tunnel-mode probes can be encapsulated (0: loading or failed)",
            )
            ready.add_metric([], 1 if tunnel["state"] == "ready" else 0)
            failed = GaugeMetricFamily(
                "xlb_health_tunnel_failed_attempts",
                "failed loads of the tunnel program since the last success",
            )
            failed.add_metric([], tunnel["failed_attempts"])
            yield from (ready, failed)
