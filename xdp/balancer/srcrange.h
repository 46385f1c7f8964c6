/* srcrange.h - per-VIP source ranges: allow and deny prefixes of client addresses, kept in
 * one LPM trie per family keyed by (VIP number, prefix), so the longest matching range
 * decides (an allow inside a deny, or a deny inside an allow, both work). A source no range
 * matches is denied when the VIP has an allow list (F_SRC_ALLOW), allowed otherwise.
 * A VIP without ranges (no F_SRC_RANGES) pays one flag test.
 *
 * An established flow does not pay the trie (30-70 ns) per packet: its connection-table
 * entry is only ever stamped by a packet whose source the ranges allowed (a new flow is
 * checked before its entry is written; an entry stamped before the last change is checked
 * again before it is refreshed), so an entry stamped two units or more after
 * src_changed[vip_num] (written by the control plane after every change of the VIP's
 * ranges or range flags, lb/control/reconcile.py) holds a source allowed by the current
 * ranges. The change's own unit and the next count as before it: a packet that read the
 * VIP's old flags just before the control plane wrote them (and so skipped the check) may
 * read the clock a moment after the control plane did, across a unit boundary; it cannot
 * be two units later.
 *
 * The trie lookup and the per-VIP counter touch maps, so they are declared here and defined
 * in balancer.c (BCC rewrites map accesses only in the main file).
 */
#ifndef XLB_SRCRANGE_H
#define XLB_SRCRANGE_H

#include "common/consts.h"
#include "common/structs.h"
#include "balancer/stats.h"
#include "balancer/parse.h"

/* SRC_ALLOW / SRC_DENY of the longest range of VIP `vip_num` holding the flow's source; 0
 * when none does (balancer.c).
 */
static __always_inline __u32 srcrange_lookup(const struct flow_key *flow, __u32 vip_num);

/* Was the entry `meta` stamped after VIP `vip_num`'s ranges last changed (src_changed)? */
static __always_inline int srcrange_fresh(__u32 vip_num, __u64 meta, __u64 now);

/* Count a denied packet for VIP `vip_num` (src_denied; balancer.c). */
static __always_inline void srcrange_count(__u32 vip_num);

/* Drop (counted) a packet whose source the VIP's ranges refuse; else FURTHER_PROCESSING. */
static __always_inline int srcrange_check(const struct flow_key *flow, const struct vip_meta *vip)
{
	__u32 v;

	if (!(vip->flags & F_SRC_RANGES))
		return FURTHER_PROCESSING;
	v = srcrange_lookup(flow, vip->vip_num);
	if (v == SRC_ALLOW || (!v && !(vip->flags & F_SRC_ALLOW)))
		return FURTHER_PROCESSING;
	srcrange_count(vip->vip_num);
	return stats_verdict(STAT_SRC_DENIED, XDP_DROP);
}

#endif /* XLB_SRCRANGE_H */
