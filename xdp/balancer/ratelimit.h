/* ratelimit.h - token buckets for what the balancer sends on its own: ICMP echo replies and
 * too-big replies (RL_* slots of rl_buckets, one bucket per CPU each, so no atomics). Rates
 * and depths come from guard_cfg; a rate of 0 is no limit. A reply whose bucket is empty is
 * not sent: the request is dropped and counted (STAT_ICMP_ECHO_LIMITED, STAT_TOO_BIG_LIMITED).
 */
#ifndef XLB_RATELIMIT_H
#define XLB_RATELIMIT_H

#include "common/consts.h"
#include "common/structs.h"

/* Nanoseconds per second, for the bucket's credit. */
#define RL_NSEC 1000000000ULL

/* Take one token from bucket `slot` (balancer.c): 1 when the reply may go. */
static __always_inline int rl_take(__u32 slot);

/* Credit bucket `b` for the time since it was last credited, at `rate` per second up to
 * `burst`, and take one token: 1 when there was one. Only whole tokens are credited, and
 * last_ns advances by what they are worth, so slow packets still refill it.
 */
static __always_inline int rl_bucket_take(struct rl_bucket *b, __u64 now, __u64 rate,
					  __u64 burst)
{
	__u64 elapsed = now - b->last_ns, add;

	if (elapsed >= RL_REFILL_NS) {
		b->tokens = burst;
		b->last_ns = now;
	} else {
		add = elapsed * rate / RL_NSEC;
		if (add) {
			b->tokens += add;
			b->last_ns += add * RL_NSEC / rate;
			if (b->tokens >= burst) {
				b->tokens = burst;
				b->last_ns = now;
			}
		}
	}
	if (!b->tokens)
		return 0;
	b->tokens -= 1;
	return 1;
}

#endif /* XLB_RATELIMIT_H */
