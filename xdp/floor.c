/* floor.c - the benchmark's floor: swap the MAC addresses and send the frame back (XDP_TX),
 * the least any forwarding XDP program does. bench/bench_dataplane.py measures it in the same
 * run as the balancer and reports the balancer's paths above it.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>

int xdp_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 tmp[ETH_ALEN];

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
	return XDP_TX;
}
