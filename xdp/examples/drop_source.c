/* drop_source.c - an example operator filter for xlb's XDP chain (docs/chain.md): drops
 * IPv4 packets from the sources listed in its map drop_src and passes everything else on to
 * the rest of the chain (the balancer last). A libbpf program, built with clang and loaded
 * and pinned with bpftool, reusing xlb's pinned xdp_chain map:
 *
 *   clang -O2 -g -target bpf -I/usr/include/$(uname -m)-linux-gnu -I xdp \
 *       -c xdp/examples/drop_source.c -o drop_source.o
 *   bpftool prog load drop_source.o /sys/fs/bpf/drop_source type xdp \
 *       map name xdp_chain pinned /sys/fs/bpf/xlb/xdp_chain pinmaps /sys/fs/bpf/drop_source_maps
 *   lbctl chain add --slot 0 --pin /sys/fs/bpf/drop_source
 *
 * -DCHAIN_SLOT=N when it goes to another slot than 0 (it passes on to the slots after N).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "root/chain.h"

#ifndef CHAIN_SLOT
/* The slot this filter is added to. */
#define CHAIN_SLOT 0
#endif

/* xlb's chain, reused from its pin (bpftool `map name xdp_chain pinned ...`). */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, CHAIN_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} xdp_chain SEC(".maps");

/* IPv4 sources to drop (network order) -> packets dropped. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} drop_src SEC(".maps");

/* Hand the packet to the rest of the chain; XDP_PASS if nothing follows. */
static __always_inline int pass_on(struct xdp_md *ctx)
{
#pragma unroll
	for (int i = CHAIN_SLOT + 1; i < CHAIN_SLOTS; i++)
		bpf_tail_call(ctx, &xdp_chain, i);
	return XDP_PASS;
}

SEC("xdp")
int drop_source(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + sizeof(*eth);
	__u64 *hits;

	if ((void *)(iph + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return pass_on(ctx);
	hits = bpf_map_lookup_elem(&drop_src, &iph->saddr);
	if (!hits)
		return pass_on(ctx);
	__sync_fetch_and_add(hits, 1);
	return XDP_DROP;
}

char _license[] SEC("license") = "GPL";
