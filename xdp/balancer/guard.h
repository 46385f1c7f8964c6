/* guard.h - the SYN-flood guard (docs/protection.md). A SYN is the one packet anybody can
 * send from any source, so with the guard on (GUARD_MODE_AUTO, the default, or ALWAYS) a
 * SYN never evicts: it inserts only into a free, expired or its own slot, and a flow whose
 * set is full of live entries is tracked from its next packet (the handshake's ACK), which
 * may evict the set's oldest entry as before.
 *
 * In flood mode (GUARD_MODE_ALWAYS, or AUTO while this CPU has seen more than
 * guard_cfg.syn_per_window SYNs in the current guard window, or did in the window before) a
 * SYN does not touch the table at all: it follows the VIP's ring statelessly, so spoofed
 * SYNs cannot even fill the free slots; and the second packet that inserts never evicts a
 * live entry. A real client's connection lands where the ring says, as its SYN did.
 *
 * The window state is per CPU (guard_state), so no atomics; it and the configuration are
 * maps, so `guard_admit` is declared here and defined in balancer.c.
 */
#ifndef XLB_GUARD_H
#define XLB_GUARD_H

#include "common/consts.h"
#include "common/structs.h"
#include "balancer/stats.h"

/* What a table miss of this packet may write (GUARD_INS_*); `syn` when it is a TCP SYN.
 * Counts the SYN in the CPU's window (balancer.c).
 */
static __always_inline int guard_admit(int syn);

/* Advance the CPU's window state `st` to window `w` and count a SYN: 1 when in flood mode.
 * A window that ends above the threshold keeps the next one in flood mode from its start.
 */
static __always_inline int guard_step(struct guard_state *st, __u64 w, int syn, __u64 threshold)
{
	int was_over;

	if (w != st->window) {
		was_over = w == st->window + 1 && st->syns > threshold;
		st->window = w;
		st->syns = 0;
		st->flood = was_over;
		if (was_over)
			stats_inc(STAT_GUARD_FLOOD);
	}
	if (syn) {
		st->syns += 1;
		if (!st->flood && st->syns > threshold) {
			st->flood = 1;
			stats_inc(STAT_GUARD_FLOOD);
		}
	}
	return st->flood != 0;
}

#endif /* XLB_GUARD_H */
