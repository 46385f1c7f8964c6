/* icmp.h - ICMP handled in XDP: echo replies for VIP addresses, parsing the flow an ICMP
 * error quotes (to forward frag-needed / packet-too-big along that flow), and the "too big"
 * replies the balancer sends when an encapsulated frame would exceed lb_cfg.max_frame.
 *
 * Replies go back out of the interface they came in on (XDP_TX): MAC addresses swapped,
 * 802.1Q tag kept, TTL / hop limit ICMP_TTL.
 *
 * A too-big reply quotes as much of the original packet as the minimum-MTU rules allow:
 * IPv4 up to 576 bytes in all (RFC 1812 4.3.2.3), IPv6 up to 1280 (RFC 4443 2.4(c)).
 * It is sent whether or not an IPv4 packet had DF: XDP cannot fragment, and an
 * encapsulated frame over max_frame would be dropped further on anyway; a sender that set
 * no DF mostly ignores the reply, as it would ignore a silent loss.
 * The MTU reported is max_frame - 14 - the flow's encapsulation overhead, whatever it is: with
 * max_frame below 1342 an IPv6 client is told less than 1280, which RFC 8201 tells it to
 * ignore; the control plane should not configure that.
 */
#ifndef XLB_ICMP_H
#define XLB_ICMP_H

#include "common/csum.h"
#include "balancer/parse.h"

/* TTL / hop limit of the ICMP messages the balancer sends (the kernel's default). */
#define ICMP_TTL 64

/* Bytes of the original packet a too-big reply quotes, at most. */
#define ICMP4_QUOTE_MAX (576 - sizeof(struct iphdr) - sizeof(struct icmphdr))
#define ICMP6_QUOTE_MAX (1280 - sizeof(struct ipv6hdr) - sizeof(struct icmp6hdr))

/* Bytes of the quoted transport header the balancer reads: the two ports. */
#define ICMP_INNER_PORTS 4

/* May the flow's client get an ICMP error from us? Not when its source is multicast,
 * broadcast, unspecified or loopback (RFC 1122 3.2.2, RFC 4443 2.4(e)): such a source never
 * sent the packet, and answering it would make the LB a reflector.
 */
static __always_inline int icmp_source_ok(const struct flow_key *flow)
{
	__u32 a0 = bpf_ntohl(flow->src[0]);

	if (flow->family == FAMILY_V4) {
		__u32 first = a0 >> 24;

		/* 0/8 "this network", 127/8 loopback, 224/4 multicast, 240/4 and broadcast. */
		return first != 0 && first != 127 && first < 224;
	}
	/* ff00::/8 multicast. */
	if ((a0 >> 24) == 0xff)
		return 0;
	/* :: unspecified and ::1 loopback. */
	if (!(flow->src[0] | flow->src[1] | flow->src[2]) && bpf_ntohl(flow->src[3]) <= 1)
		return 0;
	return 1;
}

/* Swap the MAC addresses of a frame (its header is known to be in bounds). */
static __always_inline void icmp_swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

/* Turn an ICMP echo request to a VIP address into its reply, in place. */
static __always_inline int icmp_echo_v4(void *data, void *data_end, struct parse_pkt *pkt)
{
	struct ethhdr *eth = data;
	struct iphdr *iph = data + pkt->l3_off;
	struct icmphdr *icmph = (void *)(iph + 1);
	__u16 old_word, new_word;

	if ((void *)(eth + 1) > data_end || (void *)(icmph + 1) > data_end)
		return stats_verdict(STAT_MALFORMED, XDP_DROP);
	icmp_swap_macs(eth);
	iph->saddr = pkt->flow.dst[0];
	iph->daddr = pkt->flow.src[0];
	iph->ttl = ICMP_TTL;
	iph->check = 0;
	iph->check = csum_ipv4_hdr(iph);
	/* Type and code share one checksummed word: update the checksum for that word only. */
	old_word = *(__u16 *)icmph;
	icmph->type = ICMP_ECHOREPLY;
	new_word = *(__u16 *)icmph;
	icmph->checksum = csum_update16(icmph->checksum, old_word, new_word);
	return stats_verdict(STAT_ICMP_ECHO, XDP_TX);
}

/* Turn an ICMPv6 echo request to a VIP address into its reply, in place. Swapping the
 * addresses leaves the pseudo-header's sum unchanged, so only the type word is accounted.
 */
static __always_inline int icmp_echo_v6(void *data, void *data_end, struct parse_pkt *pkt)
{
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6h = data + pkt->l3_off;
	struct icmp6hdr *icmp6h = (void *)(ip6h + 1);
	__u16 old_word, new_word;

	if ((void *)(eth + 1) > data_end || (void *)(icmp6h + 1) > data_end)
		return stats_verdict(STAT_MALFORMED, XDP_DROP);
	icmp_swap_macs(eth);
	__builtin_memcpy(&ip6h->saddr, pkt->flow.dst, sizeof(ip6h->saddr));
	__builtin_memcpy(&ip6h->daddr, pkt->flow.src, sizeof(ip6h->daddr));
	ip6h->hop_limit = ICMP_TTL;
	old_word = *(__u16 *)icmp6h;
	icmp6h->icmp6_type = ICMPV6_ECHO_REPLY;
	new_word = *(__u16 *)icmp6h;
	icmp6h->icmp6_cksum = csum_update16(icmp6h->icmp6_cksum, old_word, new_word);
	return stats_verdict(STAT_ICMP_ECHO, XDP_TX);
}

/* Read the flow an ICMPv4 error quotes (at `inner`) as the client->VIP flow it answers: the
 * quoted packet went VIP->client, so addresses and ports are swapped back.
 */
static __always_inline int icmp_parse_inner_v4(void *inner, void *data_end,
					       struct parse_pkt *pkt, __u32 inner_len)
{
	struct iphdr *iph = inner;
	__be16 *ports = (void *)(iph + 1);

	if ((void *)ports + ICMP_INNER_PORTS > data_end ||
	    inner_len < sizeof(*iph) + ICMP_INNER_PORTS)
		return stats_verdict(STAT_MALFORMED, XDP_DROP);
	if (iph->version != 4)
		return stats_verdict(STAT_MALFORMED, XDP_DROP);
	/* A quoted packet with options or protocols we do not balance is not from a VIP flow. */
	if (iph->ihl != PARSE_IPV4_IHL ||
	    (iph->protocol != IPPROTO_TCP && iph->protocol != IPPROTO_UDP))
		return stats_verdict(STAT_PASS_ICMP, XDP_PASS);
	pkt->flow.src[0] = iph->daddr;
	pkt->flow.dst[0] = iph->saddr;
	pkt->flow.sport = ports[1];
	pkt->flow.dport = ports[0];
	pkt->flow.proto = iph->protocol;
	return FURTHER_PROCESSING;
}

/* The same for an ICMPv6 error quoting an IPv6 packet. */
static __always_inline int icmp_parse_inner_v6(void *inner, void *data_end,
					       struct parse_pkt *pkt, __u32 inner_len)
{
	struct ipv6hdr *ip6h = inner;
	__be16 *ports = (void *)(ip6h + 1);

	if ((void *)ports + ICMP_INNER_PORTS > data_end ||
	    inner_len < sizeof(*ip6h) + ICMP_INNER_PORTS)
		return stats_verdict(STAT_MALFORMED, XDP_DROP);
	if (ip6h->version != 6)
		return stats_verdict(STAT_MALFORMED, XDP_DROP);
	if (ip6h->nexthdr != IPPROTO_TCP && ip6h->nexthdr != IPPROTO_UDP)
		return stats_verdict(STAT_PASS_ICMP, XDP_PASS);
	__builtin_memcpy(pkt->flow.src, &ip6h->daddr, sizeof(pkt->flow.src));
	__builtin_memcpy(pkt->flow.dst, &ip6h->saddr, sizeof(pkt->flow.dst));
	pkt->flow.sport = ports[1];
	pkt->flow.dport = ports[0];
	pkt->flow.proto = ip6h->nexthdr;
	return FURTHER_PROCESSING;
}

/* Cut the frame to the Ethernet header plus `quote` bytes of the IP packet and make room for
 * `hdr` bytes of new headers in front of the IP packet; rewrites the Ethernet header (MACs
 * swapped, VLAN kept). Returns 0 on success.
 */
static __always_inline int icmp_make_room(struct xdp_md *ctx, const struct parse_pkt *pkt,
					  __u32 quote, __u32 hdr, __be16 eth_proto)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct parse_vlan_hdr *vlan;
	__u8 macs[2 * ETH_ALEN];
	int delta;

	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(macs, eth, sizeof(macs));
	delta = (int)(pkt->l3_off + quote) - (int)(data_end - data);
	if (delta < 0 && bpf_xdp_adjust_tail(ctx, delta))
		return -1;
	if (bpf_xdp_adjust_head(ctx, 0 - (int)hdr))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if (data + sizeof(*eth) + sizeof(*vlan) > data_end)
		return -1;
	parse_write_eth(eth, macs + ETH_ALEN, macs, pkt, eth_proto);
	return 0;
}

/* Answer the client with ICMP fragmentation-needed carrying `mtu`, from the VIP address. */
static __always_inline int icmp_too_big_v4(struct xdp_md *ctx, const struct parse_pkt *pkt,
					   __u32 mtu)
{
	__u32 quote = pkt->ip_len < ICMP4_QUOTE_MAX ? pkt->ip_len : ICMP4_QUOTE_MAX;
	__u32 hdr = sizeof(struct iphdr) + sizeof(struct icmphdr);
	struct icmphdr *icmph;
	struct iphdr *iph;
	void *data, *data_end;

	if (icmp_make_room(ctx, pkt, quote, hdr, __constant_htons(ETH_P_IP)))
		return stats_verdict(STAT_ENCAP_FAIL, XDP_DROP);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	iph = data + pkt->l3_off;
	icmph = (void *)(iph + 1);
	if ((void *)(icmph + 1) > data_end)
		return stats_verdict(STAT_ENCAP_FAIL, XDP_DROP);
	iph->version = 4;
	iph->ihl = PARSE_IPV4_IHL;
	iph->tos = 0;
	iph->tot_len = bpf_htons(hdr + quote);
	/* DF clear: the datagram may be fragmented, so it needs an ID (RFC 6864 4.1). */
	iph->id = (__u16)bpf_get_prandom_u32();
	iph->frag_off = 0;
	iph->ttl = ICMP_TTL;
	iph->protocol = IPPROTO_ICMP;
	iph->check = 0;
	iph->saddr = pkt->flow.dst[0];
	iph->daddr = pkt->flow.src[0];
	iph->check = csum_ipv4_hdr(iph);
	icmph->type = ICMP_DEST_UNREACH;
	icmph->code = ICMP_FRAG_NEEDED;
	icmph->checksum = 0;
	icmph->un.frag.__unused = 0;
	icmph->un.frag.mtu = bpf_htons(mtu);
	icmph->checksum = csum_fold32(csum_add_pkt(icmph, data_end, 0));
	return stats_verdict(STAT_TOO_BIG, XDP_TX);
}

/* Answer the client with ICMPv6 packet-too-big carrying `mtu`, from the VIP address. */
static __always_inline int icmp_too_big_v6(struct xdp_md *ctx, const struct parse_pkt *pkt,
					   __u32 mtu)
{
	__u32 quote = pkt->ip_len < ICMP6_QUOTE_MAX ? pkt->ip_len : ICMP6_QUOTE_MAX;
	__u32 hdr = sizeof(struct ipv6hdr) + sizeof(struct icmp6hdr);
	__u32 icmp_len = sizeof(struct icmp6hdr) + quote;
	struct icmp6hdr *icmp6h;
	struct ipv6hdr *ip6h;
	void *data, *data_end;
	__u32 sum = 0, word;

	if (icmp_make_room(ctx, pkt, quote, hdr, __constant_htons(ETH_P_IPV6)))
		return stats_verdict(STAT_ENCAP_FAIL, XDP_DROP);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	ip6h = data + pkt->l3_off;
	icmp6h = (void *)(ip6h + 1);
	if ((void *)(icmp6h + 1) > data_end)
		return stats_verdict(STAT_ENCAP_FAIL, XDP_DROP);
	/* Version 6, traffic class 0, flow label 0. */
	*(__be32 *)ip6h = bpf_htonl(6 << PARSE_IPV6_VERSION_SHIFT);
	ip6h->payload_len = bpf_htons(icmp_len);
	ip6h->nexthdr = IPPROTO_ICMPV6;
	ip6h->hop_limit = ICMP_TTL;
	__builtin_memcpy(&ip6h->saddr, pkt->flow.dst, sizeof(ip6h->saddr));
	__builtin_memcpy(&ip6h->daddr, pkt->flow.src, sizeof(ip6h->daddr));
	icmp6h->icmp6_type = ICMPV6_PKT_TOOBIG;
	icmp6h->icmp6_code = 0;
	icmp6h->icmp6_cksum = 0;
	icmp6h->icmp6_mtu = bpf_htonl(mtu);
	/* Pseudo-header (RFC 8200 8.1): addresses, upper-layer length, next header. */
	sum = csum_add_addr6(sum, pkt->flow.dst);
	sum = csum_add_addr6(sum, pkt->flow.src);
	word = bpf_htonl(icmp_len);
	sum += (word >> 16) + (word & 0xffff);
	word = bpf_htonl(IPPROTO_ICMPV6);
	sum += (word >> 16) + (word & 0xffff);
	icmp6h->icmp6_cksum = csum_fold32(csum_add_pkt(icmp6h, data_end, sum));
	return stats_verdict(STAT_TOO_BIG, XDP_TX);
}

#endif /* XLB_ICMP_H */
