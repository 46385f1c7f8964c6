/* decap.c - backend-side decapsulation of what the balancer sends: IPIP, IPv6-in-IPv6,
 * IPv4-in-IPv6 and GUE variant 1 (over IPv4 or IPv6), for an outer destination listed in
 * decap_addrs. Two entry points over one parser (decap_parse.h):
 *   xdp_decap - XDP: moves the Ethernet header over the outer headers (bpf_xdp_adjust_head);
 *   tc_decap  - tc ingress, direct action: bpf_skb_change_proto + bpf_skb_adjust_room.
 * Both hand the inner packet to the stack with the Ethernet type of the inner family, and
 * pass everything else untouched. Attaching is the caller's job (see lb/dataplane/decap.py).
 * A GUE packet naming a second hop (second chance, second.h) that is not this backend's is
 * passed on to that hop instead of being decapsulated.
 *
 * XXX: ECN is not propagated from the outer to the inner header (RFC 6040); the balancer
 * copies the inner TOS / traffic class outwards, so only a CE mark set on the way is lost.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "decap/decap_maps.h"

/* Map-touching helpers, here because BCC rewrites map accesses only in the main file. */

/* Bump one counter slot and return `verdict`, so callers can write `return decap_count(..)`. */
static __always_inline int decap_count(__u32 slot, int verdict)
{
	__u64 *cnt = decap_stats.lookup(&slot);

	if (cnt)
		*cnt += 1;
	return verdict;
}

/* Is the outer destination one of ours? */
static __always_inline int decap_is_local(struct decap_addr *key)
{
	return decap_addrs.lookup(key) != NULL;
}

/* GUE destination port in network order, from decap_cfg or the compiled-in default. */
static __always_inline __be16 decap_gue_port(void)
{
	__u32 zero = 0;
	struct decap_cfg *cfg = decap_cfg.lookup(&zero);

	if (cfg && cfg->gue_port)
		return cfg->gue_port;
	return bpf_htons(DECAP_DEFAULT_GUE_PORT);
}

#include "decap/decap_parse.h"

/* XDP: copy the Ethernet header (and tag) to the stack, drop the outer headers, write the
 * header back in front of the inner packet with the inner ethertype.
 */
static __always_inline int decap_xdp_strip(struct xdp_md *ctx, struct decap_info *info)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct decap_vlan_hdr *vlan, tag = {};
	struct ethhdr *eth = data, hdr;
	int tagged = info->l2_len != sizeof(*eth);

	if ((void *)(eth + 1) > data_end)
		return decap_count(DECAP_STAT_DROP_ADJUST, XDP_DROP);
	hdr = *eth;
	if (tagged) {
		vlan = (void *)(eth + 1);
		if ((void *)(vlan + 1) > data_end)
			return decap_count(DECAP_STAT_DROP_ADJUST, XDP_DROP);
		tag.tci = vlan->tci;
		tag.encap_proto = bpf_htons(info->inner_proto);
	} else {
		hdr.h_proto = bpf_htons(info->inner_proto);
	}
	if (bpf_xdp_adjust_head(ctx, info->outer_len))
		return decap_count(DECAP_STAT_DROP_ADJUST, XDP_DROP);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return decap_count(DECAP_STAT_DROP_ADJUST, XDP_DROP);
	*eth = hdr;
	if (tagged) {
		vlan = (void *)(eth + 1);
		if ((void *)(vlan + 1) > data_end)
			return decap_count(DECAP_STAT_DROP_ADJUST, XDP_DROP);
		*vlan = tag;
	}
	return decap_count(info->stat, XDP_PASS);
}

/* XDP entry point. */
int xdp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct decap_info info = {};
	int action;

	action = decap_parse(data, data_end, &info, XDP_PASS, XDP_DROP);
	if (action >= 0)
		return action;
	/* Second chance (second.h): not ours, so back out towards the second hop. */
	if (info.second && second_decide(ctx, data, data_end, &info) == SECOND_FORWARD) {
		if (!second_rewrite(data, data_end, &info))
			return decap_count(DECAP_STAT_SC_FORWARD, XDP_TX);
		decap_count(DECAP_STAT_SC_KEEP_LAST, 0);
	}
	return decap_xdp_strip(ctx, &info);
}

/* tc: remove the outer headers right after the Ethernet header. Any failure after the first
 * resizing helper leaves a half-rewritten packet, so every failure drops.
 */
static __always_inline int decap_tc_strip(struct __sk_buff *skb, struct decap_info *info)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__be16 inner = bpf_htons(info->inner_proto);
	__s32 strip = info->outer_len;
	struct decap_vlan_hdr *vlan;
	__u16 tci;

	if (info->l2_len != sizeof(struct ethhdr)) {
		/* The stack moves a single 802.1Q tag into skb->vlan_tci before tc ingress, so an
		 * in-band tag only shows up in BPF_PROG_TEST_RUN. bpf_skb_adjust_room refuses an skb
		 * whose protocol is 802.1Q: do what the stack would, then carry on untagged.
		 */
		vlan = data + sizeof(struct ethhdr);
		if ((void *)(vlan + 1) > data_end)
			return decap_count(DECAP_STAT_DROP_ADJUST, TC_ACT_SHOT);
		tci = bpf_ntohs(vlan->tci);
		if (bpf_skb_vlan_pop(skb) ||
		    bpf_skb_vlan_push(skb, bpf_htons(DECAP_ETH_P_8021Q), tci))
			return decap_count(DECAP_STAT_DROP_ADJUST, TC_ACT_SHOT);
	}
	if (info->inner_proto != info->outer_proto) {
		/* bpf_skb_change_proto is the NAT64 helper: besides skb->protocol (and GSO type)
		 * it removes (6 -> 4) or inserts (4 -> 6) DECAP_V6_V4_DIFF bytes right after the
		 * Ethernet header, i.e. inside the outer headers, so adjust what is left to strip.
		 * (BPF_F_ADJ_ROOM_DECAP_L3_* would do it in one call, but only from Linux 6.3 on
		 * and not in the 6.1 UAPI headers BCC compiles against here.)
		 */
		if (bpf_skb_change_proto(skb, inner, 0))
			return decap_count(DECAP_STAT_DROP_ADJUST, TC_ACT_SHOT);
		if (info->inner_proto == ETH_P_IP)
			strip -= DECAP_V6_V4_DIFF;
		else
			strip += DECAP_V6_V4_DIFF;
	}
	/* FIXED_GSO: gso_size counts inner payload bytes per segment, which decap keeps. */
	if (bpf_skb_adjust_room(skb, -strip, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return decap_count(DECAP_STAT_DROP_ADJUST, TC_ACT_SHOT);
	/* No BPF_F_RECOMPUTE_CSUM: the Ethernet header is outside CHECKSUM_COMPLETE's sum. */
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &inner, sizeof(inner), 0))
		return decap_count(DECAP_STAT_DROP_ADJUST, TC_ACT_SHOT);
	return decap_count(info->stat, TC_ACT_OK);
}

/* tc ingress entry point (SCHED_CLS, direct action). */
int tc_decap(struct __sk_buff *skb)
{
	struct decap_info info = {};
	/* pkt_end - pkt: the verifier accepts pointer subtraction only with allow_ptr_leaks
	 * (CAP_PERFMON); loading BPF needs root here anyway (unprivileged_bpf_disabled=2).
	 */
	__u32 linear = skb->data_end - skb->data;
	void *data, *data_end;
	int action;

	/* Headers may sit in paged data; make the ones decap_parse reads linear. */
	if (linear < DECAP_PULL_LEN && linear < skb->len)
		bpf_skb_pull_data(skb, skb->len < DECAP_PULL_LEN ? skb->len : DECAP_PULL_LEN);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	action = decap_parse(data, data_end, &info, TC_ACT_OK, TC_ACT_SHOT);
	if (action >= 0)
		return action;
	/* Second chance (second.h): not ours, so out of the same device to the second hop. */
	if (info.second && second_decide(skb, data, data_end, &info) == SECOND_FORWARD) {
		if (!second_rewrite(data, data_end, &info))
			return decap_count(DECAP_STAT_SC_FORWARD, bpf_redirect(skb->ifindex, 0));
		decap_count(DECAP_STAT_SC_KEEP_LAST, 0);
	}
	return decap_tc_strip(skb, &info);
}
