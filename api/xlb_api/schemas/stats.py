"""Schemas of the statistics: per VIP, per backend, global, connection table."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CounterPublic(BaseModel):
    """One counter: its total, its rate over the window, and per CPU on request."""

    value: int
    per_s: float | None = Field(description="rate over the window (null: no sample yet)")
    per_cpu: list[int] | None = Field(None, description="one value per possible CPU")


class BackendStatsPublic(BaseModel):
    """Counters of one backend: summed over every VIP it serves (in `backends` of the stats),
    or what one VIP sent it (in a VIP's `backends`)."""

    address: str
    counters: dict[str, CounterPublic] = Field(
        description="packets, bytes (outer, summed); packets, bytes, new_conns (per VIP)"
    )


class VipStatsPublic(BaseModel):
    """Counters of one VIP, and what it sent to each of its backends."""

    vip_id: str
    counters: dict[str, CounterPublic] = Field(
        description="packets, bytes, new_conns, src_denied (dropped by its source ranges)"
    )
    backends: list[BackendStatsPublic] = Field(
        default_factory=list,
        description="per backend: packets, bytes (client IP bytes) and new_conns this VIP"
        " sent it (dataplane.features.pair_stats)",
    )


class ConnTablePublic(BaseModel):
    """Connection-table usage and lookups."""

    entries: int = Field(
        description="live flows now: UDP seen within udp_timeout_s, TCP seen within"
        " tcp_timeout_s and not closed (a snapshot count: an estimate under load)"
    )
    slots_used: int = Field(
        description="slots holding an entry, live or reusable (expired or closed flows)"
    )
    capacity: int = Field(description="slots: sets x 8 ways (conn_table_size rounded up)")
    hits: int = Field(description="STAT_LRU_HIT")
    misses: int = Field(description="STAT_LRU_MISS_SYN + STAT_LRU_MISS_OTHER")


class ProtectionPublic(BaseModel):
    """The SYN-flood guard's mode and state, and what the protections dropped or held back
    (docs/protection.md)."""

    syn_guard: str = Field(description="off, auto or always (runtime protect.syn_guard)")
    flood: bool = Field(
        description="SYNs follow the ring without a table entry now: mode always, or auto"
        " with a CPU above the threshold in this guard window or the last one"
    )
    flood_cpus: list[int] = Field(description="CPUs in flood mode now (auto)")
    syn_per_window: int = Field(
        description="SYNs per CPU per guard window above which auto enters flood mode"
    )
    window_ms: float = Field(description="length of a guard window")
    counters: dict[str, CounterPublic] = Field(
        description="flood_windows (STAT_GUARD_FLOOD), syn_stateless"
        " (STAT_GUARD_SYN_STATELESS), no_evict (STAT_GUARD_NO_EVICT), echo_limited"
        " (STAT_ICMP_ECHO_LIMITED), too_big_limited (STAT_TOO_BIG_LIMITED), src_denied"
        " (STAT_SRC_DENIED, every VIP)"
    )


class StatsPublic(BaseModel):
    """Every counter of the data plane."""

    window_s: float = Field(description="span the rates cover (0: no earlier sample yet)")
    xdp_mode: str | None = Field(None, description="native, generic or offload; None: not attached")
    xdp_mode_reason: str | None = Field(
        None, description="why that mode, e.g. why auto fell back to generic"
    )
    global_: dict[str, CounterPublic] = Field(
        alias="global", description="global counters by their C name (enum glob_stat)"
    )
    vips: list[VipStatsPublic]
    backends: list[BackendStatsPublic]
    conn_table: ConnTablePublic
    protection: ProtectionPublic | None = Field(
        None, description="the SYN guard and the protections' counters (null: maps without)"
    )

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
