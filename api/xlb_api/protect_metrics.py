"""Prometheus metrics of the protections (docs/protection.md): the SYN-flood guard's mode and
state, and what it, the reply rate limits and the source ranges counted. Registered next to
xlb_api.metrics' collectors; per-VIP `xlb_vip_src_denied_total` comes with the VIP counters."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lb.dataplane.protect import GUARD_MODES
from xlb_api.deps import Runtime


class ProtectCollector(Collector):
    """The guard and the protections' global counters; nothing without a balancer."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Yield the protection metric families."""
        stats = self._rt.stats
        if stats is None or "guard_cfg" not in stats.balancer_maps():
            return
        g = stats.guard()
        mode = GaugeMetricFamily(
            "xlb_syn_guard_mode", "1 for the SYN guard's configured mode", labels=["mode"]
        )
        for name in GUARD_MODES:
            mode.add_metric([name], 1 if g["mode"] == name else 0)
        yield mode
        flood = GaugeMetricFamily(
            "xlb_syn_guard_flood",
            "1 when SYNs follow the ring without a table entry now (always, or a CPU over"
            " the threshold in this guard window or the last)",
        )
        flood.add_metric([], 1 if g["flood"] else 0)
        yield flood
        cpus = GaugeMetricFamily("xlb_syn_guard_flood_cpus", "CPUs in flood mode now (auto)")
        cpus.add_metric([], len(g["flood_cpus"]))
        yield cpus
        thr = GaugeMetricFamily(
            "xlb_syn_guard_syns_per_window",
            "SYNs per CPU per guard window above which auto enters flood mode",
        )
        thr.add_metric([], g["syn_per_window"])
        yield thr
        glob = {name: sum(v) for name, v in stats.glob().items()}
        for metric, counter, text in (
            ("xlb_syn_guard_flood_windows", "STAT_GUARD_FLOOD",
             "guard windows a CPU spent in flood mode (entries into it, and windows kept)"),
            ("xlb_syn_guard_stateless_syns", "STAT_GUARD_SYN_STATELESS",
             "SYNs sent along the ring without touching the connection table"),
            ("xlb_syn_guard_no_evict", "STAT_GUARD_NO_EVICT",
             "table inserts the guard refused because they would have evicted a live flow"),
            ("xlb_src_denied", "STAT_SRC_DENIED",
             "packets dropped by a VIP's source ranges (every VIP)"),
        ):
            fam = CounterMetricFamily(metric, text)
            fam.add_metric([], glob.get(counter, 0))
            yield fam
        limited = CounterMetricFamily(
            "xlb_reply_rate_limited",
            "replies the LB did not send because their token bucket was empty",
            labels=["reply"],
        )
        limited.add_metric(["echo"], glob.get("STAT_ICMP_ECHO_LIMITED", 0))
        limited.add_metric(["too_big"], glob.get("STAT_TOO_BIG_LIMITED", 0))
        yield limited
