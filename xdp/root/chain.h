/* chain.h - the layout of the XDP chain (docs/chain.md), shared by xlb's root program
 * (root.c), the operator's filters (examples/drop_source.c) and user space
 * (lb/dataplane/chain.py keeps these names verbatim; a test compares).
 *
 * The root program on the interface tail-calls the slots of the program array xdp_chain in
 * order: slots 0 .. CHAIN_BALANCER_SLOT - 1 hold the operator's filters, the last slot the
 * balancer. A tail call into an empty slot falls through to the next one. A filter gives
 * its verdict by returning it (XDP_DROP, XDP_TX, ...); to pass a packet on it tail-calls
 * the slots after its own, the same way (CHAIN_PASS_ON below for libbpf programs).
 */
#ifndef XLB_CHAIN_H
#define XLB_CHAIN_H

/* Slots of xdp_chain: the filters, then the balancer. */
#define CHAIN_SLOTS 8
/* The balancer's slot, the last one: every filter runs before it. */
#define CHAIN_BALANCER_SLOT (CHAIN_SLOTS - 1)

#endif /* XLB_CHAIN_H */
