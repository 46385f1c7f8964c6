/* csum.h - Internet checksum (RFC 1071) helpers: fold, incremental update (RFC 1624), the
 * outer IPv4 header sum and a bounded sum over packet bytes for the ICMP replies we build.
 *
 * Sums are taken over 16-bit words loaded in host order; the one's-complement sum is
 * byte-order independent, so storing the folded result back in host order is correct
 * (RFC 1071 section 2(B)). The odd trailing byte is added as a word padded with a zero byte,
 * which on a little-endian host is the byte's own value.
 */
#ifndef XLB_CSUM_H
#define XLB_CSUM_H

/* Largest byte count csum_add_pkt sums: an ICMPv6 packet-too-big (8-byte header + 1232 bytes
 * of quote) with room to spare. Bounds the verifier's walk of the loop.
 */
#define CSUM_MAX_BYTES 1280

/* Fold a 32-bit accumulator of 16-bit words into the final 16-bit checksum. */
static __always_inline __u16 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* RFC 1624 eqn. 3: checksum after one 16-bit word changes from `old` to `new` (all as stored).
 * One's-complement addition yields -0 (0xffff) where the data's true sum is +0, which would
 * give the all-zero message (an echo reply with id 0, seq 0 and no data) the checksum 0x0000,
 * which fails verification. 0xffff verifies in every case, so it replaces 0x0000.
 */
static __always_inline __u16 csum_update16(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check;
	__u16 folded;

	sum += (__u16)~old;
	sum += new;
	folded = csum_fold32(sum);
	return folded ? folded : 0xffff;
}

/* Checksum of a 20-byte IPv4 header whose check field is zero. */
static __always_inline __u16 csum_ipv4_hdr(const void *iph)
{
	const __u16 *w = iph;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	return csum_fold32(sum);
}

/* Sum 16 bytes (an IPv6 address) into an accumulator. */
static __always_inline __u32 csum_add_addr6(__u32 sum, const __be32 *addr)
{
	const __u16 *w = (const __u16 *)addr;

#pragma unroll
	for (int i = 0; i < 8; i++)
		sum += w[i];
	return sum;
}

/* Sum the packet bytes from `start` to data_end into `sum`; callers guarantee at most
 * CSUM_MAX_BYTES. Verifier: the bound check is on the pointer itself in every iteration, so
 * each load is proven in bounds, and the loop is bounded (bounded loops, kernel >= 5.3). It
 * is kept rolled: unrolled, it would be ~5000 instructions for a path that runs only for
 * too-big replies. The empty asm hides the pointer's evolution from clang, which otherwise
 * computes a trip count from data_end - p and vectorises the loop, and the verifier rejects
 * that arithmetic on data_end ("pointer arithmetic on pkt_end prohibited", LLVM 14).
 */
static __always_inline __u32 csum_add_pkt(void *start, void *data_end, __u32 sum)
{
	__u16 *p = start;
	__u8 *last;

#pragma clang loop unroll(disable) vectorize(disable) interleave(disable)
	for (int i = 0; i < CSUM_MAX_BYTES / 2; i++) {
		asm volatile("" : "+r"(p));
		if ((void *)(p + 1) > data_end)
			break;
		sum += *p;
		p++;
	}
	last = (__u8 *)p;
	if ((void *)(last + 1) > data_end)
		return sum;
	return sum + *last;
}

#endif /* XLB_CSUM_H */
