/* bench_progs.c - reference XDP programs for the forwarding benchmark (bench/bench_forwarding.py).
 *
 * Not part of the balancer. Each program counts what it handles in its own per-CPU array, so the
 * benchmark reads forwarded and dropped packets without any shared cache line between CPUs:
 *   xdp_sink      the counting sink on the router side of the lab: counts and drops;
 *   xdp_lb_drop   XDP_DROP at the LB: the most the generator and the veth path can deliver;
 *   xdp_fwd_floor the forwarding floor: rewrite MACs and XDP_TX back out, as the LB does, with
 *                 no parsing, lookup or encapsulation.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

/* Packets and bytes one program handled on one CPU. */
struct bench_count {
	__u64 packets;
	__u64 bytes;
};

/* sink_count slots. */
enum sink_slot {
	/* Every frame that reached the sink. */
	SINK_ALL = 0,
	/* Of those, IP-in-IP / IPv6-encapsulated ones (what the balancer sends). */
	SINK_ENCAP,
	SINK_MAX,
};

/* Frames that reached the sink (the router side), per CPU, by enum sink_slot. */
BPF_PERCPU_ARRAY(sink_count, struct bench_count, SINK_MAX);
/* Frames xdp_lb_drop dropped at the LB, per CPU. */
BPF_PERCPU_ARRAY(drop_count, struct bench_count, 1);
/* Frames xdp_fwd_floor sent back out, per CPU. */
BPF_PERCPU_ARRAY(floor_count, struct bench_count, 1);
/* Destination MAC of forwarded frames (the router), written by the benchmark: 6 bytes. */
BPF_ARRAY(floor_gw_mac, struct ethhdr, 1);

/* Add one frame of `len` bytes to slot 0 of a per-CPU counter array. */
static __always_inline void bench_count_add(struct bench_count *c, __u64 len)
{
	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

/* Whether a frame carries an IP packet inside IPv4 or IPv6 (the balancer's encapsulation). */
static __always_inline int bench_is_encap(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + sizeof(*eth);
	struct ipv6hdr *ip6 = data + sizeof(*eth);

	if ((void *)(eth + 1) > data_end)
		return 0;
	if (eth->h_proto == htons(ETH_P_IP) && (void *)(ip4 + 1) <= data_end)
		return ip4->protocol == IPPROTO_IPIP || ip4->protocol == IPPROTO_IPV6;
	if (eth->h_proto == htons(ETH_P_IPV6) && (void *)(ip6 + 1) <= data_end)
		return ip6->nexthdr == IPPROTO_IPIP || ip6->nexthdr == IPPROTO_IPV6;
	return 0;
}

int xdp_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 slot = SINK_ALL;

	bench_count_add(sink_count.lookup(&slot), data_end - data);
	if (bench_is_encap(data, data_end)) {
		slot = SINK_ENCAP;
		bench_count_add(sink_count.lookup(&slot), data_end - data);
	}
	return XDP_DROP;
}

int xdp_lb_drop(struct xdp_md *ctx)
{
	__u32 zero = 0;

	bench_count_add(drop_count.lookup(&zero), ctx->data_end - ctx->data);
	return XDP_DROP;
}

int xdp_fwd_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ethhdr *gw;
	__u32 zero = 0;

	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	gw = floor_gw_mac.lookup(&zero);
	if (!gw)
		return XDP_DROP;
	/* What the LB does to every frame it sends: its own MAC as source, the router's as dest. */
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, gw->h_dest, ETH_ALEN);
	bench_count_add(floor_count.lookup(&zero), data_end - data);
	return XDP_TX;
}
