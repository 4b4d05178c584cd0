/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Conntrack: one LRU entry per flow, shared by all hooks, found from either
 * direction because the key stores the two endpoints in canonical order.
 * An entry remembers which side initiated and in which direction the flow
 * was judged, so a stale entry (epoch changed) can be judged again exactly
 * as its first packet was.
 */
#ifndef DP_CONNTRACK_H
#define DP_CONNTRACK_H

#include "maps.h"
#include "parse.h"

/* Refresh last_seen at most this often: one write per flow per second. */
#define DP_CT_REFRESH_NS DP_NS_PER_SEC

/* Fills k in canonical order; returns 1 when the packet's source is side a. */
static __always_inline int dp_ct_key_of(const struct dp_pkt *p, struct dp_ct_key *k)
{
	int cmp = 0;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (cmp == 0 && p->t.saddr[i] != p->t.daddr[i])
			cmp = dp_ntohl(p->t.saddr[i]) < dp_ntohl(p->t.daddr[i]) ? -1 : 1;
	}
	if (cmp == 0)
		cmp = dp_ntohs(p->t.sport) <= dp_ntohs(p->t.dport) ? -1 : 1;

	k->proto = p->t.proto;
	k->family = p->t.family;
	if (cmp < 0) {
		__builtin_memcpy(k->addr_a, p->t.saddr, 16);
		__builtin_memcpy(k->addr_b, p->t.daddr, 16);
		k->port_a = p->t.sport;
		k->port_b = p->t.dport;
		return 1;
	}
	__builtin_memcpy(k->addr_a, p->t.daddr, 16);
	__builtin_memcpy(k->addr_b, p->t.saddr, 16);
	k->port_a = p->t.dport;
	k->port_b = p->t.sport;
	return 0;
}

/* The flow's first packet, rebuilt from the entry: what a stale entry is judged on. */
static __always_inline void dp_ct_first_packet(const struct dp_ct_key *k, const struct dp_ct_val *v,
					       struct dp_tuple *first)
{
	first->family = k->family;
	first->proto = k->proto;
	if (v->flags & DP_CT_INIT_IS_A) {
		__builtin_memcpy(first->saddr, k->addr_a, 16);
		__builtin_memcpy(first->daddr, k->addr_b, 16);
		first->sport = k->port_a;
		first->dport = k->port_b;
	} else {
		__builtin_memcpy(first->saddr, k->addr_b, 16);
		__builtin_memcpy(first->daddr, k->addr_a, 16);
		first->sport = k->port_b;
		first->dport = k->port_a;
	}
}

/* How long an entry outlives its last packet. A TCP flow gets the long
 * timeout only once the responder has answered: a SYN flood of allowed
 * flows ties up the table for DP_CT_TIMEOUT_OPENING, not for hours. The
 * agent's collector (loader/ctgc.py) applies the same rule. */
static __always_inline __u64 dp_ct_lifetime_ns(__u8 proto, __u8 flags)
{
	if (flags & DP_CT_CLOSING)
		return DP_CT_TIMEOUT_CLOSING * DP_NS_PER_SEC;
	if (proto == IPPROTO_TCP)
		return (flags & DP_CT_SEEN_REPLY ? DP_CT_TIMEOUT_TCP : DP_CT_TIMEOUT_OPENING) * DP_NS_PER_SEC;
	return DP_CT_TIMEOUT_OTHER * DP_NS_PER_SEC;
}

/* An entry past its timeout, or a closed TCP flow whose tuple a new SYN
 * reuses, no longer vouches for the packet. */
static __always_inline int dp_ct_usable(const struct dp_ct_val *v, const struct dp_pkt *p, __u64 now)
{
	if (now - v->last_seen_ns > dp_ct_lifetime_ns(p->t.proto, v->flags))
		return 0;
	if ((v->flags & DP_CT_CLOSING) && p->t.proto == IPPROTO_TCP &&
	    (p->tcp_flags & (DP_TCP_SYN | DP_TCP_ACK)) == DP_TCP_SYN)
		return 0;
	return 1;
}

/* A packet of the flow passed: refresh last_seen (at most once a second),
 * note the responder's first answer and a TCP close. from_initiator: the
 * packet comes from the side that opened the flow. */
static __always_inline void dp_ct_touch(struct dp_ct_val *v, const struct dp_pkt *p, __u64 now,
					int from_initiator)
{
	if (now - v->last_seen_ns > DP_CT_REFRESH_NS)
		v->last_seen_ns = now;
	if (!from_initiator && !p->icmp_error && !(v->flags & DP_CT_SEEN_REPLY))
		v->flags |= DP_CT_SEEN_REPLY;
	if (p->t.proto == IPPROTO_TCP && !p->icmp_error &&
	    (p->tcp_flags & (DP_TCP_FIN | DP_TCP_RST)) && !(v->flags & DP_CT_CLOSING))
		v->flags |= DP_CT_CLOSING;
}

#endif /* DP_CONNTRACK_H */
