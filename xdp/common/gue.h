/* gue.h - the wire format of "second chance" (docs/second-chance.md), shared by the balancer
 * (xdp/balancer/second.h writes it) and the backends' decap (xdp/decap/second.h reads it).
 *
 * A packet that carries a second hop is GUE variant 0 (draft-ietf-intarea-gue-09 section
 * 3.1), not the "variant 1" (IP directly in UDP) of every other GUE packet:
 *
 *   outer IP | UDP (to the GUE port) | GUE header (4) | private data (4 + address) | inner IP
 *
 *   GUE header:    version 0 (2 bits), C 0 (1 bit), Hlen (5 bits, 32-bit words after the
 *                  header: the private data), Proto (inner: 4 or 41), Flags 0 (no extensions).
 *   private data:  __be16 type GUE_PRIV_SECOND, __u8 hops left, __u8 address family (4/6),
 *                  then the second hop's address: 4 bytes in an IPv4 outer packet, 16 in an
 *                  IPv6 one (the second hop always has the family of the first).
 *
 * A receiver tells the variants apart by the first two bits (00 = variant 0; an IP header
 * after the UDP header starts with 0100 or 0110).
 */
#ifndef XLB_GUE_H
#define XLB_GUE_H

/* Private-data type of a second hop ("xl"). */
#define GUE_PRIV_SECOND 0x786c

/* Hops the balancer grants: the first backend may pass the packet on once, never more. */
#define GUE_HOPS_INITIAL 1

/* Hlen of a second-hop header: 1 word of type/hops/family plus the address. */
#define GUE_HLEN_SECOND_V4 2
#define GUE_HLEN_SECOND_V6 5

/* Shift of the version bits in the first byte, and the Hlen mask. */
#define GUE_VERSION_SHIFT 6
#define GUE_C_BIT 0x20
#define GUE_HLEN_MASK 0x1f

/* Bytes per Hlen unit. */
#define GUE_WORD 4

/* The fixed GUE header (variant 0). */
struct gue_hdr {
	/* version (0) << 6 | C << 5 | Hlen */
	__u8 ver_hlen;
	/* The inner protocol: IPPROTO_IPIP (4) or IPPROTO_IPV6 (41). */
	__u8 proto;
	__be16 flags;
};

/* The private data that names a second hop; the address follows. */
struct gue_second {
	__be16 type;
	__u8 hops;
	__u8 family;
};

#endif /* XLB_GUE_H */
