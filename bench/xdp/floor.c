/* floor.c - the benchmark's reference programs, measured by bench/bench_dataplane.py in the
 * same runs as the balancer:
 *  - xdp_floor: swap the MAC addresses and send the frame back (XDP_TX), the least any
 *    forwarding XDP program does; the balancer's paths are reported above it.
 *  - xdp_floor_lru: the same plus one lookup (TCP SYN: one update) of the packet's 5-tuple in
 *    a kernel LRU hash as large as the balancer's conn_table: what a connection table built
 *    on the kernel's hash map (Katran's kind, and ours before docs/conn-table.md) costs on
 *    its own, on the day of the run.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>

#include "common/consts.h"
#include "common/structs.h"

/* Value of the LRU reference: what the kernel-LRU connection table kept per flow. */
struct floor_lru_val {
	__u32 real_idx;
	__u32 pad;
	__u64 atime;
};

/* A kernel LRU hash of the connection table's size, keyed by the 5-tuple, with per-CPU LRU
 * lists: what the balancer's table was before docs/conn-table.md, kept as the reference.
 */
BPF_F_TABLE("lru_hash", struct flow_key, struct floor_lru_val, floor_lru, CONN_TABLE_SIZE,
	    BPF_F_NO_COMMON_LRU);

/* Swap the MAC addresses of a frame whose Ethernet header is in bounds. */
static __always_inline void floor_swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

int xdp_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	floor_swap_macs(eth);
	return XDP_TX;
}

int xdp_floor_lru(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct flow_key key = {};
	struct floor_lru_val val = {};
	struct ipv6hdr *ip6h;
	struct iphdr *iph;
	struct tcphdr *th;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == __constant_htons(ETH_P_IP)) {
		iph = (void *)(eth + 1);
		th = (void *)(iph + 1);
		if ((void *)(th + 1) > data_end)
			return XDP_PASS;
		key.src[0] = iph->saddr;
		key.dst[0] = iph->daddr;
		key.family = FAMILY_V4;
	} else {
		ip6h = (void *)(eth + 1);
		th = (void *)(ip6h + 1);
		if ((void *)(th + 1) > data_end)
			return XDP_PASS;
		__builtin_memcpy(key.src, &ip6h->saddr, sizeof(key.src));
		__builtin_memcpy(key.dst, &ip6h->daddr, sizeof(key.dst));
		key.family = FAMILY_V6;
	}
	key.sport = th->source;
	key.dport = th->dest;
	key.proto = IPPROTO_TCP;
	if (th->syn) {
		val.real_idx = 1;
		floor_lru.update(&key, &val);
	} else if (!floor_lru.lookup(&key)) {
		return XDP_DROP;
	}
	floor_swap_macs(eth);
	return XDP_TX;
}
