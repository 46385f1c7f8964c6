/* bounds.h - values the oldest supported verifier (Linux 6.1) can bound.
 *
 * Linux 6.1's verifier does not track the result of a byte swap (BPF_END, what bpf_ntohs
 * compiles to): the swapped value is an unbounded scalar, so adding a length read from a
 * header to a packet pointer fails with
 *     math between pkt pointer and register with unbounded min value is not allowed
 * (6.12 and 6.18 know the result of a 16-bit swap fits 16 bits and accept the same code).
 * bounds_ntohs masks the swapped value to 16 bits; the empty asm keeps the compiler, which
 * knows the mask is a no-op, from dropping it. One AND per header length read.
 */
#ifndef XLB_BOUNDS_H
#define XLB_BOUNDS_H

static __always_inline __u32 bounds_ntohs(__be16 v)
{
	__u32 h = bpf_ntohs(v);

	asm volatile("" : "+r"(h));
	return h & 0xffff;
}

#endif /* XLB_BOUNDS_H */
