/* parse.h - packet parsing: Ethernet with at most one 802.1Q tag, IPv4 without options or
 * fragmentation, IPv6 without extension headers, TCP/UDP ports.
 *
 * Helpers return a verdict (already counted) or FURTHER_PROCESSING, Katran style: callers
 * write `if (action >= 0) return action;`. Every packet bound is checked against data_end
 * right before the access, and also against the length the IP header claims, so a packet
 * whose headers lie about their length is dropped as malformed instead of being read past
 * its end, when it is to a VIP address: the host's own traffic, malformed or not, is the
 * stack's (parse_refuse).
 */
#ifndef XLB_PARSE_H
#define XLB_PARSE_H

#include "balancer/stats.h"
#include "common/bounds.h"

/* "Not decided yet, go on": every verdict is >= 0. */
#define FURTHER_PROCESSING -1

/* 802.1Q tag after the MAC addresses (linux/if_vlan.h has it, but not as UAPI). */
struct parse_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

/* IPv4 flags/fragment-offset bits (net/ip.h, not UAPI). */
#define PARSE_IP_DF 0x4000
#define PARSE_IP_MF 0x2000
#define PARSE_IP_OFFSET 0x1fff

/* First 32-bit word of an IPv6 header: version (4 bits), traffic class (8), flow label (20). */
#define PARSE_IPV6_VERSION_SHIFT 28
#define PARSE_IPV6_TCLASS_SHIFT 20

/* IPv4 header length in 32-bit words without options. */
#define PARSE_IPV4_IHL 5

/* IPv6 next-header values of the extension headers we refuse for a VIP (net/ipv6.h). */
#define PARSE_NEXTHDR_HOP 0
#define PARSE_NEXTHDR_ROUTING 43
#define PARSE_NEXTHDR_FRAGMENT 44
#define PARSE_NEXTHDR_DEST 60

/* TCP flag bits in the 14th byte of the TCP header. */
#define PARSE_TCP_FIN 0x01
#define PARSE_TCP_SYN 0x02
#define PARSE_TCP_RST 0x04

/* Everything the pipeline learns about a packet while parsing it. */
struct parse_pkt {
	/* The client->VIP 5-tuple; for a forwarded ICMP error, its embedded flow reversed. */
	struct flow_key flow;
	/* Ethernet header length, 802.1Q tag included: the offset of the IP header.
	 * Verifier: a u8, so reloading it from the stack yields a value bounded by 255 that may
	 * be added to a packet pointer; as a u32 in a zeroed struct it reloads unbounded and
	 * every access through it is rejected (kernel 6.18).
	 */
	__u8 l3_off;
	/* Length of the IP packet (header included) as its header states it; never more than
	 * the frame, so it fits 16 bits.
	 */
	__u16 ip_len;
	/* The 802.1Q tag control field as received (network order), if has_vlan. */
	__be16 vlan_tci;
	/* One 802.1Q tag follows the MAC addresses. */
	__u8 has_vlan;
	/* TOS / traffic class byte, copied into the outer header. */
	__u8 tos;
	/* TTL / hop limit, copied into the outer header. */
	__u8 ttl;
	/* TCP flags byte (0 for UDP and ICMP). */
	__u8 tcp_flags;
	/* IPv4 DF bit was set (copied into an outer IPv4 header, RFC 2003 3.1). */
	__u8 df;
	/* This is an ICMP error forwarded along the flow it quotes. */
	__u8 icmp_fwd;
};

/* Parse Ethernet and an optional 802.1Q tag; sets l3_off and the EtherType behind them. */
static __always_inline int parse_eth(void *data, void *data_end, struct parse_pkt *pkt,
				     __be16 *proto)
{
	struct ethhdr *eth = data;
	struct parse_vlan_hdr *vlan;

	if ((void *)(eth + 1) > data_end)
		return stats_verdict(STAT_PASS_NOT_IP, XDP_PASS);
	*proto = eth->h_proto;
	pkt->l3_off = sizeof(*eth);
	if (eth->h_proto == __constant_htons(ETH_P_8021Q)) {
		vlan = (void *)(eth + 1);
		if ((void *)(vlan + 1) > data_end)
			return stats_verdict(STAT_PASS_NOT_IP, XDP_PASS);
		pkt->has_vlan = 1;
		pkt->vlan_tci = vlan->tci;
		*proto = vlan->proto;
		pkt->l3_off = sizeof(*eth) + sizeof(*vlan);
	}
	return FURTHER_PROCESSING;
}

/* Does any VIP live on this address (vip_addrs)? Defined in balancer.c (see stats.h). */
static __always_inline int parse_is_vip_addr(const __be32 *addr, __u32 family);

/* A packet we refuse to balance: drop it (counted `slot`) when it is for a VIP address, pass
 * it untouched when it is the host's own traffic.
 *
 * Fragments carry no ports (all but the first), so they cannot be hashed consistently with
 * the rest of their flow; passing them would make this host's kernel route VIP traffic back
 * to the router. IPv4 options and IPv6 extension headers would have to be walked to find the
 * ports and are next to unused on the Internet. Katran drops both too.
 */
static __always_inline int parse_refuse(const __be32 *dst, __u32 family, __u32 slot)
{
	if (parse_is_vip_addr(dst, family))
		return stats_verdict(slot, XDP_DROP);
	return stats_verdict(STAT_PASS_NON_VIP, XDP_PASS);
}

/* Parse and check an IPv4 header at l3_off; fills the flow's addresses, proto and family. */
static __always_inline int parse_ipv4(void *data, void *data_end, struct parse_pkt *pkt)
{
	struct iphdr *iph = data + pkt->l3_off;
	__u32 len;

	/* Too short to name its destination: nothing shows it is ours. */
	if ((void *)(iph + 1) > data_end)
		return stats_verdict(STAT_PASS_NOT_IP, XDP_PASS);
	pkt->flow.dst[0] = iph->daddr;
	if (iph->version != 4 || iph->ihl < PARSE_IPV4_IHL)
		return parse_refuse(pkt->flow.dst, FAMILY_V4, STAT_MALFORMED);
	len = bounds_ntohs(iph->tot_len);
	if (len < sizeof(*iph) || (void *)iph + len > data_end)
		return parse_refuse(pkt->flow.dst, FAMILY_V4, STAT_MALFORMED);
	pkt->flow.src[0] = iph->saddr;
	pkt->flow.family = FAMILY_V4;
	if (iph->frag_off & __constant_htons(PARSE_IP_MF | PARSE_IP_OFFSET))
		return parse_refuse(pkt->flow.dst, FAMILY_V4, STAT_FRAG);
	if (iph->ihl != PARSE_IPV4_IHL)
		return parse_refuse(pkt->flow.dst, FAMILY_V4, STAT_IP_OPTIONS);
	pkt->flow.proto = iph->protocol;
	pkt->ip_len = len;
	pkt->tos = iph->tos;
	pkt->ttl = iph->ttl;
	pkt->df = !!(iph->frag_off & __constant_htons(PARSE_IP_DF));
	switch (iph->protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_ICMP:
		return FURTHER_PROCESSING;
	}
	return stats_verdict(STAT_PASS_NOT_IP, XDP_PASS);
}

/* Parse and check an IPv6 header at l3_off; fills the flow's addresses, proto and family. */
static __always_inline int parse_ipv6(void *data, void *data_end, struct parse_pkt *pkt)
{
	struct ipv6hdr *ip6h = data + pkt->l3_off;
	__u32 plen;

	/* Too short to name its destination: nothing shows it is ours. */
	if ((void *)(ip6h + 1) > data_end)
		return stats_verdict(STAT_PASS_NOT_IP, XDP_PASS);
	__builtin_memcpy(pkt->flow.dst, &ip6h->daddr, sizeof(pkt->flow.dst));
	if (ip6h->version != 6)
		return parse_refuse(pkt->flow.dst, FAMILY_V6, STAT_MALFORMED);
	plen = bounds_ntohs(ip6h->payload_len);
	if ((void *)(ip6h + 1) + plen > data_end)
		return parse_refuse(pkt->flow.dst, FAMILY_V6, STAT_MALFORMED);
	__builtin_memcpy(pkt->flow.src, &ip6h->saddr, sizeof(pkt->flow.src));
	pkt->flow.family = FAMILY_V6;
	pkt->flow.proto = ip6h->nexthdr;
	pkt->ip_len = sizeof(*ip6h) + plen;
	/* The traffic class straddles the version nibble and the flow label's first byte. */
	pkt->tos = (ip6h->priority << 4) | (ip6h->flow_lbl[0] >> 4);
	pkt->ttl = ip6h->hop_limit;
	switch (ip6h->nexthdr) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_ICMPV6:
		return FURTHER_PROCESSING;
	case PARSE_NEXTHDR_FRAGMENT:
		return parse_refuse(pkt->flow.dst, FAMILY_V6, STAT_FRAG);
	case PARSE_NEXTHDR_HOP:
	case PARSE_NEXTHDR_ROUTING:
	case PARSE_NEXTHDR_DEST:
		return parse_refuse(pkt->flow.dst, FAMILY_V6, STAT_IP_OPTIONS);
	}
	return stats_verdict(STAT_PASS_NOT_IP, XDP_PASS);
}

/* Read TCP/UDP ports (and TCP flags) at `l4`, which must lie within the IP packet. */
static __always_inline int parse_ports(void *l4, void *data_end, struct parse_pkt *pkt,
				       __u32 l4_len)
{
	struct tcphdr *th = l4;
	struct udphdr *uh = l4;

	if (pkt->flow.proto == IPPROTO_TCP) {
		if ((void *)(th + 1) > data_end || l4_len < sizeof(*th))
			return parse_refuse(pkt->flow.dst, pkt->flow.family, STAT_MALFORMED);
		pkt->flow.sport = th->source;
		pkt->flow.dport = th->dest;
		/* The flags byte follows the data-offset byte (offset 13). */
		pkt->tcp_flags = ((__u8 *)th)[13];
		return FURTHER_PROCESSING;
	}
	if ((void *)(uh + 1) > data_end || l4_len < sizeof(*uh))
		return parse_refuse(pkt->flow.dst, pkt->flow.family, STAT_MALFORMED);
	pkt->flow.sport = uh->source;
	pkt->flow.dport = uh->dest;
	return FURTHER_PROCESSING;
}

/* Write a rebuilt frame's Ethernet header (and the VLAN tag the packet came with) in front of
 * an L3 header of `proto`. The caller has checked that eth + one VLAN header are in bounds.
 */
static __always_inline void parse_write_eth(struct ethhdr *eth, const __u8 *dst,
					    const __u8 *src, const struct parse_pkt *pkt,
					    __be16 proto)
{
	struct parse_vlan_hdr *vlan;

	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	if (pkt->has_vlan) {
		eth->h_proto = __constant_htons(ETH_P_8021Q);
		vlan = (void *)(eth + 1);
		vlan->tci = pkt->vlan_tci;
		vlan->proto = proto;
	} else {
		eth->h_proto = proto;
	}
}

#endif /* XLB_PARSE_H */
