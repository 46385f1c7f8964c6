/* structs.h - every struct shared between the data plane and user space.
 *
 * Python never mirrors these by hand: it uses the ctypes types BCC generates from them
 * (table.Key / table.Leaf). Addresses are in network byte order; an IPv4 address lives in
 * addr[0] with the other words zero.
 */
#ifndef XLB_STRUCTS_H
#define XLB_STRUCTS_H

/* Key of vip_map: one VIP is (address, port, protocol); port 0 = every port. */
struct vip_key {
	__be32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 family;
};

/* Value of vip_map. */
struct vip_meta {
	/* Index into ch_rings (vip_num * RING_SIZE) and vip_stats. */
	__u32 vip_num;
	/* F_* flags from consts.h. */
	__u32 flags;
};

/* Value of vip_cache: this CPU's last VIP lookup, the flow's (address, port, protocol) and
 * what vip_map gave for it (the exact VIP or the port-0 one), valid while vip_gen is `gen`.
 */
struct vip_cache {
	__u64 gen;
	struct vip_key key;
	struct vip_meta meta;
	/* Odd while a run writes the entry, moved on by 2 per write: a run that interrupted
	 * another on this CPU (a NAPI softirq over a BPF_PROG_TEST_RUN) neither trusts nor
	 * writes a half-written entry, and a reader that was interrupted by a write sees it.
	 */
	__u32 seq;
};

/* Key of vip_addrs: an address that carries at least one VIP (for ICMP echo, fragments). */
struct vip_addr {
	__be32 addr[4];
	__u32 family;
};

/* Value of vip_filter[0]: one bit per hash of every address that carries a VIP, so a packet
 * to any other address passes without a vip_map lookup. Unused until `ready` is set.
 */
struct vip_filter {
	__u64 ready;
	__u64 bits[VIP_FILTER_WORDS];
};

/* Value of reals: one backend. Index 0 is never used (REAL_NONE). */
struct real_def {
	__be32 addr[4];
	/* REAL_F_* flags from consts.h. */
	__u32 flags;
};

/* A flow's 5-tuple as the client sent it (parse.h fills it; the flow and connection-table
 * hashes of hash.h read it).
 */
struct flow_key {
	__be32 src[4];
	__be32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* One slot of the connection table (docs/conn-table.md): the flow's tag (CONN_TAG_*) and its
 * meta word (backend, VIP, CONN_F_* flags, stamp; layout in consts.h).
 */
struct conn_way {
	__u64 tag;
	__u64 meta;
};

/* Value of conn_table: the CONN_WAYS slots a flow's set index selects. */
struct conn_set {
	struct conn_way way[CONN_WAYS];
};

/* Runtime configuration: lb_cfg[0], written by the control plane. */
struct lb_cfg {
	/* Destination MAC of every encapsulated frame: the default router ("LB on a stick"). */
	__u8 gw_mac[6];
	/* GUE destination UDP port, network order. */
	__be16 gue_port;
	/* The LB's own outer source addresses (used with F_SRC_LB and for ICMP it sends). */
	__be32 src_v4;
	__be32 src_v6[4];
	/* RSS-friendly outer source prefixes: IPv4 /16 (low 16 bits from the flow), IPv6 /64. */
	__be32 rss_v4;
	__be32 rss_v6[2];
	/* Largest frame (Ethernet header included, no FCS) the LB may send; 0 = no check. */
	__u32 max_frame;
	/* The interface's own MAC: the source of every frame the LB sends, and frames to any
	 * other unicast destination are not ours. All zero: only group destinations are
	 * refused, and sent frames take the received destination as their source.
	 */
	__u8 lb_mac[6];
	__u8 pad[6];
	/* UDP connection-table entries idle longer than this are ignored and replaced. */
	__u64 udp_timeout_ns;
	/* The same for TCP entries (a client that vanished without FIN); 0 = never. */
	__u64 tcp_timeout_ns;
};

/* Per-VIP counters (vip_stats, per CPU). */
struct vip_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_conns;
};

/* A VIP-backend pair (pair_stats key). */
struct pair_key {
	__u32 vip_num;
	__u32 real_idx;
};

/* Per-VIP-per-backend counters (pair_stats, per CPU): what one VIP sent to one backend. */
struct pair_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_conns;
};

/* Value of pair_cache (per CPU): the pair that holds the slot on this CPU (all zero: free;
 * a pair's real_idx is never REAL_NONE) and its counters.
 */
struct pair_slot {
	struct pair_key key;
	__u64 packets;
	__u64 bytes;
	__u64 new_conns;
};

/* Per-backend counters (real_stats, per CPU). */
struct real_stats {
	__u64 packets;
	__u64 bytes;
};

/* Key of src_v4: a VIP's IPv4 source range. prefixlen counts the 32 bits of vip_num, which
 * always match whole, then the range's bits of addr.
 */
struct src_key_v4 {
	__u32 prefixlen;
	__u32 vip_num;
	__be32 addr;
};

/* Key of src_v6: the same for IPv6. */
struct src_key_v6 {
	__u32 prefixlen;
	__u32 vip_num;
	__be32 addr[4];
};

/* Value of guard_cfg[0]: the SYN-flood guard and the reply rate limits, written by the
 * control plane (lb.dataplane.protect). All zero: no guard and no limits.
 */
struct guard_cfg {
	/* GUARD_MODE_*. */
	__u32 mode;
	/* SYNs per CPU per guard window above which the CPU is in flood mode. */
	__u32 syn_per_window;
	/* Echo replies per second per CPU (0 = no limit), and the bucket's depth. */
	__u32 echo_rate;
	__u32 echo_burst;
	/* Too-big replies per second per CPU (0 = no limit), and the bucket's depth. */
	__u32 too_big_rate;
	__u32 too_big_burst;
};

/* Value of guard_state[0] (per CPU): the guard's current window. */
struct guard_state {
	/* The window (coarse ns >> GUARD_WINDOW_SHIFT) the counts are for. */
	__u64 window;
	/* SYNs to a VIP seen in it. */
	__u64 syns;
	/* 1 while this window runs in flood mode. */
	__u64 flood;
};

/* Value of rl_buckets (per CPU, indexed by RL_*): one token bucket. */
struct rl_bucket {
	__u64 tokens;
	/* bpf_ktime_get_ns() up to which tokens were credited. */
	__u64 last_ns;
};

#endif /* XLB_STRUCTS_H */
