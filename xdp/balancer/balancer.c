/* balancer.c - the XDP load balancer: VIP lookup, connection table, Maglev ring,
 * encapsulation towards the backend, ICMP handling. Entry point: xdp_balancer.
 *
 * Pipeline (Katran's): Ethernet/802.1Q -> IPv4/IPv6 (fragments, options, extension headers
 * to a VIP address are dropped) -> ICMP (echo reply, errors forwarded along their flow) ->
 * TCP/UDP ports -> VIP (exact, then port 0) -> backend (connection table, then the VIP's
 * ring) -> size check (ICMP too-big reply) -> encapsulate -> XDP_TX to the gateway.
 * Anything that is not ours goes to the stack untouched (XDP_PASS); nothing returns
 * XDP_ABORTED. Every verdict is counted by reason (enum glob_stat) and in total.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "balancer/maps.h"
#include "balancer/stats.h"
#include "common/csum.h"
#include "common/hash.h"
#include "balancer/parse.h"
#include "balancer/encap.h"
#include "balancer/icmp.h"
#include "balancer/conn.h"
#include "balancer/second.h"
#include "balancer/srcrange.h"
#include "balancer/ratelimit.h"
#include "balancer/guard.h"

/* The per-CPU VIP cache's sequence word, read as written (lb_vip_lookup). */
#define VIP_CACHE_READ(x) (*(volatile __u32 *)&(x))
#define VIP_CACHE_BARRIER() asm volatile("" ::: "memory")

/* Nanoseconds per second, for the UDP idle timeout default. */
#define LB_NSEC_PER_SEC 1000000000ULL

/* The backend a packet goes to, and how it was found. */
struct lb_choice {
	/* Index into reals (never REAL_NONE once chosen). */
	__u32 real_idx;
	/* Flow hash, valid when hash_valid (computed on a table miss, or for GUE). */
	__u32 hash;
	__u8 hash_valid;
	/* The packet picked a new flow from the ring (counts in the VIP's new_conns). */
	__u8 new_conn;
	/* The backend's entry in reals. */
	struct real_def *real;
	/* The second hop the packet carries (second.h), or NULL. */
	struct real_def *second;
	/* The VIP's source ranges refused the packet (dropped, not counted for the VIP). */
	__u8 denied;
};

/* Map-touching helpers declared in stats.h and parse.h: BCC rewrites map accesses in this
 * file only.
 */
static __always_inline void stats_inc(__u32 slot)
{
	__u64 *cnt = glob_stats.lookup(&slot);

	if (cnt)
		*cnt += 1;
}

static __always_inline void stats_vip(__u32 vip_num, __u32 bytes, int new_conn)
{
	struct vip_stats *vs = vip_stats.lookup(&vip_num);

	if (!vs)
		return;
	vs->packets += 1;
	vs->bytes += bytes;
	if (new_conn)
		vs->new_conns += 1;
}

static __always_inline void stats_real(__u32 real_idx, __u32 bytes)
{
	struct real_stats *rs = real_stats.lookup(&real_idx);

	if (!rs)
		return;
	rs->packets += 1;
	rs->bytes += bytes;
}

/* Count a packet of VIP `vip_num` sent to backend `real_idx` (FEAT_PAIR_STATS): in the
 * pair's pair_cache slot (an array slot, no hash lookup) unless another pair holds it on
 * this CPU, else in pair_stats. A full pair_stats leaves the pair uncounted; the VIP and
 * backend totals still count it.
 */
static __always_inline void stats_pair(__u32 vip_num, __u32 real_idx, __u32 bytes,
				       int new_conn)
{
	struct pair_key key = { .vip_num = vip_num, .real_idx = real_idx };
	struct pair_stats *ps, init = {};
	struct pair_slot *pc;
	__u32 slot;

	if (!FEAT_PAIR_STATS)
		return;
	slot = hash_pair_slot(vip_num, real_idx);
	pc = pair_cache.lookup(&slot);
	if (pc && !pc->key.real_idx) {
		/* Free on this CPU: the pair takes it (only this CPU writes its copy). */
		pc->key = key;
		pc->packets = 0;
		pc->bytes = 0;
		pc->new_conns = 0;
	}
	if (pc && pc->key.vip_num == vip_num && pc->key.real_idx == real_idx) {
		pc->packets += 1;
		pc->bytes += bytes;
		if (new_conn)
			pc->new_conns += 1;
		return;
	}
	ps = pair_stats.lookup(&key);
	if (!ps) {
		init.packets = 1;
		init.bytes = bytes;
		init.new_conns = !!new_conn;
		pair_stats.update(&key, &init);
		return;
	}
	ps->packets += 1;
	ps->bytes += bytes;
	if (new_conn)
		ps->new_conns += 1;
}

static __always_inline struct real_def *second_real(__u32 idx)
{
	return reals.lookup(&idx);
}

static __always_inline int parse_is_vip_addr(const __be32 *addr, __u32 family)
{
	struct vip_addr key = {};

	__builtin_memcpy(key.addr, addr, sizeof(key.addr));
	key.family = family;
	return vip_addrs.lookup(&key) != NULL;
}

/* Is the frame addressed to the LB? Never to a group address (broadcast, multicast: the
 * I/G bit); with lb_mac set, only to that address (a promiscuous interface also sees other
 * hosts' unicast). So the frames the program sends, which take the received destination as
 * their source, always leave from the LB's own address.
 */
static __always_inline int lb_frame_is_ours(const struct ethhdr *eth, const struct lb_cfg *cfg)
{
	const __u8 *d = eth->h_dest, *m = cfg->lb_mac;

	if (d[0] & 1)
		return 0;
	if (!(m[0] | m[1] | m[2] | m[3] | m[4] | m[5]))
		return 1;
	return !((d[0] ^ m[0]) | (d[1] ^ m[1]) | (d[2] ^ m[2]) | (d[3] ^ m[3]) | (d[4] ^ m[4]) |
		 (d[5] ^ m[5]));
}

/* Can a VIP live on the flow's destination? 0 only when the programmed filter says no. */
static __always_inline int lb_maybe_vip(const struct flow_key *flow)
{
	__u32 zero = 0, h;
	struct vip_filter *vf = vip_filter.lookup(&zero);

	if (!vf || !vf->ready)
		return 1;
	h = (flow->dst[0] ^ flow->dst[1] ^ flow->dst[2] ^ flow->dst[3] ^ flow->family) *
	    VIP_FILTER_MULT;
	h >>= 32 - VIP_FILTER_LOG2;
	return (vf->bits[(h >> 6) & (VIP_FILTER_WORDS - 1)] >> (h & 63)) & 1;
}

/* A backend slot whose address is all zero was removed (or never programmed). */
static __always_inline int lb_real_present(const struct real_def *real)
{
	return (real->addr[0] | real->addr[1] | real->addr[2] | real->addr[3]) != 0;
}

/* The VIP of a client->VIP flow: exact (address, port, protocol), then the port-0 VIP.
 * Remembered per CPU under vip_map's generation: a hit costs two array reads and a compare
 * instead of a hash of the 20-byte key and a bucket walk. The control plane bumps vip_gen
 * after each vip_map write (lb.dataplane.mapio), so a packet that read the generation
 * before a change uses what it would have found had it looked vip_map up just before the
 * write: no packet sees an older VIP than one already in flight could. An entry is written
 * with the generation read before the lookup, so a write racing the lookup leaves an entry
 * that the next bump invalidates. Runs on one CPU only nest (an interrupted run resumes
 * after the other ends), so `seq` is enough to keep a half-written entry unused.
 */
static __always_inline int lb_vip_lookup(const struct flow_key *flow, struct vip_meta *out)
{
	struct vip_key key = {};
	struct vip_meta *vip;
	struct vip_cache *vc;
	__u32 zero = 0, seq = 1;
	__u64 *genp = vip_gen.lookup(&zero), gen = genp ? *genp : 0;

	/* Copied out, never returned as a pointer: a pointer into one map or the other would
	 * split every later verifier state in two (Linux 6.1 then passes its 1M-insn limit).
	 */
	vc = gen ? vip_cache.lookup(&zero) : NULL;
	if (vc) {
		seq = VIP_CACHE_READ(vc->seq);
		VIP_CACHE_BARRIER();
		if (!(seq & 1) && vc->gen == gen && vc->key.addr[0] == flow->dst[0] &&
		    vc->key.addr[1] == flow->dst[1] && vc->key.addr[2] == flow->dst[2] &&
		    vc->key.addr[3] == flow->dst[3] && vc->key.port == flow->dport &&
		    vc->key.proto == flow->proto && vc->key.family == flow->family) {
			*out = vc->meta;
			VIP_CACHE_BARRIER();
			if (VIP_CACHE_READ(vc->seq) == seq)
				return 1;
		}
	}
	__builtin_memcpy(key.addr, flow->dst, sizeof(key.addr));
	key.port = flow->dport;
	key.proto = flow->proto;
	key.family = flow->family;
	vip = vip_map.lookup(&key);
	if (!vip) {
		key.port = 0;
		vip = vip_map.lookup(&key);
		if (!vip)
			return 0;
		key.port = flow->dport;
	}
	*out = *vip;
	/* Not while another run's write is cut short under this one (seq odd). */
	if (vc && !(seq & 1)) {
		vc->seq = seq + 1;
		VIP_CACHE_BARRIER();
		vc->gen = gen;
		vc->key = key;
		vc->meta = *out;
		VIP_CACHE_BARRIER();
		vc->seq = seq + 2;
	}
	return 1;
}

/* Map-touching helpers of srcrange.h, ratelimit.h and guard.h. */
static __always_inline __u32 srcrange_lookup(const struct flow_key *flow, __u32 vip_num)
{
	struct src_key_v4 k4 = {};
	struct src_key_v6 k6 = {};
	__u32 *v;

	if (flow->family == FAMILY_V4) {
		k4.prefixlen = 64;
		k4.vip_num = vip_num;
		k4.addr = flow->src[0];
		v = src_v4.lookup(&k4);
	} else {
		k6.prefixlen = 160;
		k6.vip_num = vip_num;
		__builtin_memcpy(k6.addr, flow->src, sizeof(k6.addr));
		v = src_v6.lookup(&k6);
	}
	return v ? *v : 0;
}

static __always_inline int srcrange_fresh(__u32 vip_num, __u64 meta, __u64 now)
{
	__u32 *changed = src_changed.lookup(&vip_num);

	/* Stamped two units or more after the ranges' last change: allowed since (srcrange.h).
	 * 0 = never stamped by the control plane (a map an upgrade just created): check.
	 */
	return changed && *changed &&
	       conn_age(meta, now) + 1 < ((now - *changed) & CONN_STAMP_MASK);
}

static __always_inline void srcrange_count(__u32 vip_num)
{
	__u64 *cnt = src_denied.lookup(&vip_num);

	if (cnt)
		*cnt += 1;
}

static __always_inline int rl_take(__u32 slot)
{
	__u32 zero = 0;
	struct guard_cfg *gc = guard_cfg.lookup(&zero);
	struct rl_bucket *b = rl_buckets.lookup(&slot);
	__u64 rate, burst;

	if (!gc || !b)
		return 1;
	rate = slot == RL_ECHO ? gc->echo_rate : gc->too_big_rate;
	burst = slot == RL_ECHO ? gc->echo_burst : gc->too_big_burst;
	if (!rate)
		return 1;
	return rl_bucket_take(b, bpf_ktime_get_ns(), rate, burst ? burst : 1);
}

static __always_inline int guard_admit(int syn)
{
	__u32 zero = 0;
	struct guard_cfg *gc = guard_cfg.lookup(&zero);
	struct guard_state *st;
	int flood;

	if (!gc || gc->mode == GUARD_MODE_OFF)
		return GUARD_INS_ALL;
	if (gc->mode == GUARD_MODE_ALWAYS) {
		flood = 1;
	} else {
		st = guard_state.lookup(&zero);
		if (!st)
			return GUARD_INS_ALL;
		flood = guard_step(st, bpf_ktime_get_coarse_ns() >> GUARD_WINDOW_SHIFT, syn,
				   gc->syn_per_window);
	}
	if (!flood)
		return syn ? GUARD_INS_NO_EVICT : GUARD_INS_ALL;
	if (syn) {
		stats_inc(STAT_GUARD_SYN_STATELESS);
		return GUARD_INS_NONE;
	}
	return GUARD_INS_NO_EVICT;
}

/* Locate the flow's set and compute its tag; 0 when the set cannot be read (never, for an
 * index below CONN_SETS, but the verifier wants the check).
 */
static __always_inline int conn_locate(const struct flow_key *flow, const struct lb_cfg *cfg,
				       struct conn_ref *ref)
{
	__u32 hi, lo;
	__u32 idx = conn_hash3(flow, CONN_SEED, &hi, &lo) & (CONN_SETS - 1);
	__u64 timeout = cfg->udp_timeout_ns;

	ref->set = conn_table.lookup(&idx);
	if (!ref->set)
		return 0;
	ref->tag = ((__u64)hi << 32 | lo) | CONN_TAG_SET;
	ref->now = (bpf_ktime_get_coarse_ns() >> CONN_STAMP_NS_SHIFT) & CONN_STAMP_MASK;
	if (!timeout)
		timeout = UDP_TIMEOUT_DEFAULT_S * LB_NSEC_PER_SEC;
	ref->udp_timeout = timeout >> CONN_STAMP_NS_SHIFT;
	ref->tcp_timeout = cfg->tcp_timeout_ns >> CONN_STAMP_NS_SHIFT;
	return 1;
}

/* Choose the backend: connection table first (unless a TCP SYN or an LRU-bypass VIP), then
 * the VIP's Maglev ring; on a miss, remember the choice (unless a TCP FIN or RST, LRU bypass
 * or a forwarded ICMP error, which open no flow). A table entry is ignored when it is idle
 * past its protocol's timeout or its backend was removed (address zeroed in reals): that is
 * how removed backends' flows move while draining ones (still in reals) keep theirs.
 * The table is keyed by the full 5-tuple, F_HASH_SRC_ONLY included: that flag changes only
 * the ring hash, so every new flow of a client lands on the same backend.
 */
static __always_inline int lb_pick(struct parse_pkt *pkt, const struct vip_meta *vip,
				   const struct lb_cfg *cfg, struct lb_choice *ch)
{
	struct conn_ref ref = {};
	struct real_def *real;
	__u32 *ring_real;
	__u32 key, word;
	__u64 meta = 0, upd;
	int is_tcp = pkt->flow.proto == IPPROTO_TCP;
	int is_udp = pkt->flow.proto == IPPROTO_UDP;
	int bypass = vip->flags & F_LRU_BYPASS;
	int syn = is_tcp && (pkt->tcp_flags & PARSE_TCP_SYN);
	int rst = is_tcp && (pkt->tcp_flags & PARSE_TCP_RST);
	int fin = is_tcp && (pkt->tcp_flags & PARSE_TCP_FIN);
	int way, admit, action, table = !bypass && conn_locate(&pkt->flow, cfg, &ref);

	if (table && !syn) {
		way = conn_find(&ref, &meta);
		if (way >= 0) {
			way &= CONN_WAYS - 1;
			if (conn_expired(&ref, meta)) {
				stats_inc(STAT_LRU_EXPIRED);
			} else {
				key = meta & CONN_REAL_MASK;
				real = reals.lookup(&key);
				if (real && lb_real_present(real)) {
					/* Established: the ranges' verdict is cached in the stamp. */
					if ((vip->flags & F_SRC_RANGES) && !pkt->icmp_fwd &&
					    !srcrange_fresh(vip->vip_num, meta, ref.now)) {
						action = srcrange_check(&pkt->flow, vip);
						if (action >= 0) {
							ch->denied = 1;
							return action;
						}
					}
					/* An ICMP error is no sign of life of the flow: only the
					 * flow's own packets refresh the stamp, and a client FIN
					 * or RST marks a TCP entry closing (a drain counts it
					 * only for a grace period after, lb/ops/drain.py).
					 */
					if (!pkt->icmp_fwd) {
						upd = (meta & ~((__u64)CONN_STAMP_MASK << CONN_STAMP_SHIFT)) |
						      ref.now << CONN_STAMP_SHIFT;
						if (is_tcp && (pkt->tcp_flags & (PARSE_TCP_FIN | PARSE_TCP_RST)))
							upd |= CONN_F_CLOSING;
						/* Lost to a writer of the slot: nothing is written. */
						if (upd != meta)
							__sync_val_compare_and_swap(&ref.set->way[way].meta,
										    meta, upd);
						stats_inc(STAT_LRU_HIT);
					}
					ch->real_idx = key;
					ch->real = real;
					return FURTHER_PROCESSING;
				}
				stats_inc(STAT_LRU_REAL_GONE);
			}
		}
	}

	if (!pkt->icmp_fwd) {
		action = srcrange_check(&pkt->flow, vip);
		if (action >= 0) {
			ch->denied = 1;
			return action;
		}
	}
	ch->hash = hash_flow(&pkt->flow, vip->flags & F_HASH_SRC_ONLY);
	ch->hash_valid = 1;
	key = vip->vip_num * RING_SIZE + ch->hash % RING_SIZE;
	ring_real = ch_rings.lookup(&key);
	if (!ring_real)
		return stats_verdict(STAT_NO_BACKEND, XDP_DROP);
	word = *ring_real;
	key = word & RING_REAL_MASK;
	if (key == REAL_NONE)
		return stats_verdict(STAT_NO_BACKEND, XDP_DROP);
	real = reals.lookup(&key);
	/* The control plane writes a backend before any ring slot names it; a slot naming an
	 * empty backend is a misprogrammed ring, treated like an empty slot.
	 */
	if (!real || !lb_real_present(real))
		return stats_verdict(STAT_NO_BACKEND, XDP_DROP);
	ch->real_idx = key;
	ch->real = real;
	if (pkt->icmp_fwd)
		return FURTHER_PROCESSING;
	ch->second = second_pick(word, vip->flags, syn, 0, real);
	/* Under LRU bypass there is no table to miss: a SYN is the only new-flow signal. */
	ch->new_conn = !bypass || syn;
	if (bypass)
		return FURTHER_PROCESSING;
	stats_inc(syn ? STAT_LRU_MISS_SYN : STAT_LRU_MISS_OTHER);
	/* A FIN or RST of a flow the table does not know closes nothing we track: inserting
	 * it would leave an open entry for a connection that is ending.
	 */
	if (table && !rst && !fin && !ch->second) {
		admit = guard_admit(syn);
		if (admit != GUARD_INS_NONE)
			conn_insert(&ref, (key & CONN_REAL_MASK) |
					  ((__u64)(vip->vip_num & CONN_VIP_MASK) << CONN_VIP_SHIFT) |
					  (is_udp ? CONN_F_UDP : 0) | ref.now << CONN_STAMP_SHIFT,
				    admit == GUARD_INS_NO_EVICT);
	}
	return FURTHER_PROCESSING;
}

/* Send a packet of a VIP flow to its backend: pick, check the size, encapsulate. */
static __always_inline int lb_forward(struct xdp_md *ctx, struct parse_pkt *pkt,
				      const struct vip_meta *vip, const struct lb_cfg *cfg)
{
	struct lb_choice ch = {};
	__u32 over, mtu, outer_len;
	int action, outer_v6, gue;

	/* A VIP number past the compiled limit would index another VIP's ring. */
	if (vip->vip_num >= MAX_VIPS)
		return stats_verdict(STAT_NO_BACKEND, XDP_DROP);
	action = lb_pick(pkt, vip, cfg, &ch);
	if (!ch.denied)
		stats_vip(vip->vip_num, pkt->ip_len, ch.new_conn);
	if (action >= 0)
		return action;

	outer_v6 = ch.real->flags & REAL_F_V6;
	/* IPv6 in IPv4 is not supported (the control plane refuses such a backend). */
	if (pkt->flow.family == FAMILY_V6 && !outer_v6)
		return stats_verdict(STAT_ENCAP_FAIL, XDP_DROP);
	gue = vip->flags & F_ENCAP_GUE;
	/* A GUE VIP on a build without GUE: the backend expects GUE, so IPIP would be wrong. */
	if (gue && !FEAT_GUE)
		return stats_verdict(STAT_ENCAP_FAIL, XDP_DROP);
	over = encap_overhead(outer_v6, gue);
	if (ch.second) {
		/* Too big with the hop's header: better the first backend alone than a
		 * too-big reply for a header the client never asked for.
		 */
		if (cfg->max_frame && ETH_HLEN + pkt->ip_len + over + second_overhead(outer_v6) >
					      cfg->max_frame) {
			stats_inc(STAT_SECOND_SKIP);
			ch.second = NULL;
		} else {
			over += second_overhead(outer_v6);
		}
	}

	/* max_frame counts the Ethernet header but not an 802.1Q tag, like MTU + 14. */
	if (FEAT_TOO_BIG && cfg->max_frame && ETH_HLEN + pkt->ip_len + over > cfg->max_frame) {
		/* Never an ICMP error about an ICMP error (RFC 1122 3.2.2). */
		if (pkt->icmp_fwd)
			return stats_verdict(STAT_ENCAP_FAIL, XDP_DROP);
		if (!icmp_source_ok(&pkt->flow))
			return stats_verdict(STAT_ICMP_SRC_BAD, XDP_DROP);
		if (!rl_take(RL_TOO_BIG))
			return stats_verdict(STAT_TOO_BIG_LIMITED, XDP_DROP);
		mtu = cfg->max_frame > ETH_HLEN + over ? cfg->max_frame - ETH_HLEN - over : 0;
		if (pkt->flow.family == FAMILY_V4)
			return icmp_too_big_v4(ctx, pkt, mtu);
		return icmp_too_big_v6(ctx, pkt, mtu);
	}

	if (gue && !ch.hash_valid)
		ch.hash = hash_flow(&pkt->flow, vip->flags & F_HASH_SRC_ONLY);
	outer_len = encap_push(ctx, pkt, ch.real, cfg, vip->flags, ch.hash, ch.second);
	if (!outer_len)
		return stats_verdict(STAT_ENCAP_FAIL, XDP_DROP);
	stats_real(ch.real_idx, outer_len);
	stats_pair(vip->vip_num, ch.real_idx, pkt->ip_len, ch.new_conn);
	if (pkt->icmp_fwd)
		stats_inc(STAT_ICMP_FWD);
	if (ch.second)
		stats_inc(STAT_SECOND_HOP);
	return events_tx(pkt->icmp_fwd, pkt->tcp_flags & PARSE_TCP_SYN, ch.hash_valid, ch.second != NULL,
			 ch.new_conn);
}

/* ICMP to an IPv4 address: echo requests to VIP addresses are answered, frag-needed about a
 * VIP flow goes to that flow's backend, everything else is the stack's.
 */
static __always_inline int lb_icmp_v4(struct xdp_md *ctx, struct parse_pkt *pkt,
				      const struct lb_cfg *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct icmphdr *icmph = data + pkt->l3_off + sizeof(struct iphdr);
	__u32 inner_len = pkt->ip_len - sizeof(struct iphdr) - sizeof(*icmph);
	struct vip_meta vip;
	int action;

	if ((void *)(icmph + 1) > data_end ||
	    pkt->ip_len < sizeof(struct iphdr) + sizeof(*icmph))
		return parse_refuse(pkt->flow.dst, FAMILY_V4, STAT_MALFORMED);
	if (icmph->type == ICMP_ECHO) {
		if (!FEAT_ICMP_ECHO)
			return stats_verdict(STAT_PASS_ICMP, XDP_PASS);
		if (!parse_is_vip_addr(pkt->flow.dst, FAMILY_V4))
			return stats_verdict(STAT_PASS_NON_VIP, XDP_PASS);
		if (!rl_take(RL_ECHO))
			return stats_verdict(STAT_ICMP_ECHO_LIMITED, XDP_DROP);
		return icmp_echo_v4(data, data_end, pkt);
	}
	if (!FEAT_ICMP_FWD || icmph->type != ICMP_DEST_UNREACH || icmph->code != ICMP_FRAG_NEEDED)
		return stats_verdict(STAT_PASS_ICMP, XDP_PASS);
	action = icmp_parse_inner_v4(icmph + 1, data_end, pkt, inner_len);
	if (action >= 0)
		return action;
	if (!lb_vip_lookup(&pkt->flow, &vip))
		return stats_verdict(STAT_PASS_NON_VIP, XDP_PASS);
	pkt->icmp_fwd = 1;
	return events_vip(lb_forward(ctx, pkt, &vip, cfg), vip.vip_num);
}

/* ICMPv6: the same for echo requests and packet-too-big. */
static __always_inline int lb_icmp_v6(struct xdp_md *ctx, struct parse_pkt *pkt,
				      const struct lb_cfg *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct icmp6hdr *icmp6h = data + pkt->l3_off + sizeof(struct ipv6hdr);
	__u32 inner_len = pkt->ip_len - sizeof(struct ipv6hdr) - sizeof(*icmp6h);
	struct vip_meta vip;
	int action;

	if ((void *)(icmp6h + 1) > data_end ||
	    pkt->ip_len < sizeof(struct ipv6hdr) + sizeof(*icmp6h))
		return parse_refuse(pkt->flow.dst, FAMILY_V6, STAT_MALFORMED);
	if (icmp6h->icmp6_type == ICMPV6_ECHO_REQUEST) {
		if (!FEAT_ICMP_ECHO)
			return stats_verdict(STAT_PASS_ICMP, XDP_PASS);
		if (!parse_is_vip_addr(pkt->flow.dst, FAMILY_V6))
			return stats_verdict(STAT_PASS_NON_VIP, XDP_PASS);
		if (!rl_take(RL_ECHO))
			return stats_verdict(STAT_ICMP_ECHO_LIMITED, XDP_DROP);
		return icmp_echo_v6(data, data_end, pkt);
	}
	if (!FEAT_ICMP_FWD || icmp6h->icmp6_type != ICMPV6_PKT_TOOBIG)
		return stats_verdict(STAT_PASS_ICMP, XDP_PASS);
	action = icmp_parse_inner_v6(icmp6h + 1, data_end, pkt, inner_len);
	if (action >= 0)
		return action;
	if (!lb_vip_lookup(&pkt->flow, &vip))
		return stats_verdict(STAT_PASS_NON_VIP, XDP_PASS);
	pkt->icmp_fwd = 1;
	return events_vip(lb_forward(ctx, pkt, &vip, cfg), vip.vip_num);
}

/* Everything after the Ethernet header. */
static __always_inline int lb_process(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct parse_pkt pkt = {};
	struct vip_meta vip;
	struct lb_cfg *cfg;
	__u32 zero = 0, hdr_len;
	__be16 proto;
	int action;

	action = parse_eth(data, data_end, &pkt, &proto);
	if (action >= 0)
		return action;
	cfg = lb_cfg.lookup(&zero);
	/* Verifier: an array lookup of index 0 cannot fail, but must be checked. */
	if (!cfg)
		return stats_verdict(STAT_PASS_NOT_IP, XDP_PASS);
	if (!lb_frame_is_ours(data, cfg))
		return stats_verdict(STAT_PASS_NOT_OURS, XDP_PASS);
	if (proto == __constant_htons(ETH_P_IP)) {
		action = parse_ipv4(data, data_end, &pkt);
		hdr_len = sizeof(struct iphdr);
	} else if (proto == __constant_htons(ETH_P_IPV6)) {
		action = parse_ipv6(data, data_end, &pkt);
		hdr_len = sizeof(struct ipv6hdr);
	} else {
		return stats_verdict(STAT_PASS_NOT_IP, XDP_PASS);
	}
	if (action >= 0)
		return action;

	if (pkt.flow.proto == IPPROTO_ICMP)
		return lb_icmp_v4(ctx, &pkt, cfg);
	if (pkt.flow.proto == IPPROTO_ICMPV6)
		return lb_icmp_v6(ctx, &pkt, cfg);

	action = parse_ports(data + pkt.l3_off + hdr_len, data_end, &pkt, pkt.ip_len - hdr_len);
	if (action >= 0)
		return action;
	if (!lb_maybe_vip(&pkt.flow))
		return stats_verdict(STAT_PASS_NON_VIP, XDP_PASS);
	if (!lb_vip_lookup(&pkt.flow, &vip))
		return stats_verdict(STAT_PASS_NON_VIP, XDP_PASS);
	return events_vip(lb_forward(ctx, &pkt, &vip, cfg), vip.vip_num);
}

/* Map-touching hooks declared in events.h. */

/* Copy the frame's first bytes (at most `max`) into the scratch record `f`. 0 when nothing
 * could be copied.
 */
static __always_inline __u32 events_copy(struct xdp_md *ctx, struct ev_frame *f, __u32 kind,
					 __u32 max)
{
	__u32 len = bpf_xdp_get_buff_len(ctx), cap = len < max ? len : max;

	if (cap == 0)
		return 0;
	/* Verifier: the length must be known to be within the buffer and not zero; a compare
	 * does not do (clang tests one copy of cap and passes another: "R4 min value is
	 * negative", 6.18), a mask does. cap is at most max <= EV_CAP_SNAPLEN, a power of two,
	 * so this keeps its value.
	 */
	cap = ((cap - 1) & (EV_CAP_SNAPLEN - 1)) + 1;
	if (bpf_xdp_load_bytes(ctx, 0, f->data, cap))
		return 0;
	f->hdr.frame_len = len;
	f->hdr.cap_len = cap;
	f->hdr.kind = kind;
	f->hdr.ifindex = ctx->ingress_ifindex;
	return cap;
}

/* Write the record in `f` (head and cap_len bytes) to the ring; count it sent or lost. */
static __always_inline void events_send(struct ev_frame *f, struct ev_state *st, __u32 code)
{
	/* Verifier: bounded as in events_copy (cap_len is 1..EV_CAP_SNAPLEN). */
	__u32 cap = ((f->hdr.cap_len - 1) & (EV_CAP_SNAPLEN - 1)) + 1;

	f->hdr.code = code;
	f->hdr.ts_ns = bpf_ktime_get_ns();
	if (events.ringbuf_output(f, sizeof(f->hdr) + cap, 0))
		st->lost += 1;
	else
		st->sent += 1;
}

static __always_inline void events_enter(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct ev_cfg *ev = ev_cfg.lookup(&zero);
	struct ev_frame *f;

	if (ev && (ev->flags & EV_CAPTURE)) {
		f = ev_frame.lookup(&zero);
		if (f && !events_copy(ctx, f, EV_K_RX, EV_CAP_SNAPLEN))
			f->hdr.kind = 0;
	}
}

/* Report the packet whose verdict word is `code` if `ev` asks for it. A flood-guard mode
 * change on this CPU is noticed here, at the exit of the packet that caused it (guard_state is
 * per CPU and a packet runs on one), and reported whatever the sampling and the VIP filter.
 */
static __always_inline void events_exit(struct xdp_md *ctx, const struct ev_cfg *ev, __u32 code)
{
	__u32 zero = 0, sample = ev->sample, vip = ev->vip, flags = ev->flags, flood;
	struct guard_state *gs;
	struct ev_state *st;
	struct ev_frame *f;
	int guard = 0;

	st = ev_state.lookup(&zero);
	f = ev_frame.lookup(&zero);
	if (!st || !f)
		return;
	if (flags & EV_T_GUARD) {
		gs = guard_state.lookup(&zero);
		flood = gs && gs->flood;
		if (flood != st->flood_seen) {
			st->flood_seen = flood;
			code |= EV_F_GUARD | (flood ? EV_F_FLOOD : 0);
			guard = 1;
		}
	}
	if (!guard) {
		if (!(flags & events_type(code)))
			goto done;
		if (vip && (!(code & EV_F_VIP) || ((code >> EV_VIP_SHIFT) & EV_VIP_MASK) != vip - 1))
			goto done;
		if (sample > 1) {
			if (++st->skipped < sample)
				goto done;
			st->skipped = 0;
		}
	}
	if (!(flags & EV_CAPTURE)) {
		if (events_copy(ctx, f, EV_K_EVENT, EV_SNAPLEN))
			events_send(f, st, code);
		return;
	}
	if (f->hdr.kind == EV_K_RX)
		events_send(f, st, code);
	if ((code & EV_ACTION_MASK) == XDP_TX && events_copy(ctx, f, EV_K_TX, EV_CAP_SNAPLEN))
		events_send(f, st, code);
done:
	/* A stashed frame belongs to this packet only. */
	f->hdr.kind = 0;
}

int xdp_balancer(struct xdp_md *ctx)
{
	struct ev_cfg *ev;
	__u32 zero = 0;
	int code, action;

	events_enter(ctx);
	code = events_forget(lb_process(ctx));
	action = code & EV_ACTION_MASK;
	switch (action) {
	case XDP_TX:
		stats_inc(STAT_XDP_TX);
		break;
	case XDP_DROP:
		stats_inc(STAT_XDP_DROP);
		break;
	default:
		/* Only XDP_PASS is left: no path yields anything else. */
		action = XDP_PASS;
		stats_inc(STAT_XDP_PASS);
	}
	/* Looked up again rather than kept from events_enter: a pointer live across lb_process
	 * costs the verifier +110,000 instructions (6.18); the lookup is inlined.
	 */
	ev = ev_cfg.lookup(&zero);
	if (ev && ev->flags)
		events_exit(ctx, ev, code);
	return action;
}
