"""Data-plane constants used from Python, named exactly as in xdp/common/consts.h.

tests/test_consts.py parses the C header and fails if a value here differs, so the header
stays the one source of truth and this file cannot drift silently.
"""

from __future__ import annotations

FAMILY_V4 = 4
FAMILY_V6 = 6

REAL_NONE = 0

# A ch_rings word: backend index (bits 0-15), second hop (bits 16-31; docs/second-chance.md).
RING_REAL_MASK = 0xFFFF
RING_PREV_SHIFT = 16

# The VIP address filter (struct vip_filter): 2^VIP_FILTER_LOG2 bits, the hash's multiplier.
VIP_FILTER_LOG2 = 16
VIP_FILTER_WORDS = 1 << (VIP_FILTER_LOG2 - 6)
VIP_FILTER_MULT = 0x9E3779B1

# The connection table (docs/conn-table.md): ways per set, way tags, the meta word's fields.
CONN_WAYS = 8
CONN_TAG_EMPTY = 0
CONN_TAG_BUSY = 1
CONN_TAG_SET = 2
CONN_REAL_MASK = 0xFFFFF
CONN_VIP_SHIFT = 20
CONN_VIP_MASK = 0xFFFF
CONN_F_UDP = 1 << 36
CONN_F_CLOSING = 1 << 37
CONN_STAMP_SHIFT = 38
CONN_STAMP_MASK = 0x3FFFFFF
CONN_STAMP_NS_SHIFT = 24
CONN_SEED = 0x636F6E6E

#: A closing TCP entry counts as live this long after the client's last FIN or RST (the last
#: ACKs): drains and the live-flow count use it.
CLOSING_GRACE_S = 2.0
# UDP connection-table idle timeout when lb_cfg.udp_timeout_ns is 0.
UDP_TIMEOUT_DEFAULT_S = 30

# VIP flags (struct vip_meta.flags).
F_HASH_SRC_ONLY = 1 << 0
F_LRU_BYPASS = 1 << 1
F_ENCAP_GUE = 1 << 2
F_SRC_LB = 1 << 3
F_SRC_RANGES = 1 << 8
F_SRC_ALLOW = 1 << 9

# Source-range verdicts (values of src_v4 / src_v6).
SRC_ALLOW = 1
SRC_DENY = 2

# SYN-flood guard (struct guard_cfg, docs/protection.md).
GUARD_MODE_OFF = 0
GUARD_MODE_AUTO = 1
GUARD_MODE_ALWAYS = 2
GUARD_WINDOW_SHIFT = 27

# Reply token buckets (rl_buckets slots).
RL_ECHO = 0
RL_TOO_BIG = 1
RL_SLOTS = 2

# Backend flags (struct real_def.flags).
REAL_F_V6 = 1 << 0

# Global counter slots (enum glob_stat), in order.
GLOB_STATS: tuple[str, ...] = (
    "STAT_XDP_PASS",
    "STAT_XDP_DROP",
    "STAT_XDP_TX",
    "STAT_PASS_NOT_IP",
    "STAT_PASS_NON_VIP",
    "STAT_MALFORMED",
    "STAT_LRU_HIT",
    "STAT_LRU_MISS_SYN",
    "STAT_LRU_MISS_OTHER",
    "STAT_ICMP_ECHO",
    "STAT_ICMP_FWD",
    "STAT_TOO_BIG",
    "STAT_FRAG",
    "STAT_IP_OPTIONS",
    "STAT_NO_BACKEND",
    "STAT_ENCAP_FAIL",
    "STAT_PASS_ICMP",
    "STAT_LRU_EXPIRED",
    "STAT_LRU_REAL_GONE",
    "STAT_CONN_EVICT",
    "STAT_PASS_NOT_OURS",
    "STAT_ICMP_SRC_BAD",
    "STAT_SECOND_HOP",
    "STAT_SECOND_SKIP",
    "STAT_SRC_DENIED",
    "STAT_ICMP_ECHO_LIMITED",
    "STAT_TOO_BIG_LIMITED",
    "STAT_GUARD_FLOOD",
    "STAT_GUARD_SYN_STATELESS",
    "STAT_GUARD_NO_EVICT",
)
STAT_MAX = len(GLOB_STATS)
STAT_INDEX: dict[str, int] = {name: i for i, name in enumerate(GLOB_STATS)}

# XDP verdicts (enum xdp_action in the kernel UAPI).
XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
XDP_REDIRECT = 4
VERDICT_NAMES = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}
