/* consts.h - tunables and named constants of the balancer.
 *
 * Every tunable has an #ifndef default so the loader (lb/dataplane/loader.py) can override it with
 * -D cflags built from lb.config.DataplaneConfig. Flag bits and counter slots are mirrored by
 * name in lb/consts.py; tests/test_consts.py parses this file and compares.
 */
#ifndef XLB_CONSTS_H
#define XLB_CONSTS_H

/* Slots in each VIP's Maglev ring; a prime. */
#ifndef RING_SIZE
#define RING_SIZE 65537
#endif

/* Number of VIPs (vip_num is below this). */
#ifndef MAX_VIPS
#define MAX_VIPS 512
#endif

/* Number of backend ("real") slots; index 0 is reserved for "no backend". */
#ifndef MAX_REALS
#define MAX_REALS 4096
#endif

/* VIP-backend pairs with counters of their own (pair_stats). */
#ifndef MAX_PAIRS
#define MAX_PAIRS 16384
#endif

/* log2 of the slots of pair_cache, the per-CPU array in front of pair_stats (lb/config.py
 * passes the power of two at or above MAX_PAIRS, at most 2^14).
 */
#ifndef PAIR_SLOTS_LOG2
#define PAIR_SLOTS_LOG2 14
#endif
#define PAIR_SLOTS (1 << PAIR_SLOTS_LOG2)

/* Distinct VIP addresses (a VIP address may carry many ports/protocols). */
#ifndef MAX_VIP_ADDRS
#define MAX_VIP_ADDRS MAX_VIPS
#endif

/* Sets of the connection table (docs/conn-table.md), a power of two; the loader passes
 * the next power of two >= conn_table_size / CONN_WAYS.
 */
#ifndef CONN_SETS
#define CONN_SETS 524288
#endif

/* Ways (slots) per set: a set is 8 x 16 bytes, two cache lines fetched together. */
#define CONN_WAYS 8

/* Slots in the connection table. */
#define CONN_TABLE_SIZE (CONN_SETS * CONN_WAYS)

/* Feature switches (1 = compiled in). */
#ifndef FEAT_ICMP_ECHO
#define FEAT_ICMP_ECHO 1
#endif
#ifndef FEAT_ICMP_FWD
#define FEAT_ICMP_FWD 1
#endif
#ifndef FEAT_TOO_BIG
#define FEAT_TOO_BIG 1
#endif
#ifndef FEAT_GUE
#define FEAT_GUE 1
#endif
/* Counters per VIP-backend pair (a per-CPU array slot per forwarded packet; pair_cache). */
#ifndef FEAT_PAIR_STATS
#define FEAT_PAIR_STATS 1
#endif

/* GUE source ports: the upper quarter of the port space, low bits from the flow hash
 * (client traffic, xdp/balancer/encap.h, and tunnelled probes, xdp/hc_encap/hc_encap.c).
 */
#define ENCAP_GUE_SPORT_BASE 0xc000
#define ENCAP_GUE_SPORT_MASK 0x3fff

/* UDP connection-table idle timeout when lb_cfg.udp_timeout_ns is 0 (not configured). */
#define UDP_TIMEOUT_DEFAULT_S 30

/* Address families as stored in keys (not AF_* values, which differ per OS). */
#define FAMILY_V4 4
#define FAMILY_V6 6

/* The VIP address filter (vip_filter): 2^VIP_FILTER_LOG2 bits, in 64-bit words. */
#define VIP_FILTER_LOG2 16
#define VIP_FILTER_WORDS (1 << (VIP_FILTER_LOG2 - 6))
/* The filter's multiplier (Knuth's multiplicative hash, 2^32 / golden ratio). */
#define VIP_FILTER_MULT 0x9e3779b1

/* Backend index meaning "no backend" in ch_rings and conn_table. */
#define REAL_NONE 0

/* A ch_rings word (docs/second-chance.md): the slot's backend index in bits 0-15 and, while
 * a second-chance window is open after the slot moved, its previous backend (the second
 * hop) in bits 16-31; 0 there = none. MAX_REALS must fit the 16 bits (lb/config.py).
 */
#define RING_REAL_MASK 0xffff
#define RING_PREV_SHIFT 16

/* Connection-table way tags (struct conn_way.tag): free, being written; a flow's tag always
 * has CONN_TAG_SET, so it is never one of the other two.
 */
#define CONN_TAG_EMPTY 0
#define CONN_TAG_BUSY 1
#define CONN_TAG_SET 2

/* struct conn_way.meta, one 64-bit word: backend index (bits 0-19), VIP number (20-35),
 * flags (36, 37), stamp (38-63): the last time the flow was seen, in units of
 * 2^CONN_STAMP_NS_SHIFT ns of bpf_ktime_get_coarse_ns(), modulo 2^26 units (~13 days).
 */
#define CONN_REAL_MASK 0xfffff
#define CONN_VIP_SHIFT 20
#define CONN_VIP_MASK 0xffff
/* A UDP entry: the idle timeout applies. */
#define CONN_F_UDP (1ULL << 36)
/* A TCP entry whose client sent FIN or RST. */
#define CONN_F_CLOSING (1ULL << 37)
#define CONN_STAMP_SHIFT 38
#define CONN_STAMP_MASK 0x3ffffff
#define CONN_STAMP_NS_SHIFT 24

/* Seed of the connection-table hash (one pass gives the set index and the tag). */
#define CONN_SEED 0x636f6e6e

/* VIP flags (struct vip_meta.flags). */
/* Hash on the client address only, not its port: all of a client's flows go to one backend. */
#define F_HASH_SRC_ONLY (1 << 0)
/* Never consult or fill the connection table for this VIP. */
#define F_LRU_BYPASS (1 << 1)
/* Encapsulate in GUE (IP in UDP to lb_cfg.gue_port) instead of IP-in-IP. */
#define F_ENCAP_GUE (1 << 2)
/* Outer source is the LB's own address (lb_cfg.src_v4/src_v6) instead of the RSS-friendly one. */
#define F_SRC_LB (1 << 3)

/* Consult the VIP's source ranges (src_v4 / src_v6, xdp/balancer/srcrange.h); a VIP without
 * this bit pays one flag test. A high bit, so other flags can take the next low ones.
 */
#define F_SRC_RANGES (1 << 8)
/* The VIP has an allow list: a source no range matches is denied. */
#define F_SRC_ALLOW (1 << 9)

/* Backend flags (struct real_def.flags). */
/* The backend address is IPv6. */
#define REAL_F_V6 (1 << 0)

/* Source-range entries per family (src_v4, src_v6), over all VIPs. */
#ifndef MAX_SRC_RANGES
#define MAX_SRC_RANGES 16384
#endif
/* Values of src_v4 / src_v6: what the longest matching range says of a source. */
#define SRC_ALLOW 1
#define SRC_DENY 2

/* SYN-flood guard modes (guard_cfg.mode, xdp/balancer/guard.h; docs/protection.md). */
/* No guard: every table miss inserts, evicting the set's oldest entry when it is full. */
#define GUARD_MODE_OFF 0
/* SYNs never evict; flood mode while a CPU's SYNs in a window exceed syn_per_window. */
#define GUARD_MODE_AUTO 1
/* Always in flood mode: SYNs never insert, flows are tracked from their second packet. */
#define GUARD_MODE_ALWAYS 2
/* Guard windows last 2^GUARD_WINDOW_SHIFT ns of bpf_ktime_get_coarse_ns() (~134 ms). */
#define GUARD_WINDOW_SHIFT 27

/* What a connection-table miss may write under the guard. */
#define GUARD_INS_ALL 0
#define GUARD_INS_NO_EVICT 1
#define GUARD_INS_NONE 2

/* Token buckets of the replies the LB sends itself (rl_buckets index, per CPU). */
#define RL_ECHO 0
#define RL_TOO_BIG 1
#define RL_SLOTS 2
/* A bucket idle this long (ns) is full again (also bounds elapsed * rate below 2^64). */
#define RL_REFILL_NS 10000000000ULL

/* Global counter slots (glob_stats index). Every drop or pass for a reason has one. */
enum glob_stat {
	/* Verdict totals. */
	STAT_XDP_PASS = 0,
	STAT_XDP_DROP,
	STAT_XDP_TX,
	/* Passed: not IPv4/IPv6, or not TCP/UDP/ICMP. */
	STAT_PASS_NOT_IP,
	/* Passed: IP but not to a VIP. */
	STAT_PASS_NON_VIP,
	/* Dropped: IP header malformed or truncated. */
	STAT_MALFORMED,
	/* Connection table hit. */
	STAT_LRU_HIT,
	/* Connection table miss on a TCP SYN. */
	STAT_LRU_MISS_SYN,
	/* Connection table miss on anything else. */
	STAT_LRU_MISS_OTHER,
	/* ICMP / ICMPv6 echo replies sent for a VIP address. */
	STAT_ICMP_ECHO,
	/* ICMP errors about a VIP flow forwarded to its backend. */
	STAT_ICMP_FWD,
	/* ICMP frag-needed / packet-too-big sent to a client. */
	STAT_TOO_BIG,
	/* IPv4 fragments or IPv6 fragment headers to a VIP address (dropped). */
	STAT_FRAG,
	/* IPv4 packets with options, or IPv6 packets with hop-by-hop, routing or destination
	 * options headers, to a VIP address (dropped).
	 */
	STAT_IP_OPTIONS,
	/* VIP with no backend in its ring slot (dropped). */
	STAT_NO_BACKEND,
	/* Encapsulation failed (headroom, bounds, IPv6 VIP with an IPv4 backend, GUE VIP without
	 * FEAT_GUE, an ICMP error too big to forward) (dropped).
	 */
	STAT_ENCAP_FAIL,
	/* Passed: ICMP / ICMPv6 the balancer does not handle (neighbour discovery, echo replies,
	 * other errors, errors about non-TCP/UDP packets).
	 */
	STAT_PASS_ICMP,
	/* Connection-table hit on an entry idle past its timeout (UDP, or TCP with
	 * tcp_timeout_ns): re-picked from the ring.
	 */
	STAT_LRU_EXPIRED,
	/* Connection-table hit whose backend was removed (re-picked from the ring). */
	STAT_LRU_REAL_GONE,
	/* A new flow took the slot of a live one: its set of CONN_WAYS was full (table too small
	 * for the flows, or an unlucky set).
	 */
	STAT_CONN_EVICT,
	/* Passed: a frame not addressed to the LB (broadcast, multicast, or another host's
	 * unicast seen by a promiscuous interface).
	 */
	STAT_PASS_NOT_OURS,
	/* Dropped: a too-big reply was due to a source that must never get an ICMP error
	 * (multicast, broadcast, unspecified, loopback: RFC 1122 3.2.2, RFC 4443 2.4(e)).
	 */
	STAT_ICMP_SRC_BAD,
	/* Second chance (xdp/balancer/second.h): a packet of a flow the connection table does
	 * not know, to a slot with a second hop, sent to its backend carrying the second hop.
	 */
	STAT_SECOND_HOP,
	/* A slot's second hop that could not be carried (backend removed, other address family,
	 * frame too big with the longer header): sent to the slot's backend alone.
	 */
	STAT_SECOND_SKIP,
	/* Dropped: the source is outside the VIP's allow list or inside its deny list. */
	STAT_SRC_DENIED,
	/* Dropped: an echo reply was due but the CPU's echo token bucket was empty. */
	STAT_ICMP_ECHO_LIMITED,
	/* Dropped: a too-big reply was due but the CPU's too-big token bucket was empty. */
	STAT_TOO_BIG_LIMITED,
	/* Guard windows (per CPU) that ran in flood mode. */
	STAT_GUARD_FLOOD,
	/* SYNs sent along the ring without a table entry (flood mode). */
	STAT_GUARD_SYN_STATELESS,
	/* Table misses that found their set full of live entries and evicted none (a SYN with
	 * the guard on, any packet in flood mode).
	 */
	STAT_GUARD_NO_EVICT,
	STAT_MAX,
};

#endif /* XLB_CONSTS_H */
