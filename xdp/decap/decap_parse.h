/* decap_parse.h - classify a frame for the decap programs and validate its tunnel headers.
 *
 * Shared by the XDP and the tc variant: it reads only through (data, data_end) and returns
 * either the caller's pass/drop verdict (already counted) or DECAP_FURTHER with a filled
 * struct decap_info describing what to strip. Rules:
 *   - not IP, not a tunnel protocol (4, 41, UDP), or UDP to another port: pass, not-encap;
 *   - tunnel protocol to an address not in decap_addrs: pass, not-local;
 *   - IPv4 fragment to a local address: pass, frag (nothing to decapsulate in a fragment);
 *   - anything else to a local address must be a complete, well-formed tunnel packet whose
 *     inner header is complete and fits in the outer payload, or it is dropped (malformed).
 * GUE comes as variant 1 (IP right after UDP) or variant 0 (a GUE header first: the
 * balancer's second hop, xdp/decap/second.h and xdp/common/gue.h; control messages drop).
 *
 * BCC rewrites map accesses (`map.lookup()`) only in the main source file, so the includer
 * defines the three map-touching helpers this file calls before including it:
 *   int decap_count(__u32 slot, int verdict);          bump a counter, return verdict
 *   int decap_is_local(struct decap_addr *key);        key is in decap_addrs
 *   __be16 decap_gue_port(void);                       GUE port, network order
 */
#ifndef XLB_DECAP_PARSE_H
#define XLB_DECAP_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>

#include "common/bounds.h"
#include "decap/decap.h"

/* Returned by helpers when the packet is to be decapsulated (verdicts are >= 0). */
#define DECAP_FURTHER (-1)

/* What decap_parse found in a tunnel packet addressed to this backend. */
struct decap_info {
	/* Bytes of Ethernet header, 802.1Q tag included. */
	__u32 l2_len;
	/* Bytes between the Ethernet header and the inner IP header (outer IP [+ UDP]). */
	__u32 outer_len;
	/* Outer and inner ethertype (ETH_P_IP / ETH_P_IPV6, host order). */
	__u16 outer_proto;
	__u16 inner_proto;
	/* Counter slot to bump once the outer headers are gone. */
	__u32 stat;
	/* A GUE header naming a second hop (second.h), and the hops it has left. */
	__u8 second;
	__u8 hops;
};

#include "decap/second.h"

/* Validate the inner IP header at `inner` (`avail` bytes of outer payload left for it).
 * `want` is the version the outer header announced, 0 for GUE (either). Returns the inner
 * ethertype, or 0 when the inner packet is malformed or does not fit.
 */
static __always_inline __u16 decap_parse_inner(void *inner, void *data_end, __u32 avail,
					       __u8 want)
{
	struct ipv6hdr *ip6h = inner;
	struct iphdr *iph = inner;
	__u8 version;
	__u32 len;

	if (inner + 1 > data_end)
		return 0;
	version = *(__u8 *)inner >> DECAP_VERSION_SHIFT;
	if (want && version != want)
		return 0;
	if (version == DECAP_IP_VERSION_4) {
		if ((void *)(iph + 1) > data_end || iph->ihl * DECAP_IHL_UNIT < sizeof(*iph))
			return 0;
		len = bounds_ntohs(iph->tot_len);
		if (len < iph->ihl * DECAP_IHL_UNIT || len > avail)
			return 0;
		return ETH_P_IP;
	}
	if (version == DECAP_IP_VERSION_6) {
		if ((void *)(ip6h + 1) > data_end)
			return 0;
		len = sizeof(*ip6h) + bounds_ntohs(ip6h->payload_len);
		if (len > avail)
			return 0;
		return ETH_P_IPV6;
	}
	return 0;
}

/* Common tail of both families: `payload` is the outer IP payload of `avail` bytes, already
 * known to lie inside the packet. Handles the optional UDP (GUE) header, then the inner one.
 */
static __always_inline int decap_parse_payload(void *payload, void *data_end, __u32 avail,
					       __u8 proto, struct decap_info *info, int pass,
					       int drop)
{
	struct udphdr *udp = payload;
	__u8 want = DECAP_IP_VERSION_4;
	__u32 udp_len, glen;

	if (proto == IPPROTO_IPV6)
		want = DECAP_IP_VERSION_6;
	if (proto == IPPROTO_UDP) {
		/* Too short for a UDP header: not something we can tell is GUE; the stack decides. */
		if (avail < sizeof(*udp) || (void *)(udp + 1) > data_end)
			return decap_count(DECAP_STAT_PASS_NOT_ENCAP, pass);
		if (udp->dest != decap_gue_port())
			return decap_count(DECAP_STAT_PASS_NOT_ENCAP, pass);
		/* XXX: the outer UDP checksum is not verified (0 is accepted, as RFC 6935 allows
		 * for tunnels over IPv6); the inner transport checksum still covers the payload.
		 */
		udp_len = bounds_ntohs(udp->len);
		if (udp_len < sizeof(*udp) || udp_len > avail)
			return decap_count(DECAP_STAT_DROP_MALFORMED, drop);
		payload = udp + 1;
		avail = udp_len - sizeof(*udp);
		info->outer_len += sizeof(*udp);
		want = 0;
		/* GUE variant 0: a GUE header (a second hop, second.h) before the inner IP. */
		if (payload + 1 <= data_end && !(*(__u8 *)payload >> GUE_VERSION_SHIFT)) {
			glen = second_parse_gue(payload, data_end, avail, info, &want);
			if (!glen)
				return decap_count(DECAP_STAT_DROP_MALFORMED, drop);
			payload += glen;
			avail -= glen;
			info->outer_len += glen;
		}
	}
	info->inner_proto = decap_parse_inner(payload, data_end, avail, want);
	if (!info->inner_proto)
		return decap_count(DECAP_STAT_DROP_MALFORMED, drop);
	return DECAP_FURTHER;
}

/* Outer IPv4 header at `l3`. */
static __always_inline int decap_parse_v4(void *l3, void *data_end, struct decap_info *info,
					  int pass, int drop)
{
	struct decap_addr key = {};
	struct iphdr *iph = l3;
	__u32 hlen, tot_len;
	__u8 proto;

	if ((void *)(iph + 1) > data_end || iph->version != DECAP_IP_VERSION_4)
		return decap_count(DECAP_STAT_PASS_NOT_ENCAP, pass);
	proto = iph->protocol;
	if (proto != IPPROTO_IPIP && proto != IPPROTO_UDP)
		return decap_count(DECAP_STAT_PASS_NOT_ENCAP, pass);
	key.addr[0] = iph->daddr;
	key.family = DECAP_FAMILY_V4;
	if (!decap_is_local(&key))
		return decap_count(DECAP_STAT_PASS_NOT_LOCAL, pass);
	if (iph->frag_off & bpf_htons(DECAP_IP_MF | DECAP_IP_OFFSET))
		return decap_count(DECAP_STAT_PASS_FRAG, pass);
	hlen = iph->ihl * DECAP_IHL_UNIT;
	tot_len = bounds_ntohs(iph->tot_len);
	if (hlen < sizeof(*iph) || tot_len < hlen || l3 + tot_len > data_end)
		return decap_count(DECAP_STAT_DROP_MALFORMED, drop);
	info->outer_proto = ETH_P_IP;
	info->outer_len = hlen;
	info->stat = proto == IPPROTO_UDP ? DECAP_STAT_GUE_V4 : DECAP_STAT_IPIP;
	return decap_parse_payload(l3 + hlen, data_end, tot_len - hlen, proto, info, pass, drop);
}

/* Outer IPv6 header at `l3`. XXX: only a tunnel protocol right after the base header is
 * recognised; outer extension headers (e.g. ip6tnl's encapsulation limit) pass as not-encap.
 */
static __always_inline int decap_parse_v6(void *l3, void *data_end, struct decap_info *info,
					  int pass, int drop)
{
	struct decap_addr key = {};
	struct ipv6hdr *ip6h = l3;
	__u32 plen;
	__u8 proto;

	if ((void *)(ip6h + 1) > data_end || ip6h->version != DECAP_IP_VERSION_6)
		return decap_count(DECAP_STAT_PASS_NOT_ENCAP, pass);
	proto = ip6h->nexthdr;
	if (proto != IPPROTO_IPV6 && proto != IPPROTO_IPIP && proto != IPPROTO_UDP)
		return decap_count(DECAP_STAT_PASS_NOT_ENCAP, pass);
	__builtin_memcpy(key.addr, ip6h->daddr.in6_u.u6_addr32, sizeof(key.addr));
	key.family = DECAP_FAMILY_V6;
	if (!decap_is_local(&key))
		return decap_count(DECAP_STAT_PASS_NOT_LOCAL, pass);
	plen = bounds_ntohs(ip6h->payload_len);
	if ((void *)(ip6h + 1) + plen > data_end)
		return decap_count(DECAP_STAT_DROP_MALFORMED, drop);
	info->outer_proto = ETH_P_IPV6;
	info->outer_len = sizeof(*ip6h);
	if (proto == IPPROTO_UDP)
		info->stat = DECAP_STAT_GUE_V6;
	else if (proto == IPPROTO_IPV6)
		info->stat = DECAP_STAT_IP6IP6;
	else
		info->stat = DECAP_STAT_IP4IN6;
	return decap_parse_payload(ip6h + 1, data_end, plen, proto, info, pass, drop);
}

/* Classify the frame at [data, data_end). Returns `pass` / `drop` (counted) or DECAP_FURTHER
 * with `info` filled for a tunnel packet to strip.
 */
static __always_inline int decap_parse(void *data, void *data_end, struct decap_info *info,
				       int pass, int drop)
{
	struct ethhdr *eth = data;
	struct decap_vlan_hdr *vlan;
	__u16 proto;

	if ((void *)(eth + 1) > data_end)
		return decap_count(DECAP_STAT_PASS_NOT_ENCAP, pass);
	info->l2_len = sizeof(*eth);
	proto = bpf_ntohs(eth->h_proto);
	if (proto == DECAP_ETH_P_8021Q) {
		vlan = (void *)(eth + 1);
		if ((void *)(vlan + 1) > data_end)
			return decap_count(DECAP_STAT_PASS_NOT_ENCAP, pass);
		info->l2_len += sizeof(*vlan);
		proto = bpf_ntohs(vlan->encap_proto);
	}
	if (proto == ETH_P_IP)
		return decap_parse_v4(data + info->l2_len, data_end, info, pass, drop);
	if (proto == ETH_P_IPV6)
		return decap_parse_v6(data + info->l2_len, data_end, info, pass, drop);
	return decap_count(DECAP_STAT_PASS_NOT_ENCAP, pass);
}

#endif /* XLB_DECAP_PARSE_H */
