/* stats.h - per-CPU counter helpers: global slots (enum glob_stat), per VIP, per backend.
 *
 * BCC rewrites map accesses (`glob_stats.lookup(...)`) only in the main source file, so the
 * helpers that touch maps are declared here and defined in balancer.c; a map access in a
 * header compiles to an indirect call the verifier rejects ("unknown opcode 8d", BCC 0.26).
 * Every counter map is a per-CPU array, so a plain increment is race-free.
 */
#ifndef XLB_STATS_H
#define XLB_STATS_H

#include "balancer/maps.h"

/* Add one to a global counter slot (balancer.c). */
static __always_inline void stats_inc(__u32 slot);

/* Count one packet of `bytes` (IP length as received) for a VIP; `new_conn` when it picked
 * a new flow (balancer.c).
 */
static __always_inline void stats_vip(__u32 vip_num, __u32 bytes, int new_conn);

/* Count one packet of `bytes` (outer IP length, as sent) for a backend (balancer.c). */
static __always_inline void stats_real(__u32 real_idx, __u32 bytes);

/* Count `slot` and hand back `action` as a verdict word naming `slot` (events.h), so a helper
 * can write `return stats_verdict(...)`.
 */
static __always_inline int stats_verdict(__u32 slot, int action)
{
	stats_inc(slot);
	return EV_VERDICT(action, slot);
}

#endif /* XLB_STATS_H */
