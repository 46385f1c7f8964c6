/* conn.h - the connection table (docs/conn-table.md): a set-associative array of CONN_SETS
 * sets of CONN_WAYS slots. A flow's set index and 63-bit tag are two hashes of its 5-tuple; a
 * lookup reads one 128-byte set. Lock-free: writers claim a slot with cmpxchg on its tag,
 * readers re-read the tag after the meta word, and the program's stores are kept in order by
 * compiler barriers (x86 keeps stores, and loads, in program order).
 *
 * `conn_locate` reads the conn_table map, so it is declared here and defined in balancer.c
 * (BCC rewrites map accesses only in the main file); the rest works on the set it found.
 */
#ifndef XLB_CONN_H
#define XLB_CONN_H

#include "common/consts.h"
#include "common/structs.h"
#include "balancer/stats.h"

#define CONN_READ(x) (*(volatile __u64 *)&(x))
#define CONN_BARRIER() asm volatile("" ::: "memory")

/* A flow's place in the connection table. */
struct conn_ref {
	struct conn_set *set;
	__u64 tag;
	/* Now, in stamp units. */
	__u64 now;
	/* The UDP idle timeout, in stamp units. */
	__u64 udp_timeout;
	/* The TCP idle timeout, in stamp units; 0 = never. */
	__u64 tcp_timeout;
};

/* Units of CONN_STAMP_NS_SHIFT since `stamp`, modulo the stamp's width. */
static __always_inline __u64 conn_age(__u64 meta, __u64 now)
{
	return (now - (meta >> CONN_STAMP_SHIFT)) & CONN_STAMP_MASK;
}

/* Has the entry `meta` been idle past its protocol's timeout? */
static __always_inline int conn_expired(const struct conn_ref *ref, __u64 meta)
{
	__u64 age = conn_age(meta, ref->now);

	if (meta & CONN_F_UDP)
		return age > ref->udp_timeout;
	return ref->tcp_timeout && age > ref->tcp_timeout;
}

/* Locate the flow's set and compute its tag; 0 when the set cannot be read (balancer.c). */
static __always_inline int conn_locate(const struct flow_key *flow, const struct lb_cfg *cfg,
				       struct conn_ref *ref);

/* The slot holding the flow, its meta word in *meta; -1 when the flow has none. */
static __always_inline int conn_find(const struct conn_ref *ref, __u64 *meta)
{
	struct conn_set *s = ref->set;
	int i;

	/* Never NULL here (conn_locate returned 1), but Linux 6.1's verifier loses that through
	 * the spilled conn_ref on one path and refuses "R1 invalid mem access 'scalar'".
	 */
	if (!s)
		return -1;
#pragma unroll
	for (i = 0; i < CONN_WAYS; i++) {
		if (CONN_READ(s->way[i].tag) == ref->tag) {
			CONN_BARRIER();
			*meta = CONN_READ(s->way[i].meta);
			CONN_BARRIER();
			/* Rewritten meanwhile (claimed, or another flow): a miss. */
			if (CONN_READ(s->way[i].tag) != ref->tag)
				return -1;
			return i;
		}
	}
	return -1;
}

/* Write the flow's slot: its own if it has one, else a free slot, else an expired entry,
 * else the least recently seen one of the set (an eviction, counted), unless `no_evict`
 * (the SYN-flood guard, guard.h). A slot another CPU writes at the same moment is left to
 * it: the flow misses again on its next packet.
 */
static __always_inline void conn_insert(const struct conn_ref *ref, __u64 meta, int no_evict)
{
	struct conn_set *s = ref->set;
	__u64 seen = 0, oldest = 0, t, m, age;
	/* What the pick is: 4 the flow's own slot, 3 free, 2 expired, 1 live, 0 none. */
	int pick = -1, rank = 0, i;

	/* As in conn_find: a NULL check Linux 6.1's verifier needs to see. */
	if (!s)
		return;
#pragma unroll
	for (i = 0; i < CONN_WAYS; i++) {
		t = CONN_READ(s->way[i].tag);
		if (t == ref->tag) {
			pick = i;
			seen = t;
			rank = 4;
			break;
		}
		if (t == CONN_TAG_BUSY || rank >= 3)
			continue;
		if (t == CONN_TAG_EMPTY) {
			pick = i;
			seen = t;
			rank = 3;
			continue;
		}
		if (rank == 2)
			continue;
		m = CONN_READ(s->way[i].meta);
		age = conn_age(m, ref->now);
		if (conn_expired(ref, m)) {
			pick = i;
			seen = t;
			rank = 2;
		} else if (rank == 0 || age > oldest) {
			pick = i;
			seen = t;
			oldest = age;
			rank = 1;
		}
	}
	if (pick < 0)
		return;
	if (rank == 1 && no_evict) {
		stats_inc(STAT_GUARD_NO_EVICT);
		return;
	}
	pick &= CONN_WAYS - 1;
	if (__sync_val_compare_and_swap(&s->way[pick].tag, seen, CONN_TAG_BUSY) != seen)
		return;
	CONN_BARRIER();
	s->way[pick].meta = meta;
	CONN_BARRIER();
	s->way[pick].tag = ref->tag;
	if (rank == 1)
		stats_inc(STAT_CONN_EVICT);
}

#endif /* XLB_CONN_H */
