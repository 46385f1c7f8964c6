/* decap_maps.h - every map of the backend decap programs, one comment each.
 *
 * With a pin directory, lb/dataplane/decap.py puts each map on its pin <dir>/<name>
 * (lb.dataplane.loader.adopt_pins), like the balancer's. The names differ from the
 * balancer's, so both programs may share one pin directory.
 */
#ifndef XLB_DECAP_MAPS_H
#define XLB_DECAP_MAPS_H

#include "decap/decap.h"

#define DECAP_MAP(type, key, val, name, size, flags) \
	BPF_F_TABLE(type, key, val, name, size, flags)

/* The backend's own addresses: an outer destination found here is decapsulated. */
DECAP_MAP("hash", struct decap_addr, __u32, decap_addrs, DECAP_MAX_ADDRS, 0);
/* Runtime configuration, one entry. */
DECAP_MAP("array", __u32, struct decap_cfg, decap_cfg, 1, 0);
/* Counters, indexed by enum decap_stat. */
DECAP_MAP("percpu_array", __u32, __u64, decap_stats, DECAP_STAT_MAX, 0);

#endif /* XLB_DECAP_MAPS_H */
