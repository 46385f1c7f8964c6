"""Prometheus exposition of every counter, read from the maps at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from lb.timing import Histogram
from xlb_api.deps import Runtime
from xlb_api.fleet_metrics import FleetCollector
from xlb_api.health_metrics import HealthCollector
from xlb_api.protect_metrics import ProtectCollector
from xlb_api.timing_metrics import TimingCollector


class XlbCollector(Collector):
    """Collects the data plane's counters and the control plane's state on every scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | InfoMetricFamily]:
        """Yield every metric family."""
        rt = self._rt
        control = rt.control
        gen = GaugeMetricFamily("xlb_state_generation", "generation of the stored state")
        gen.add_metric([], control.generation)
        yield gen
        errs = CounterMetricFamily(
            "xlb_reconcile_errors", "stored changes that failed to reach the maps"
        )
        errs.add_metric([], control.reconcile_errors)
        yield errs
        report = control.drift_report
        drift = GaugeMetricFamily(
            "xlb_drift_entries",
            "map entries the last verify found differing from the stored state, not repaired",
        )
        drift.add_metric([], len(report.outstanding) if report is not None else 0)
        yield drift
        checks = CounterMetricFamily("xlb_verify_runs", "comparisons of the maps with the state")
        checks.add_metric([], control.drift_checks)
        yield checks
        fixed = CounterMetricFamily(
            "xlb_drift_repaired_entries", "map entries rewritten because they had drifted"
        )
        fixed.add_metric([], control.drift_repaired_entries)
        yield fixed
        if report is not None:
            at = GaugeMetricFamily(
                "xlb_verify_last_timestamp_seconds", "Unix time of the last verify"
            )
            at.add_metric([], report.checked_at)
            yield at
        vips = control.list_vips()
        nv = GaugeMetricFamily("xlb_vips", "VIPs in the desired state")
        nv.add_metric([], len(vips))
        yield nv
        nb = GaugeMetricFamily(
            "xlb_backends", "backends in the desired state by state", labels=["state"]
        )
        by_state = {"active": 0, "draining": 0, "disabled": 0}
        for v in vips:
            for b in v.backends:
                by_state[b.state] = by_state.get(b.state, 0) + 1
        for state, n in by_state.items():
            nb.add_metric([state], n)
        yield nb
        attached, where = rt.attachment()
        mode = rt.attach_mode() or "none"
        att = GaugeMetricFamily(
            "xlb_attached", "1 when the XDP program is attached", labels=["mode"]
        )
        att.add_metric([mode], 1 if attached else 0)
        yield att
        info = InfoMetricFamily(
            "xlb_attach", "where and how the XDP program is attached, and why that mode"
        )
        info.add_metric([], {"mode": mode, "where": where, "reason": rt.attach_reason() or ""})
        yield info
        if rt.stats is None:
            return
        snap = rt.stats.snapshot()
        g = CounterMetricFamily(
            "xlb_datapath",
            "global data-plane counters by C name (enum glob_stat)",
            labels=["counter"],
        )
        for name, per_cpu in snap.glob.items():
            g.add_metric([name], sum(per_cpu))
        yield g
        vip_fams: dict[str, CounterMetricFamily] = {}
        for vid, counters in sorted(snap.vips.items()):
            for field, per_cpu in counters.items():
                fam = vip_fams.get(field)
                if fam is None:
                    fam = vip_fams[field] = CounterMetricFamily(
                        f"xlb_vip_{_metric_name(field)}", f"{field} of a VIP", labels=["vip"]
                    )
                fam.add_metric([vid], sum(per_cpu))
        yield from vip_fams.values()
        real_fams: dict[str, CounterMetricFamily] = {}
        for addr, counters in sorted(snap.reals.items()):
            for field, per_cpu in counters.items():
                fam = real_fams.get(field)
                if fam is None:
                    fam = real_fams[field] = CounterMetricFamily(
                        f"xlb_backend_{_metric_name(field)}",
                        f"{field} of a backend (over every VIP it serves)",
                        labels=["backend"],
                    )
                fam.add_metric([addr], sum(per_cpu))
        yield from real_fams.values()
        pair_fams: dict[str, CounterMetricFamily] = {}
        for vid, by_addr in sorted(snap.pairs.items()):
            for addr, counters in sorted(by_addr.items()):
                for field, per_cpu in counters.items():
                    fam = pair_fams.get(field)
                    if fam is None:
                        fam = pair_fams[field] = CounterMetricFamily(
                            f"xlb_vip_backend_{_metric_name(field)}",
                            f"{field} one VIP sent to one backend",
                            labels=["vip", "backend"],
                        )
                    fam.add_metric([vid, addr], sum(per_cpu))
        yield from pair_fams.values()
        ct = GaugeMetricFamily(
            "xlb_conn_table_entries",
            "live flows in the connection table: not expired, not closed (a snapshot count)",
        )
        ct.add_metric([], rt.stats.conn_table_count())
        yield ct
        used = GaugeMetricFamily(
            "xlb_conn_table_slots_used",
            "connection-table slots holding an entry, live or reusable (a snapshot count)",
        )
        used.add_metric([], rt.stats.conn_table_used())
        yield used
        cap = GaugeMetricFamily(
            "xlb_conn_table_capacity", "connection-table slots (sets x 8 ways)"
        )
        cap.add_metric([], rt.stats.conn_table_capacity)
        yield cap


def _metric_name(field: str) -> str:
    return {"new_conns": "new_connections"}.get(field, field)


def make_registry(runtime: Runtime, requests: Histogram | None = None) -> CollectorRegistry:
    """A registry of this daemon's metrics (one per app, never the global one).

    `requests`: the app's REST request histogram (xlb_api.timing_metrics.RequestTimer).
    """
    reg = CollectorRegistry(auto_describe=False)
    reg.register(XlbCollector(runtime))
    reg.register(HealthCollector(runtime))
    reg.register(FleetCollector(runtime))
    reg.register(TimingCollector(runtime, requests))
    reg.register(ProtectCollector(runtime))
    return reg
