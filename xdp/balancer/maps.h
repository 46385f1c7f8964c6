/* maps.h - every map of the balancer, one comment each.
 *
 * With a pin directory the loader puts each map on its pin <dir>/<name>, opened by path
 * (lb.dataplane.loader.adopt_pins): a map that is already pinned is reused, so rings,
 * connections and counters survive a restart or an upgrade of the program. Names stay at
 * most 15 characters so bpftool shows them whole.
 */
#ifndef XLB_MAPS_H
#define XLB_MAPS_H

#include "common/consts.h"
#include "common/structs.h"
#include "balancer/events.h"

#define LB_MAP(type, key, val, name, size, flags) BPF_F_TABLE(type, key, val, name, size, flags)

/* An array user space can mmap (lb/dataplane/conntab.py reads the connection table that way). */
#define MMAPABLE 1024 /* BPF_F_MMAPABLE */

/* VIP (address, port, protocol) -> VIP number and flags. */
LB_MAP("hash", struct vip_key, struct vip_meta, vip_map, MAX_VIPS, 0);
/* Generation of vip_map (one entry), bumped by the control plane after each change of
 * vip_map and at every start; 0 (never written) means no VIP lookup is cached.
 */
LB_MAP("array", __u32, __u64, vip_gen, 1, 0);
/* The last VIP lookup of each CPU (one entry; only that CPU writes its copy), so the packets
 * of one VIP skip the hash while vip_gen holds the entry's generation (lb_vip_lookup).
 */
LB_MAP("percpu_array", __u32, struct vip_cache, vip_cache, 1, 0);
/* Addresses carrying a VIP -> number of VIPs on it. */
LB_MAP("hash", struct vip_addr, __u32, vip_addrs, MAX_VIP_ADDRS, 0);
/* Bits of the addresses that carry a VIP (one entry). */
LB_MAP("array", __u32, struct vip_filter, vip_filter, 1, 0);
/* Backend index -> backend. */
LB_MAP("array", __u32, struct real_def, reals, MAX_REALS, 0);
/* Maglev rings, flat: ch_rings[vip_num * RING_SIZE + slot] = backend index (0 = none). */
LB_MAP("array", __u32, __u32, ch_rings, MAX_VIPS * RING_SIZE, 0);
/* Connection table: flow -> backend, set-associative (docs/conn-table.md). */
LB_MAP("array", __u32, struct conn_set, conn_table, CONN_SETS, MMAPABLE);
/* Runtime configuration, one entry. */
LB_MAP("array", __u32, struct lb_cfg, lb_cfg, 1, 0);
/* Per-VIP counters. */
LB_MAP("percpu_array", __u32, struct vip_stats, vip_stats, MAX_VIPS, 0);
/* Per-backend counters. */
LB_MAP("percpu_array", __u32, struct real_stats, real_stats, MAX_REALS, 0);
/* Per-VIP-per-backend counters, first in pair_cache: slot hash_pair_slot(pair) on each CPU
 * is taken by the first pair counted there; a pair that finds its slot taken by another
 * counts in pair_stats, whose entries the program makes on such a pair's first packet. A
 * pair's counters are the sum of both. The control plane frees a pair's slots and entries
 * when its VIP number or backend index is freed.
 */
LB_MAP("percpu_array", __u32, struct pair_slot, pair_cache, PAIR_SLOTS, 0);
LB_MAP("percpu_hash", struct pair_key, struct pair_stats, pair_stats, MAX_PAIRS, 0);
/* Global counters, indexed by enum glob_stat. */
LB_MAP("percpu_array", __u32, __u64, glob_stats, STAT_MAX, 0);
/* (VIP number, IPv4 source range) -> SRC_ALLOW / SRC_DENY (xdp/balancer/srcrange.h). */
LB_MAP("lpm_trie", struct src_key_v4, __u32, src_v4, MAX_SRC_RANGES, BPF_F_NO_PREALLOC);
/* (VIP number, IPv6 source range) -> SRC_ALLOW / SRC_DENY. */
LB_MAP("lpm_trie", struct src_key_v6, __u32, src_v6, MAX_SRC_RANGES, BPF_F_NO_PREALLOC);
/* Per-VIP stamp (conn.h units) of the last change of the VIP's source ranges: a table entry
 * stamped later saw its source allowed (srcrange.h).
 */
LB_MAP("array", __u32, __u32, src_changed, MAX_VIPS, 0);
/* Per-VIP count of packets dropped by the VIP's source ranges. */
LB_MAP("percpu_array", __u32, __u64, src_denied, MAX_VIPS, 0);
/* SYN-flood guard and reply rate limits: configuration, one entry (xdp/balancer/guard.h). */
LB_MAP("array", __u32, struct guard_cfg, guard_cfg, 1, 0);
/* The guard's window per CPU, one entry. */
LB_MAP("percpu_array", __u32, struct guard_state, guard_state, 1, 0);
/* Token buckets of the replies the LB sends (RL_*), per CPU (xdp/balancer/ratelimit.h). */
LB_MAP("percpu_array", __u32, struct rl_bucket, rl_buckets, RL_SLOTS, 0);
/* What the program reports into events (one entry; all zero = nothing), events.h. */
LB_MAP("array", __u32, struct ev_cfg, ev_cfg, 1, 0);
/* Sampling countdown and record counts, per CPU. */
LB_MAP("percpu_array", __u32, struct ev_state, ev_state, 1, 0);
/* The record being built, per CPU: a captured frame is copied here at entry (as received). */
LB_MAP("percpu_array", __u32, struct ev_frame, ev_frame, 1, 0);
/* Sampled events and captured frames for user space (lb/dataplane/events.py). */
BPF_RINGBUF_OUTPUT(events, EV_RING_PAGES);

#endif /* XLB_MAPS_H */
