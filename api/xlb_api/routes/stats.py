"""Statistics: every counter, per VIP, per backend and global, with rates."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from lb.consts import GUARD_WINDOW_SHIFT
from lb.errors import NotFound
from lb.ops.stats import PerCpu, Snapshot
from xlb_api.deps import ControlDep, ReadAuth, RuntimeDep, StatsDep
from xlb_api.problems import problem_responses
from xlb_api.schemas.common import VipIdPath
from xlb_api.schemas.stats import (
    BackendStatsPublic,
    ConnTablePublic,
    CounterPublic,
    ProtectionPublic,
    StatsPublic,
    VipStatsPublic,
)

router = APIRouter(tags=["stats"], responses=problem_responses(401, 422, 503))

PerCpuQuery = Annotated[bool, Query(description="include one value per CPU")]


def _counters(
    prefix: str, values: dict[str, PerCpu], rates: dict[str, float], per_cpu: bool
) -> dict[str, CounterPublic]:
    return {
        name: CounterPublic(
            value=sum(v),
            per_s=rates.get(f"{prefix}/{name}"),
            per_cpu=list(v) if per_cpu else None,
        )
        for name, v in values.items()
    }


def _vip(
    vid: str, snap: Snapshot, rates: dict[str, float], per_cpu: bool
) -> VipStatsPublic:
    return VipStatsPublic(
        vip_id=vid,
        counters=_counters(f"vip/{vid}", snap.vips[vid], rates, per_cpu),
        backends=[
            BackendStatsPublic(
                address=addr, counters=_counters(f"pair/{vid}/{addr}", c, rates, per_cpu)
            )
            for addr, c in sorted(snap.pairs.get(vid, {}).items())
        ],
    )


#: Field of `protection.counters` -> the global counter it reports.
PROTECTION_COUNTERS = {
    "flood_windows": "STAT_GUARD_FLOOD",
    "syn_stateless": "STAT_GUARD_SYN_STATELESS",
    "no_evict": "STAT_GUARD_NO_EVICT",
    "echo_limited": "STAT_ICMP_ECHO_LIMITED",
    "too_big_limited": "STAT_TOO_BIG_LIMITED",
    "src_denied": "STAT_SRC_DENIED",
}


def _protection(
    stats: StatsDep, snap: Snapshot, rates: dict[str, float], per_cpu: bool
) -> ProtectionPublic | None:
    if "guard_cfg" not in stats.balancer_maps():
        return None
    g = stats.guard()
    glob = _counters("glob", snap.glob, rates, per_cpu)
    return ProtectionPublic(
        syn_guard=str(g["mode"]),
        flood=bool(g["flood"]),
        flood_cpus=list(g["flood_cpus"]),
        syn_per_window=int(g["syn_per_window"]),
        window_ms=round((1 << GUARD_WINDOW_SHIFT) / 1e6, 3),
        counters={k: glob[c] for k, c in PROTECTION_COUNTERS.items() if c in glob},
    )


def _rates(rt: RuntimeDep, snap: Snapshot) -> tuple[dict[str, float], float]:
    if rt.sampler is None:
        return {}, 0.0
    return rt.sampler.rates(snap)


@router.get("/v1/stats", dependencies=[ReadAuth])
def get_stats(rt: RuntimeDep, stats: StatsDep, per_cpu: PerCpuQuery = False) -> StatsPublic:
    """Every counter: global (by C name), per VIP, per backend, and the connection table."""
    snap = stats.snapshot()
    rates, span = _rates(rt, snap)
    glob = snap.glob
    misses = sum(sum(glob.get(n, ())) for n in ("STAT_LRU_MISS_SYN", "STAT_LRU_MISS_OTHER"))
    return StatsPublic(
        window_s=round(span, 3),
        xdp_mode=rt.attach_mode(),
        xdp_mode_reason=rt.attach_reason(),
        global_=_counters("glob", glob, rates, per_cpu),
        vips=[_vip(vid, snap, rates, per_cpu) for vid in sorted(snap.vips)],
        backends=[
            BackendStatsPublic(address=addr, counters=_counters(f"real/{addr}", c, rates, per_cpu))
            for addr, c in sorted(snap.reals.items())
        ],
        conn_table=ConnTablePublic(
            entries=stats.conn_table_count(),
            slots_used=stats.conn_table_used(),
            capacity=stats.conn_table_capacity,
            hits=sum(glob.get("STAT_LRU_HIT", ())),
            misses=misses,
        ),
        protection=_protection(stats, snap, rates, per_cpu),
    )


@router.get(
    "/v1/vips/{vip_id}/stats", dependencies=[ReadAuth], responses=problem_responses(404, 422)
)
def get_vip_stats(
    vip_id: VipIdPath,
    rt: RuntimeDep,
    control: ControlDep,
    stats: StatsDep,
    per_cpu: PerCpuQuery = False,
) -> VipStatsPublic:
    """One VIP's counters (packets, bytes, new connections) with rates."""
    vid = control.get_vip(vip_id).id
    snap = stats.snapshot(vips=[vid])
    if vid not in snap.vips:
        raise NotFound(f"VIP {vid} is not in the data plane's vip_map", field="vip_id")
    rates, _ = _rates(rt, snap)
    return _vip(vid, snap, rates, per_cpu)
