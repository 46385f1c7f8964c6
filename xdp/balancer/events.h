/* events.h - sampled events and packet capture through a BPF ring buffer (lb/dataplane/events.py
 * reads it; docs/observe.md).
 *
 * Every verdict of the pipeline is a "verdict word" (below): the XDP action with the glob_stat
 * slot that names its reason, a new-flow bit and the VIP number when one was found. stats.h's
 * stats_verdict() builds it, so every counted drop and pass carries its reason to the one exit
 * of the program, xdp_balancer, where events_exit() reports it when ev_cfg asks.
 *
 * Cost when nothing asks: one lookup of ev_cfg[0] at entry (an array of one entry: the verifier
 * inlines it), one load of its flags word at entry and one at exit, each behind a branch that
 * is never taken; the verdict word costs an AND. No ring-buffer space is touched unless a packet
 * is sampled. Events go through bpf_ringbuf_output from a per-CPU scratch frame (ev_frame)
 * rather than a reserve of the frame's size: a reserve must have a constant size, and frames
 * vary from 60 to 1,500+ bytes. One ring for events and capture keeps a frame's received and
 * sent copies in order; the perf buffer (bpf_xdp_output) would need one reader per CPU.
 * Helpers used only when sampling: bpf_xdp_get_buff_len, bpf_xdp_load_bytes (5.18),
 * bpf_ringbuf_output (5.8), bpf_ktime_get_ns.
 */
#ifndef XLB_EVENTS_H
#define XLB_EVENTS_H

/* The verdict word (an int >= 0): bits 0-3 the XDP action, 4-9 the reason (enum glob_stat),
 * bit 10 a new flow, bit 13 the VIP number (bits 14-29) is known. Bits 11 and 12 are set
 * only in records: the flood guard changed mode on this packet's CPU (11), into flood mode (12).
 */
#define EV_ACTION_MASK 0xf
#define EV_REASON_SHIFT 4
#define EV_REASON_MASK 0x3f
#define EV_F_NEW_FLOW (1 << 10)
#define EV_F_GUARD (1 << 11)
#define EV_F_FLOOD (1 << 12)
#define EV_F_VIP (1 << 13)
#define EV_VIP_SHIFT 14
#define EV_VIP_MASK 0xffff

_Static_assert(STAT_MAX <= EV_REASON_MASK + 1, "enum glob_stat outgrew the reason field");

/* A verdict word from an action and the slot that counted it. */
#define EV_VERDICT(action, slot) ((action) | ((slot) << EV_REASON_SHIFT))

/* Event types (ev_cfg.flags): dropped, passed to the stack, a new flow forwarded, a packet of
 * a known flow forwarded, an ICMP reply sent by the balancer (echo reply, too-big).
 */
#define EV_T_DROP (1 << 0)
#define EV_T_PASS (1 << 1)
#define EV_T_FLOW (1 << 2)
#define EV_T_FWD (1 << 3)
#define EV_T_ICMP (1 << 4)
/* ... and the flood guard's mode changes (a packet whose SYN count flipped it). */
#define EV_T_GUARD (1 << 5)
/* Capture (ev_cfg.flags): frames as received and as sent instead of event snapshots. */
#define EV_CAPTURE (1 << 8)

/* Record kinds (ev_hdr.kind): an event (the frame's first EV_SNAPLEN bytes as it left the
 * program), a captured frame as received, a captured frame as sent.
 */
#define EV_K_EVENT 1
#define EV_K_RX 2
#define EV_K_TX 3

/* Bytes of the frame an event carries: enough for Ethernet, 802.1Q, outer IPv6, UDP, GUE,
 * inner IPv6 and TCP.
 */
#define EV_SNAPLEN 192
/* Bytes of a frame a capture keeps (the rest is counted in frame_len). */
#define EV_CAP_SNAPLEN 2048

/* Pages of the ring buffer (a power of two): 1 MiB. */
#ifndef EV_RING_PAGES
#define EV_RING_PAGES 256
#endif

/* Value of ev_cfg[0]: what to report, written by the control plane (lb/dataplane/events.py).
 * All zero: nothing (the daemon writes that at every start).
 */
struct ev_cfg {
	/* EV_T_* types to report and EV_CAPTURE; 0 = off (the only word the hot path reads). */
	__u32 flags;
	/* Report 1 in `sample` of the packets that match (0 or 1: every one). */
	__u32 sample;
	/* Only packets of VIP number vip - 1 (0: every packet). */
	__u32 vip;
	__u32 pad;
};

/* Value of ev_state (per CPU): the sampling countdown and what became of the records. */
struct ev_state {
	/* Packets that matched since the last one sampled. */
	__u64 skipped;
	/* Records written to the ring. */
	__u64 sent;
	/* Records the ring had no room for (user space too slow). */
	__u64 lost;
	/* The flood guard's mode (guard_state.flood) when this CPU last looked, to report its
	 * changes without a hook in the guard.
	 */
	__u64 flood_seen;
};

/* Head of every record in the ring (and of ev_frame). */
struct ev_hdr {
	/* bpf_ktime_get_ns() when the record was written. */
	__u64 ts_ns;
	/* The verdict word. */
	__u32 code;
	/* The frame's length (the record holds cap_len bytes of it). */
	__u32 frame_len;
	/* Interface the frame arrived on. */
	__u32 ifindex;
	/* Bytes of the frame that follow this header. */
	__u16 cap_len;
	/* EV_K_* */
	__u8 kind;
	__u8 pad;
};

/* Value of ev_frame (per CPU): a record being built, the frame bytes after the head. */
struct ev_frame {
	struct ev_hdr hdr;
	__u8 data[EV_CAP_SNAPLEN];
};

/* Tag a verdict word with the VIP it concerns (callers of lb_forward). */
static __always_inline int events_vip(int code, __u32 vip_num)
{
	return code | EV_F_VIP | (int)((vip_num & EV_VIP_MASK) << EV_VIP_SHIFT);
}

/* The verdict word of a forwarded packet, its reason saying why this backend: the connection
 * table (STAT_LRU_HIT), the VIP's ring (STAT_LRU_MISS_SYN or _OTHER, also under LRU bypass),
 * the second hop it carries (STAT_SECOND_HOP), the flow of an ICMP error (STAT_ICMP_FWD).
 * Computed here from what lb_forward already tracks rather than noted where the choice is
 * made: a constant kept from there would make the verifier walk the encapsulation once per
 * reason (+150,000 instructions, 6.18).
 */
static __always_inline int events_tx(int icmp_fwd, int syn, int ring, int second, int new_flow)
{
	__u32 why;

	if (icmp_fwd)
		why = STAT_ICMP_FWD;
	else if (second)
		why = STAT_SECOND_HOP;
	else if (!ring)
		why = STAT_LRU_HIT;
	else
		why = syn ? STAT_LRU_MISS_SYN : STAT_LRU_MISS_OTHER;
	return EV_VERDICT(XDP_TX, why) | (new_flow ? EV_F_NEW_FLOW : 0);
}

/* The verdict word as a value the verifier does not know: every path of the pipeline returns
 * its own constant, and a constant reaching the exit makes the verifier walk the exit (the
 * verdict counter, events_exit) once per distinct word. The word is stored in the high half
 * of an 8-byte stack slot and read back from there: the verifier keeps a spilled constant
 * through a narrowing read of the slot's low end (6.10+), but not of any other part (6.1 to
 * 6.18), so every path meets the same state and the exit is walked once. One store, one load.
 */
static __always_inline int events_forget(int code)
{
	volatile __u64 slot = (__u64)(__u32)code << 32;

	return *((volatile __u32 *)&slot + 1);
}

/* The event type of a verdict word. */
static __always_inline __u32 events_type(__u32 code)
{
	__u32 action = code & EV_ACTION_MASK, reason = (code >> EV_REASON_SHIFT) & EV_REASON_MASK;

	if (action == XDP_DROP)
		return EV_T_DROP;
	if (action != XDP_TX)
		return EV_T_PASS;
	if (reason == STAT_ICMP_ECHO || reason == STAT_TOO_BIG)
		return EV_T_ICMP;
	return code & EV_F_NEW_FLOW ? EV_T_FLOW : EV_T_FWD;
}

/* Map-touching hooks (balancer.c): the config at entry (stashes the frame when capturing),
 * and the report at exit.
 */
static __always_inline void events_enter(struct xdp_md *ctx);
static __always_inline void events_exit(struct xdp_md *ctx, const struct ev_cfg *ev, __u32 code);

#endif /* XLB_EVENTS_H */
