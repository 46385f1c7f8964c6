/* encap.h - encapsulation towards a backend: IPv4-in-IPv4, IPv6-in-IPv6, IPv4-in-IPv6, each
 * optionally as GUE (the IP packet directly in UDP, "GUE variant 1": no GUE header, RFC 8086
 * style; the receiver tells IPv4 from IPv6 by the first nibble). A packet that carries a
 * second hop (second chance, xdp/balancer/second.h) is GUE variant 0 instead: a GUE header
 * with the hop in its private data sits between UDP and the IP packet (xdp/common/gue.h).
 *
 * The outer header copies the inner TOS / traffic class byte (DSCP and ECN) and TTL / hop
 * limit; an outer IPv4 header copies the inner DF bit (RFC 2003 3.1) and has ID 0; an outer
 * IPv6 header has flow label 0 (the RSS-friendly source already spreads flows).
 *
 * Outer source (per VIP):
 *  - default, "RSS friendly" (Katran): one flow always gets the same source, different flows
 *    spread over the backend's receive queues.
 *    IPv4: the lb_cfg.rss_v4 /16 prefix; low 16 bits = client address high half XOR low half
 *          XOR client port (host order).
 *    IPv6: the lb_cfg.rss_v6 /64 prefix; low 64 bits = client address high 64 bits XOR low
 *          64 bits, with the client port XORed into the last 16 bits. An IPv4 client (IPv4
 *          VIP, IPv6 backend) thus gives <prefix>:<client address>:<port>.
 *  - F_SRC_LB: the LB's own lb_cfg.src_v4 / src_v6.
 * GUE: UDP destination lb_cfg.gue_port; source port 0xc000 | (flow hash & 0x3fff), in the
 * ephemeral range (RFC 8086 3.2.1) and stable per flow, so the backend's RSS spreads flows.
 * The outer UDP checksum is 0: allowed for IPv4, and for IPv6 tunnels by RFC 6935/6936 (the
 * inner packet carries its own checksums); backends must accept zero-checksum UDP on the GUE
 * port (the project's decap does).
 */
#ifndef XLB_ENCAP_H
#define XLB_ENCAP_H

#include "balancer/parse.h"
#include "balancer/second.h"

/* The largest header stack encap_push adds: IPv6 + UDP (GUE over IPv6). */
#define ENCAP_MAX_OVERHEAD (sizeof(struct ipv6hdr) + sizeof(struct udphdr))

/* Frames up to this length keep their padding (ETH_ZLEN, 60, plus an 802.1Q tag). */
#define ENCAP_KEEP_PAD 64

/* The IPv4 /16 prefix is the high half of rss_v4. */
#define ENCAP_RSS_V4_MASK 0xffff0000

/* Bytes encap_push adds in front of the IP packet. */
static __always_inline __u32 encap_overhead(int outer_v6, int gue)
{
	__u32 len = outer_v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);

	return gue ? len + sizeof(struct udphdr) : len;
}

/* RSS-friendly outer IPv4 source for a flow (see the top of this file). */
static __always_inline __be32 encap_rss_src_v4(const struct lb_cfg *cfg,
					       const struct flow_key *flow)
{
	__u32 client = bpf_ntohl(flow->src[0]);
	__u32 low = (client >> 16) ^ client ^ bpf_ntohs(flow->sport);

	return bpf_htonl((bpf_ntohl(cfg->rss_v4) & ENCAP_RSS_V4_MASK) | (low & 0xffff));
}

/* RSS-friendly outer IPv6 source for a flow (see the top of this file). */
static __always_inline void encap_rss_src_v6(const struct lb_cfg *cfg,
					     const struct flow_key *flow, __be32 *out)
{
	out[0] = cfg->rss_v6[0];
	out[1] = cfg->rss_v6[1];
	out[2] = flow->src[0] ^ flow->src[2];
	out[3] = flow->src[1] ^ flow->src[3] ^ bpf_htonl(bpf_ntohs(flow->sport));
}

/* Prepend the outer headers and rewrite Ethernet for the trip to `real` via the gateway;
 * with `second` (a GUE VIP only), the GUE header naming it follows the UDP header
 * (xdp/balancer/second.h). Returns the outer IP packet length (for the backend's byte
 * counter), 0 on failure. Callers have ruled out an IPv6 packet to an IPv4 backend.
 */
static __always_inline __u32 encap_push(struct xdp_md *ctx, const struct parse_pkt *pkt,
					const struct real_def *real, const struct lb_cfg *cfg,
					__u32 vip_flags, __u32 hash,
					const struct real_def *second)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct parse_vlan_hdr *vlan;
	struct ipv6hdr *ip6h;
	struct iphdr *iph;
	struct udphdr *uh;
	void *l3;
	__u8 orig_dst[ETH_ALEN];
	int outer_v6 = real->flags & REAL_F_V6;
	int gue = vip_flags & F_ENCAP_GUE;
	__u32 hdr_len = outer_v6 ? sizeof(*ip6h) : sizeof(*iph);
	__u32 over = encap_overhead(outer_v6, gue) + (second ? second_overhead(outer_v6) : 0);
	__u32 outer_len = pkt->ip_len + over;
	__u32 frame_len = data_end - data, want = pkt->l3_off + pkt->ip_len;
	__be16 eth_proto;
	__u8 proto;

	if ((void *)(eth + 1) > data_end)
		return 0;
	/* The frame's destination MAC (ours: lb_frame_is_ours) becomes the source of the frame
	 * we send.
	 */
	__builtin_memcpy(orig_dst, eth->h_dest, ETH_ALEN);
	/* Bytes after the IP packet are not the client's: a trailer is cut, or it would make
	 * the frame larger than the size check allowed. The padding of a minimum-size frame
	 * (at most ENCAP_KEEP_PAD bytes in all) is left: it stays behind the outer IP packet,
	 * whose length does not count it, where receivers ignore it, and the frame stays far
	 * below any max_frame. Cutting it is a helper call per short packet (~7 ns, a bare
	 * IPv4 ACK; docs/performance.md).
	 */
	if (frame_len > want && frame_len > ENCAP_KEEP_PAD &&
	    bpf_xdp_adjust_tail(ctx, (int)want - (int)frame_len))
		return 0;
	if (bpf_xdp_adjust_head(ctx, 0 - (int)over))
		return 0;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	l3 = data + pkt->l3_off;
	/* Verifier: l3 has a variable offset (VLAN or not), so its range is proven separately
	 * from the Ethernet header's. Every encapsulated packet is longer than both checks.
	 */
	if (data + sizeof(*eth) + sizeof(*vlan) > data_end ||
	    l3 + ENCAP_MAX_OVERHEAD > data_end)
		return 0;

	eth_proto = outer_v6 ? __constant_htons(ETH_P_IPV6) : __constant_htons(ETH_P_IP);
	parse_write_eth(eth, cfg->gw_mac, orig_dst, pkt, eth_proto);

	if (gue)
		proto = IPPROTO_UDP;
	else if (pkt->flow.family == FAMILY_V4)
		proto = IPPROTO_IPIP;
	else
		proto = IPPROTO_IPV6;

	if (outer_v6) {
		ip6h = l3;
		/* Version 6, traffic class from the inner packet, flow label 0. */
		*(__be32 *)ip6h = bpf_htonl((6 << PARSE_IPV6_VERSION_SHIFT) |
					    ((__u32)pkt->tos << PARSE_IPV6_TCLASS_SHIFT));
		ip6h->payload_len = bpf_htons(outer_len - sizeof(*ip6h));
		ip6h->nexthdr = proto;
		ip6h->hop_limit = pkt->ttl;
		if (vip_flags & F_SRC_LB)
			__builtin_memcpy(&ip6h->saddr, cfg->src_v6, sizeof(ip6h->saddr));
		else
			encap_rss_src_v6(cfg, &pkt->flow, (__be32 *)&ip6h->saddr);
		__builtin_memcpy(&ip6h->daddr, real->addr, sizeof(ip6h->daddr));
		uh = l3 + sizeof(*ip6h);
	} else {
		iph = l3;
		iph->version = 4;
		iph->ihl = PARSE_IPV4_IHL;
		iph->tos = pkt->tos;
		iph->tot_len = bpf_htons(outer_len);
		/* ID 0 is fine for an atomic datagram (DF set); one that may be fragmented
		 * needs an ID (RFC 6864 4.1).
		 */
		if (pkt->df) {
			iph->id = 0;
			iph->frag_off = __constant_htons(PARSE_IP_DF);
		} else {
			iph->id = (__u16)bpf_get_prandom_u32();
			iph->frag_off = 0;
		}
		iph->ttl = pkt->ttl;
		iph->protocol = proto;
		iph->check = 0;
		iph->saddr = (vip_flags & F_SRC_LB) ? cfg->src_v4 : encap_rss_src_v4(cfg, &pkt->flow);
		iph->daddr = real->addr[0];
		iph->check = csum_ipv4_hdr(iph);
		uh = l3 + sizeof(*iph);
	}
	if (gue) {
		uh->source = bpf_htons(ENCAP_GUE_SPORT_BASE | (hash & ENCAP_GUE_SPORT_MASK));
		uh->dest = cfg->gue_port;
		uh->len = bpf_htons(outer_len - hdr_len);
		uh->check = 0;
		if (second && !second_write(uh + 1, data_end, second, outer_v6, pkt->flow.family))
			return 0;
	}
	return outer_len;
}

#endif /* XLB_ENCAP_H */
