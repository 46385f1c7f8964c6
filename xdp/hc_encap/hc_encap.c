/* hc_encap.c - tunnelled health probes: a tc egress program on the balancer's interface
 * that encapsulates locally generated packets whose skb->mark names a backend (hc_reals),
 * so a probe to the VIP reaches that backend exactly as client traffic does (Katran's
 * health-check forwarding). The backend decapsulates, sees a packet to the VIP, and answers
 * the prober's own address directly (DSR), which routes back to the LB.
 *
 * Encapsulations: IPv4 in IPv4, IPv6 in IPv6, IPv4 in IPv6, each optionally as GUE (the IP
 * packet in UDP to hc_cfg.gue_port, zero UDP checksum), as xdp/balancer/encap.h does for
 * clients, with the shared checksum helper and GUE source ports of xdp/common/.
 * Outer source: the LB's own address (hc_cfg.src_v4 / src_v6); destination MAC: hc_cfg.gw_mac
 * when set. Unmarked packets and marks that are not ours pass untouched.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#include "common/consts.h"
#include "common/csum.h"

/* Marks programmed at once (one per backend and encapsulation in use). */
#ifndef HC_MAX_REALS
#define HC_MAX_REALS 4096
#endif

/* struct hc_real.flags: the backend is IPv6; encapsulate in GUE. */
#define HC_F_V6 (1 << 0)
#define HC_F_GUE (1 << 1)

/* Outer IPv4 / IPv6 header fields of probes. */
#define HC_TTL 64
#define HC_IPV4_VER_IHL 0x45
#define HC_IP_DF 0x4000

/* Counter slots (hc_stats), mirrored by name in lb/dataplane/hcencap.py. */
enum hc_stat {
	/* Probes encapsulated towards an IPv4 / IPv6 backend. */
	HC_STAT_ENCAP_V4 = 0,
	HC_STAT_ENCAP_V6,
	/* Marked, but not a mark of ours (passed). */
	HC_STAT_PASS_FOREIGN,
	/* An IPv6 probe towards an IPv4 backend (dropped: no IPv6-in-IPv4). */
	HC_STAT_DROP_FAMILY,
	/* Making room or writing the header failed (dropped). */
	HC_STAT_DROP_ADJUST,
	HC_STAT_MAX,
};

/* A backend probes are steered to. */
struct hc_real {
	__be32 addr[4];
	/* HC_F_* */
	__u32 flags;
};

/* Runtime configuration, hc_cfg[0]. */
struct hc_cfg {
	__u8 gw_mac[6];
	__be16 gue_port;
	__be32 src_v4;
	__be32 src_v6[4];
};

/* skb->mark -> backend. */
BPF_HASH(hc_reals, __u32, struct hc_real, HC_MAX_REALS);
/* Runtime configuration, one entry. */
BPF_ARRAY(hc_cfg, struct hc_cfg, 1);
/* Counters by enum hc_stat. */
BPF_PERCPU_ARRAY(hc_stats, __u64, HC_STAT_MAX);

static __always_inline int hc_count(__u32 slot, int verdict)
{
	__u64 *cnt = hc_stats.lookup(&slot);

	if (cnt)
		*cnt += 1;
	return verdict;
}

int tc_hc_encap(struct __sk_buff *skb)
{
	__u32 mark = skb->mark, zero = 0, slot = ETH_HLEN;
	struct hc_real *real;
	struct hc_cfg *cfg;
	int inner_v6, outer_v6, gue;
	__u32 inner_len, hdr_len, over;
	__u64 flags;
	__be16 eth_proto;
	__u8 proto;

	if (!mark)
		return TC_ACT_OK;
	real = hc_reals.lookup(&mark);
	if (!real)
		return hc_count(HC_STAT_PASS_FOREIGN, TC_ACT_OK);
	cfg = hc_cfg.lookup(&zero);
	if (!cfg)
		return TC_ACT_OK;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		inner_v6 = 0;
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		inner_v6 = 1;
	else
		return TC_ACT_OK;
	outer_v6 = real->flags & HC_F_V6;
	gue = real->flags & HC_F_GUE;
	if (inner_v6 && !outer_v6)
		return hc_count(HC_STAT_DROP_FAMILY, TC_ACT_SHOT);
	inner_len = skb->len - ETH_HLEN;
	hdr_len = outer_v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
	over = hdr_len + (gue ? sizeof(struct udphdr) : 0);

	if (!inner_v6 && outer_v6) {
		/* IPv4 in IPv6: bpf_skb_adjust_room refuses to change the family, so switch
		 * skb->protocol first (it makes 20 bytes of room in front of the IPv4 header),
		 * then add the rest without encapsulation flags (they would describe the room
		 * as the inner header).
		 */
		if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IPV6), 0))
			return hc_count(HC_STAT_DROP_ADJUST, TC_ACT_SHOT);
		if (bpf_skb_adjust_room(skb, over - (sizeof(struct ipv6hdr) - sizeof(struct iphdr)),
					BPF_ADJ_ROOM_MAC, 0))
			return hc_count(HC_STAT_DROP_ADJUST, TC_ACT_SHOT);
	} else {
		flags = outer_v6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
		if (gue)
			flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP;
		if (bpf_skb_adjust_room(skb, over, BPF_ADJ_ROOM_MAC, flags))
			return hc_count(HC_STAT_DROP_ADJUST, TC_ACT_SHOT);
	}

	if (gue)
		proto = IPPROTO_UDP;
	else
		proto = inner_v6 ? IPPROTO_IPV6 : IPPROTO_IPIP;
	if (outer_v6) {
		struct ipv6hdr ip6 = {};

		ip6.version = 6;
		ip6.payload_len = bpf_htons(inner_len + over - sizeof(ip6));
		ip6.nexthdr = proto;
		ip6.hop_limit = HC_TTL;
		__builtin_memcpy(&ip6.saddr, cfg->src_v6, sizeof(ip6.saddr));
		__builtin_memcpy(&ip6.daddr, real->addr, sizeof(ip6.daddr));
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6), 0))
			return hc_count(HC_STAT_DROP_ADJUST, TC_ACT_SHOT);
		eth_proto = bpf_htons(ETH_P_IPV6);
		slot = HC_STAT_ENCAP_V6;
	} else {
		struct iphdr ip = {};

		*(__u8 *)&ip = HC_IPV4_VER_IHL;
		ip.tot_len = bpf_htons(inner_len + over);
		ip.frag_off = bpf_htons(HC_IP_DF);
		ip.ttl = HC_TTL;
		ip.protocol = proto;
		ip.saddr = cfg->src_v4;
		ip.daddr = real->addr[0];
		ip.check = csum_ipv4_hdr(&ip);
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0))
			return hc_count(HC_STAT_DROP_ADJUST, TC_ACT_SHOT);
		eth_proto = bpf_htons(ETH_P_IP);
		slot = HC_STAT_ENCAP_V4;
	}
	if (gue) {
		struct udphdr uh = {};

		uh.source = bpf_htons(ENCAP_GUE_SPORT_BASE |
				      (bpf_get_hash_recalc(skb) & ENCAP_GUE_SPORT_MASK));
		uh.dest = cfg->gue_port;
		uh.len = bpf_htons(inner_len + sizeof(uh));
		if (bpf_skb_store_bytes(skb, ETH_HLEN + hdr_len, &uh, sizeof(uh), 0))
			return hc_count(HC_STAT_DROP_ADJUST, TC_ACT_SHOT);
	}
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &eth_proto,
				sizeof(eth_proto), 0))
		return hc_count(HC_STAT_DROP_ADJUST, TC_ACT_SHOT);
	if (cfg->gw_mac[0] | cfg->gw_mac[1] | cfg->gw_mac[2] | cfg->gw_mac[3] |
	    cfg->gw_mac[4] | cfg->gw_mac[5]) {
		__u8 mac[ETH_ALEN];

		__builtin_memcpy(mac, cfg->gw_mac, ETH_ALEN);
		if (bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0))
			return hc_count(HC_STAT_DROP_ADJUST, TC_ACT_SHOT);
	}
	return hc_count(slot, TC_ACT_OK);
}
