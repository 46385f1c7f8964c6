/* second.h - "second chance" on the balancer (docs/second-chance.md).
 *
 * After a change moves a ring slot, the control plane keeps the slot's previous backend in
 * the high half of its ch_rings word for a window (until the drain completes, or a set
 * time). A packet of a flow the connection table does not know that hashes to such a slot
 * goes to the slot's backend as before, but carrying the previous backend as its second hop
 * in a GUE header (xdp/common/gue.h); that backend's decap keeps the packet when it is its
 * own (SYN, local socket, valid SYN cookie) and passes it on to the second hop otherwise.
 *
 * Rules, in the order lb_pick applies them:
 *  - only GUE VIPs (IPIP has nowhere to carry a hop: the control plane never writes one);
 *  - never for a TCP SYN (a new flow is the slot's backend's) or a forwarded ICMP error;
 *  - the second hop must still be a backend (reals entry not empty) of the first's family;
 *  - a flow sent with a second hop is not written to the connection table: the table would
 *    pin it to the first backend without the hop, and the flow may live on the second.
 * Slots without a second hop cost one shift and a compare.
 *
 * `second_real` reads the reals map, so it is declared here and defined in balancer.c (BCC
 * rewrites map accesses only in the main file).
 */
#ifndef XLB_SECOND_H
#define XLB_SECOND_H

#include "common/consts.h"
#include "common/structs.h"
#include "common/gue.h"
#include "balancer/stats.h"

#if MAX_REALS > (RING_REAL_MASK + 1)
#error "MAX_REALS must fit the 16-bit backend index of a ch_rings word"
#endif

/* The backend at index `idx` (balancer.c). */
static __always_inline struct real_def *second_real(__u32 idx);

/* The second hop of a ring word for this packet, or NULL (see the rules above). `first` is
 * the slot's backend.
 */
static __always_inline struct real_def *second_pick(__u32 word, __u32 vip_flags, int syn,
						    int icmp_fwd, const struct real_def *first)
{
	__u32 prev = word >> RING_PREV_SHIFT;
	struct real_def *r;

	if (!prev)
		return NULL;
	if (!FEAT_GUE || !(vip_flags & F_ENCAP_GUE) || syn || icmp_fwd ||
	    prev == (word & RING_REAL_MASK))
		return NULL;
	r = second_real(prev);
	if (!r || !(r->addr[0] | r->addr[1] | r->addr[2] | r->addr[3]) ||
	    ((r->flags ^ first->flags) & REAL_F_V6)) {
		stats_inc(STAT_SECOND_SKIP);
		return NULL;
	}
	return r;
}

/* Bytes a second hop adds to a GUE packet (GUE header and private data). */
static __always_inline __u32 second_overhead(int outer_v6)
{
	return sizeof(struct gue_hdr) + sizeof(struct gue_second) + (outer_v6 ? 16 : 4);
}

/* Write the GUE header naming `second` at `at` (right after the outer UDP header). Returns
 * 0 when the packet is too short (never, after encap_push's adjust_head).
 */
static __always_inline int second_write(void *at, void *data_end,
					const struct real_def *second, int outer_v6,
					__u8 inner_family)
{
	struct gue_hdr *gh = at;
	struct gue_second *gs = (void *)(gh + 1);
	__be32 *addr = (void *)(gs + 1);

	if ((void *)(addr + 4) > data_end)
		return 0;
	gh->ver_hlen = outer_v6 ? GUE_HLEN_SECOND_V6 : GUE_HLEN_SECOND_V4;
	gh->proto = inner_family == FAMILY_V4 ? IPPROTO_IPIP : IPPROTO_IPV6;
	gh->flags = 0;
	gs->type = __constant_htons(GUE_PRIV_SECOND);
	gs->hops = GUE_HOPS_INITIAL;
	gs->family = outer_v6 ? FAMILY_V6 : FAMILY_V4;
	addr[0] = second->addr[0];
	if (outer_v6) {
		addr[1] = second->addr[1];
		addr[2] = second->addr[2];
		addr[3] = second->addr[3];
	}
	return 1;
}

#endif /* XLB_SECOND_H */
