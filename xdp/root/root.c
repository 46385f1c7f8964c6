/* root.c - xlb's root XDP program (docs/chain.md): attached to the interface instead of the
 * balancer when the chain is on, it runs the operator's filters, then the balancer, through
 * tail calls into the pinned program array xdp_chain (layout in chain.h). Replacing a slot
 * (a filter or the balancer upgraded) is one atomic map update: no packet sees a gap.
 *
 * Nothing here touches the packet: the cost is the tail call (bench_dataplane's chain rows).
 */
#include <uapi/linux/bpf.h>

#include "root/chain.h"

/* The chain: filters in slots 0 .. CHAIN_BALANCER_SLOT - 1, the balancer in the last. */
BPF_PROG_ARRAY(xdp_chain, CHAIN_SLOTS);

int xdp_root(struct xdp_md *ctx)
{
	/* A tail call that succeeds does not return; an empty slot falls through to the next. */
#pragma unroll
	for (int i = 0; i < CHAIN_SLOTS; i++)
		xdp_chain.call(ctx, i);
	/* Nothing in the chain, not even the balancer (being replaced by hand): the stack. */
	return XDP_PASS;
}
