/* hash.h - the flow hash that picks a Maglev ring slot: Bob Jenkins' lookup3 "jhash" as in
 * the kernel's include/linux/jhash.h (and Katran), written out here.
 *
 * The flow hash of a client->VIP 5-tuple is
 *   IPv4: jhash_3words(src, dst, ports, HASH_SEED + proto)
 *   IPv6: jhash2({src[0..3], dst[0..3], ports}, 9, HASH_SEED + proto)
 * where every word is the u32 read from the packet's network-order bytes in host order
 * (little-endian on x86), and `ports` is the word holding the source port in its first two
 * bytes and the destination port in the last two. With F_HASH_SRC_ONLY `ports` is 0.
 * A ring slot is hash % RING_SIZE. lb/dataplane/flowhash.py reimplements this exactly.
 */
#ifndef XLB_HASH_H
#define XLB_HASH_H

/* Seed of the flow hash; any constant works, it only has to be the same everywhere. */
#define HASH_SEED 0x786c6221

/* lookup3's arbitrary initial value. */
#define HASH_JHASH_INITVAL 0xdeadbeef

/* Rotate left. */
static __always_inline __u32 hash_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

/* lookup3 mix() of three words. */
#define HASH_JHASH_MIX(a, b, c)                  \
	{                                        \
		a -= c; a ^= hash_rol32(c, 4);   \
		c += b;                          \
		b -= a; b ^= hash_rol32(a, 6);   \
		a += c;                          \
		c -= b; c ^= hash_rol32(b, 8);   \
		b += a;                          \
		a -= c; a ^= hash_rol32(c, 16);  \
		c += b;                          \
		b -= a; b ^= hash_rol32(a, 19);  \
		a += c;                          \
		c -= b; c ^= hash_rol32(b, 4);   \
		b += a;                          \
	}

/* lookup3 final() of three words. */
#define HASH_JHASH_FINAL(a, b, c)                \
	{                                        \
		c ^= b; c -= hash_rol32(b, 14);  \
		a ^= c; a -= hash_rol32(c, 11);  \
		b ^= a; b -= hash_rol32(a, 25);  \
		c ^= b; c -= hash_rol32(b, 16);  \
		a ^= c; a -= hash_rol32(c, 4);   \
		b ^= a; b -= hash_rol32(a, 14);  \
		c ^= b; c -= hash_rol32(b, 24);  \
	}

/* The kernel's jhash_3words(); the final state's other two words in *second (b) and
 * *third (a).
 */
static __always_inline __u32 hash_jhash_3words3(__u32 a, __u32 b, __u32 c, __u32 initval,
						__u32 *second, __u32 *third)
{
	initval += HASH_JHASH_INITVAL + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	HASH_JHASH_FINAL(a, b, c);
	*second = b;
	*third = a;
	return c;
}

/* The kernel's jhash_3words(). */
static __always_inline __u32 hash_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	__u32 b_out, a_out;

	return hash_jhash_3words3(a, b, c, initval, &b_out, &a_out);
}

/* The kernel's jhash2() for exactly nine words (an IPv6 5-tuple), unrolled, and the final
 * state's other two words in *second (b) and *third (a); the ninth word is passed by value so
 * the ports can be left out without copying the key.
 */
static __always_inline __u32 hash_jhash2_9_3(const __u32 *k, __u32 k8, __u32 initval,
					     __u32 *second, __u32 *third)
{
	__u32 a, b, c;

	a = b = c = HASH_JHASH_INITVAL + (9 << 2) + initval;
	a += k[0];
	b += k[1];
	c += k[2];
	HASH_JHASH_MIX(a, b, c);
	a += k[3];
	b += k[4];
	c += k[5];
	HASH_JHASH_MIX(a, b, c);
	a += k[6];
	b += k[7];
	c += k8;
	HASH_JHASH_FINAL(a, b, c);
	*second = b;
	*third = a;
	return c;
}

/* The kernel's jhash2() for exactly nine words. */
static __always_inline __u32 hash_jhash2_9(const __u32 *k, __u32 k8, __u32 initval)
{
	__u32 b_out, a_out;

	return hash_jhash2_9_3(k, k8, initval, &b_out, &a_out);
}

/* The flow hash of a client->VIP 5-tuple (see the top of this file). */
static __always_inline __u32 hash_flow(const struct flow_key *f, int src_only)
{
	__u32 ports = 0;
	__u32 initval = HASH_SEED + f->proto;

	if (!src_only)
		__builtin_memcpy(&ports, &f->sport, sizeof(ports));
	if (f->family == FAMILY_V4)
		return hash_jhash_3words(f->src[0], f->dst[0], ports, initval);
	/* src[4] then dst[4]: the first eight words of the key. */
	return hash_jhash2_9((const __u32 *)f, ports, initval);
}

/* Multiplier of a VIP-backend pair's pair_cache slot (Knuth's, 2^32 / golden ratio). */
#define PAIR_SLOT_MULT 0x9e3779b1

/* The pair_cache slot of (VIP number, backend index): the top PAIR_SLOTS_LOG2 bits of
 * ((vip_num << 16) ^ real_idx) * PAIR_SLOT_MULT. lb/dataplane/flowhash.py mirrors it.
 */
static __always_inline __u32 hash_pair_slot(__u32 vip_num, __u32 real_idx)
{
	return ((vip_num << 16) ^ real_idx) * PAIR_SLOT_MULT >> (32 - PAIR_SLOTS_LOG2);
}

/* The connection-table hash of a flow's full 5-tuple (docs/conn-table.md): the flow hash's
 * words with initval seed + proto + (family << 8), ONE pass, all three words of
 * lookup3's final state: returns c (the set index comes from it) and stores b in *second and
 * a in *third (the tag). lb/dataplane/flowhash.py mirrors it.
 */
static __always_inline __u32 conn_hash3(const struct flow_key *f, __u32 seed, __u32 *second,
				       __u32 *third)
{
	__u32 ports;
	__u32 initval = seed + f->proto + ((__u32)f->family << 8);

	__builtin_memcpy(&ports, &f->sport, sizeof(ports));
	if (f->family == FAMILY_V4)
		return hash_jhash_3words3(f->src[0], f->dst[0], ports, initval, second, third);
	return hash_jhash2_9_3((const __u32 *)f, ports, initval, second, third);
}

#endif /* XLB_HASH_H */
