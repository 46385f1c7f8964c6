/* balancer.c - the XDP load balancer: VIP lookup, connection table, Maglev ring, encapsulation.
 * Skeleton: counts and passes everything until the pipeline lands.
 */
#include <uapi/linux/bpf.h>
#include "maps.h"

int xdp_balancer(struct xdp_md *ctx)
{
	__u32 slot = STAT_XDP_PASS;
	__u64 *cnt = glob_stats.lookup(&slot);

	if (cnt)
		*cnt += 1;
	return XDP_PASS;
}
