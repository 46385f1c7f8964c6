/* decap.h - constants, counter slots and shared structs of the backend decap programs.
 *
 * The decap programs (xdp/decap/decap.c) run on backends, not on the balancer: they strip the
 * IPIP / IPv6 / GUE header the balancer added and hand the inner packet to the stack. They
 * keep their own constants and maps so they never depend on the balancer's headers.
 * Counter slots are mirrored by name in lb/dataplane/decap.py; tests/dataplane/test_decap.py parses
 * this file and compares.
 */
#ifndef XLB_DECAP_H
#define XLB_DECAP_H

/* Addresses the backend decapsulates for (entries of decap_addrs). */
#ifndef DECAP_MAX_ADDRS
#define DECAP_MAX_ADDRS 64
#endif

/* GUE destination port used while decap_cfg holds 0 (host order). */
#ifndef DECAP_DEFAULT_GUE_PORT
#define DECAP_DEFAULT_GUE_PORT 6080
#endif

/* Address families as stored in decap_addr.family (the balancer's FAMILY_V4 / FAMILY_V6). */
#define DECAP_FAMILY_V4 4
#define DECAP_FAMILY_V6 6

/* IP version numbers (the first nibble of an IP header; GUE variant 1 dispatches on it). */
#define DECAP_IP_VERSION_4 4
#define DECAP_IP_VERSION_6 6

/* Shift that moves the version nibble out of an IP header's first byte. */
#define DECAP_VERSION_SHIFT 4

/* Bytes per unit of the IPv4 IHL field. */
#define DECAP_IHL_UNIT 4

/* IPv4 "more fragments" flag and fragment offset mask (frag_off, host order). */
#define DECAP_IP_MF 0x2000
#define DECAP_IP_OFFSET 0x1fff

/* 802.1Q ethertype (host order). */
#define DECAP_ETH_P_8021Q 0x8100

/* Difference between an IPv6 and an IPv4 base header: what bpf_skb_change_proto adds/removes. */
#define DECAP_V6_V4_DIFF 20

/* Bytes tc_decap wants linear before parsing: Ethernet + 802.1Q (18), IPv6 (40), UDP (8), a
 * second-hop GUE header (24), the inner IPv6 (40) and TCP (20) headers a second-chance lookup
 * reads (150); or IPv4 with options (60), UDP and inner IPv6 (126); rounded up.
 */
#define DECAP_PULL_LEN 192

/* Counter slots (decap_stats index). Every decap, pass and drop has one. */
enum decap_stat {
	/* Decapsulated: IPv4 in IPv4 (outer protocol 4). */
	DECAP_STAT_IPIP = 0,
	/* Decapsulated: IPv6 in IPv6 (outer next header 41). */
	DECAP_STAT_IP6IP6,
	/* Decapsulated: IPv4 in IPv6 (outer next header 4). */
	DECAP_STAT_IP4IN6,
	/* Decapsulated: GUE variant 1 over IPv4 (inner IPv4 or IPv6). */
	DECAP_STAT_GUE_V4,
	/* Decapsulated: GUE variant 1 over IPv6 (inner IPv4 or IPv6). */
	DECAP_STAT_GUE_V6,
	/* Passed untouched: not IP, or not a tunnel protocol / not the GUE port. */
	DECAP_STAT_PASS_NOT_ENCAP,
	/* Passed untouched: tunnel protocol, but the outer destination is not in decap_addrs. */
	DECAP_STAT_PASS_NOT_LOCAL,
	/* Passed untouched: an outer IPv4 fragment to a local address (the stack reassembles). */
	DECAP_STAT_PASS_FRAG,
	/* Dropped: tunnel packet to a local address with a malformed or truncated header. */
	DECAP_STAT_DROP_MALFORMED,
	/* Dropped: a packet-resizing helper failed half way (headroom, skb state). */
	DECAP_STAT_DROP_ADJUST,
	/* Second chance (second.h), packets that name a second hop: kept as a TCP SYN; */
	DECAP_STAT_SC_KEEP_SYN,
	/* kept: a local socket (TCP, or connected UDP) has the flow; */
	DECAP_STAT_SC_KEEP_SOCKET,
	/* kept: an ACK completing a valid SYN cookie of a local listener; */
	DECAP_STAT_SC_KEEP_COOKIE,
	/* kept: no hop left (passed on to us by the first backend), the hop is us, or TTL; */
	DECAP_STAT_SC_KEEP_LAST,
	/* kept: nothing to look up (not TCP/UDP, inner IPv4 options or fragment, short); */
	DECAP_STAT_SC_KEEP_OTHER,
	/* passed on to the second hop (not ours). */
	DECAP_STAT_SC_FORWARD,
	DECAP_STAT_MAX,
};

/* Key of decap_addrs: one of the backend's own addresses; IPv4 in addr[0], rest zero. */
struct decap_addr {
	__be32 addr[4];
	__u32 family;
};

/* Runtime configuration: decap_cfg[0], written by lb/dataplane/decap.py. */
struct decap_cfg {
	/* GUE destination UDP port, network order; 0 = DECAP_DEFAULT_GUE_PORT. */
	__be16 gue_port;
	__u16 pad;
};

/* An 802.1Q tag as it sits after the Ethernet addresses (not in the UAPI headers). */
struct decap_vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

#endif /* XLB_DECAP_H */
