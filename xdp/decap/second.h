/* second.h - second chance on the backend (docs/second-chance.md): what the decap programs
 * do with a GUE packet that names a second hop (the wire format is xdp/common/gue.h).
 *
 * The packet is kept (decapsulated as usual) when it is this backend's:
 *   - a TCP SYN (without ACK): a new connection, the slot's backend takes it;
 *   - TCP matching a local socket (bpf_skc_lookup_tcp in the backend's netns): established,
 *     a request socket (SYN_RECV) or TIME_WAIT;
 *   - TCP matching only a listener, when it is an ACK completing a valid SYN cookie
 *     (bpf_tcp_check_syncookie; cookies are only valid after the listener's queue
 *     overflowed, and only for a listener of the inner packet's family);
 *   - UDP matching a connected socket (bpf_sk_lookup_udp, state ESTABLISHED). An unconnected
 *     (bound) socket matches every client, so it says nothing about the flow: such a packet
 *     goes on to the second hop, which keeps it (its hop count is spent). UDP services that
 *     answer from unbound sockets are served by the previous backend until the window ends;
 *   - no hop left (the packet already was passed on once), the second hop is this host, or
 *     the outer TTL / hop limit would run out;
 *   - not TCP or UDP, IPv4 options, fragments (nothing to look up).
 * Otherwise it is passed on to the second hop: outer source = the address it was sent to,
 * outer destination = the second hop, hops left minus one, TTL minus one, outer UDP
 * checksum 0; back out of the interface it came in on, to the neighbour that sent it (the
 * MAC addresses swapped: the router, as the balancer's "LB on a stick" does). XDP returns
 * XDP_TX (on a veth, the peer needs an XDP program for XDP_TX to deliver), tc redirects to
 * the device's egress.
 * Every outcome has a counter (DECAP_STAT_SC_*); a kept packet also counts its GUE slot.
 *
 * Only bpf helpers, no maps: the includer (decap.c, via decap_parse.h) defines decap_count.
 */
#ifndef XLB_DECAP_SECOND_H
#define XLB_DECAP_SECOND_H

#include <uapi/linux/tcp.h>

#include "common/gue.h"
#include "common/csum.h"

/* decap_second's answers. */
#define SECOND_KEEP 0
#define SECOND_FORWARD 1

/* Offsets from the outer IP header of a second-hop packet (outer IPv4 without options):
 * UDP, GUE header, private data, address, inner IP.
 */
#define SECOND_V4_PRIV (20 + 8 + 4)
#define SECOND_V4_INNER (SECOND_V4_PRIV + 4 + 4)
#define SECOND_V6_PRIV (40 + 8 + 4)
#define SECOND_V6_INNER (SECOND_V6_PRIV + 4 + 16)

/* Bytes of inner IPv4 / IPv6 header the lookups need before the transport header. */
#define SECOND_IP4_LEN 20
#define SECOND_IP6_LEN 40

/* A GUE variant 0 header at `at` with `avail` bytes of UDP payload; `outer_len` is what
 * decap_parse counted so far (outer IP header + UDP). Returns the GUE header's length
 * (header + optional fields) and the inner version in *want, or 0 when malformed or a
 * control message. Marks info->second when it is exactly a second-hop header.
 */
static __always_inline __u32 second_parse_gue(void *at, void *data_end, __u32 avail,
					      struct decap_info *info, __u8 *want)
{
	struct gue_hdr *gh = at;
	struct gue_second *gs = (void *)(gh + 1);
	__u32 len, hlen, v4 = info->outer_proto == ETH_P_IP;

	if ((void *)(gh + 1) > data_end || avail < sizeof(*gh) || (gh->ver_hlen & GUE_C_BIT))
		return 0;
	hlen = gh->ver_hlen & GUE_HLEN_MASK;
	len = sizeof(*gh) + hlen * GUE_WORD;
	if (len > avail)
		return 0;
	if (gh->proto == IPPROTO_IPIP)
		*want = DECAP_IP_VERSION_4;
	else if (gh->proto == IPPROTO_IPV6)
		*want = DECAP_IP_VERSION_6;
	else
		return 0;
	/* Anything else in the private data (another sender's, extension fields) is just
	 * stripped.
	 */
	if (gh->flags || (void *)(gs + 1) > data_end || gs->type != bpf_htons(GUE_PRIV_SECOND))
		return len;
	if (v4 && (hlen != GUE_HLEN_SECOND_V4 || gs->family != DECAP_FAMILY_V4 ||
		   info->outer_len != sizeof(struct iphdr) + sizeof(struct udphdr)))
		return len;
	if (!v4 && (hlen != GUE_HLEN_SECOND_V6 || gs->family != DECAP_FAMILY_V6))
		return len;
	info->second = 1;
	info->hops = gs->hops;
	return len;
}

/* TCP: keep a SYN, a packet of a local socket, an ACK with a valid cookie (see the top). */
static __always_inline int second_tcp(void *ctx, struct bpf_sock_tuple *tup, __u32 tlen,
				      void *iph, __u32 iph_len, struct tcphdr *th)
{
	struct bpf_sock *sk;
	int ret;

	if (th->syn && !th->ack)
		return decap_count(DECAP_STAT_SC_KEEP_SYN, SECOND_KEEP);
	sk = bpf_skc_lookup_tcp(ctx, tup, tlen, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return SECOND_FORWARD;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return decap_count(DECAP_STAT_SC_KEEP_SOCKET, SECOND_KEEP);
	}
	ret = bpf_tcp_check_syncookie(sk, iph, iph_len, th, sizeof(*th));
	bpf_sk_release(sk);
	if (!ret)
		return decap_count(DECAP_STAT_SC_KEEP_COOKIE, SECOND_KEEP);
	return SECOND_FORWARD;
}

/* UDP: keep a packet of a connected socket (see the top). */
static __always_inline int second_udp(void *ctx, struct bpf_sock_tuple *tup, __u32 tlen,
				      struct udphdr *uh)
{
	struct bpf_sock *sk;
	int connected;

	sk = bpf_sk_lookup_udp(ctx, tup, tlen, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return SECOND_FORWARD;
	connected = sk->state == BPF_TCP_ESTABLISHED;
	bpf_sk_release(sk);
	if (connected)
		return decap_count(DECAP_STAT_SC_KEEP_SOCKET, SECOND_KEEP);
	return SECOND_FORWARD;
}

/* Keep or pass on a second-hop packet (info->second set by decap_parse): SECOND_KEEP
 * (counted by reason) or SECOND_FORWARD (counted by the caller once second_rewrite did it).
 */
static __always_inline int second_decide(void *ctx, void *data, void *data_end,
					 struct decap_info *info)
{
	void *l3 = data + info->l2_len;
	struct bpf_sock_tuple tup = {};
	struct ipv6hdr *ip6h;
	struct iphdr *iph;
	void *l4;
	__u32 tlen;
	__u8 proto;

	if (!info->hops)
		return decap_count(DECAP_STAT_SC_KEEP_LAST, SECOND_KEEP);
	if (info->inner_proto == ETH_P_IP) {
		iph = l3 + (info->outer_proto == ETH_P_IP ? SECOND_V4_INNER : SECOND_V6_INNER);
		if ((void *)(iph + 1) > data_end || iph->ihl != 5 ||
		    (iph->frag_off & bpf_htons(DECAP_IP_MF | DECAP_IP_OFFSET)))
			return decap_count(DECAP_STAT_SC_KEEP_OTHER, SECOND_KEEP);
		tup.ipv4.saddr = iph->saddr;
		tup.ipv4.daddr = iph->daddr;
		tlen = sizeof(tup.ipv4);
		proto = iph->protocol;
		l4 = iph + 1;
	} else {
		ip6h = l3 + (info->outer_proto == ETH_P_IP ? SECOND_V4_INNER : SECOND_V6_INNER);
		if ((void *)(ip6h + 1) > data_end)
			return decap_count(DECAP_STAT_SC_KEEP_OTHER, SECOND_KEEP);
		__builtin_memcpy(tup.ipv6.saddr, ip6h->saddr.in6_u.u6_addr32, 16);
		__builtin_memcpy(tup.ipv6.daddr, ip6h->daddr.in6_u.u6_addr32, 16);
		tlen = sizeof(tup.ipv6);
		proto = ip6h->nexthdr;
		l4 = ip6h + 1;
	}
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return decap_count(DECAP_STAT_SC_KEEP_OTHER, SECOND_KEEP);
		if (tlen == sizeof(tup.ipv4)) {
			tup.ipv4.sport = th->source;
			tup.ipv4.dport = th->dest;
			return second_tcp(ctx, &tup, sizeof(tup.ipv4), l4 - SECOND_IP4_LEN,
					  SECOND_IP4_LEN, th);
		}
		tup.ipv6.sport = th->source;
		tup.ipv6.dport = th->dest;
		return second_tcp(ctx, &tup, sizeof(tup.ipv6), l4 - SECOND_IP6_LEN,
				  SECOND_IP6_LEN, th);
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return decap_count(DECAP_STAT_SC_KEEP_OTHER, SECOND_KEEP);
		if (tlen == sizeof(tup.ipv4)) {
			tup.ipv4.sport = uh->source;
			tup.ipv4.dport = uh->dest;
			return second_udp(ctx, &tup, sizeof(tup.ipv4), uh);
		}
		tup.ipv6.sport = uh->source;
		tup.ipv6.dport = uh->dest;
		return second_udp(ctx, &tup, sizeof(tup.ipv6), uh);
	}
	return decap_count(DECAP_STAT_SC_KEEP_OTHER, SECOND_KEEP);
}

/* Rewrite a second-hop packet in place for its trip to the second hop (see the top).
 * 0 done, -1 when it cannot go on (TTL spent, the hop is this host, short): the caller
 * keeps it then, counted DECAP_STAT_SC_KEEP_LAST.
 */
static __always_inline int second_rewrite(void *data, void *data_end, struct decap_info *info)
{
	struct ethhdr *eth = data;
	void *l3 = data + info->l2_len;
	struct gue_second *gs;
	struct ipv6hdr *ip6h;
	struct iphdr *iph;
	struct udphdr *uh;
	__be32 *next;
	__u8 mac[ETH_ALEN];

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (info->outer_proto == ETH_P_IP) {
		iph = l3;
		uh = l3 + sizeof(*iph);
		gs = l3 + SECOND_V4_PRIV;
		next = (void *)(gs + 1);
		if ((void *)(next + 1) > data_end || iph->ttl <= 1 || *next == iph->daddr)
			return -1;
		iph->saddr = iph->daddr;
		iph->daddr = *next;
		iph->ttl--;
		iph->check = 0;
		iph->check = csum_ipv4_hdr(iph);
	} else {
		ip6h = l3;
		uh = l3 + sizeof(*ip6h);
		gs = l3 + SECOND_V6_PRIV;
		next = (void *)(gs + 1);
		if ((void *)(next + 4) > data_end || ip6h->hop_limit <= 1)
			return -1;
		if (!((next[0] ^ ip6h->daddr.in6_u.u6_addr32[0]) |
		      (next[1] ^ ip6h->daddr.in6_u.u6_addr32[1]) |
		      (next[2] ^ ip6h->daddr.in6_u.u6_addr32[2]) |
		      (next[3] ^ ip6h->daddr.in6_u.u6_addr32[3])))
			return -1;
		__builtin_memcpy(&ip6h->saddr, &ip6h->daddr, sizeof(ip6h->saddr));
		__builtin_memcpy(&ip6h->daddr, next, sizeof(ip6h->daddr));
		ip6h->hop_limit--;
	}
	uh->check = 0;
	gs->hops--;
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	return 0;
}

#endif /* XLB_DECAP_SECOND_H */
