/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Verdict events to the dp_events ring buffer. A full ring never blocks or
 * changes a verdict: the event is dropped and DP_STAT_EVENTS_LOST counts it.
 */
#ifndef DP_EVENTS_H
#define DP_EVENTS_H

#include "maps.h"
#include "counters.h"
#include "parse.h"

struct dp_result {
	__u32 rule_id;
	__u32 local_id;
	__u32 remote_id;
	__u8 verdict;		/* enum dp_verdict */
	__u8 reason;		/* enum dp_reason */
	__u8 dir;		/* enum dp_direction of the judgement */
	__u8 has_rule;		/* a policy or conntrack decision: count rule_id */
	__u8 judged;		/* the policy was consulted for this packet */
	__u32 expires_s;	/* earliest expiry of the identities judged; 0: never */
	__u32 local_exp;	/* expiries of each side's ipcache entry, as found */
	__u32 remote_exp;
	__u32 now_s;		/* CLOCK_MONOTONIC seconds, compared with expiries */
};

static __always_inline void dp_emit(const struct dp_pkt *p, const struct dp_result *res, __u8 hook,
				    __u32 ifindex)
{
	struct dp_event *e = dp_events_v3.ringbuf_reserve(sizeof(struct dp_event));
	if (!e) {
		dp_stat_inc(DP_STAT_EVENTS_LOST);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(e->saddr, p->t.saddr, 16);
	__builtin_memcpy(e->daddr, p->t.daddr, 16);
	e->sport = p->t.sport;
	e->dport = p->t.dport;
	e->proto = p->t.proto;
	e->family = p->t.family;
	e->dir = res->dir;
	e->verdict = res->verdict;
	e->reason = res->reason;
	e->hook = hook;
	e->pad = 0;
	e->rule_id = res->rule_id;
	e->local_id = res->local_id;
	e->remote_id = res->remote_id;
	e->ifindex = ifindex;
	e->pkt_len = p->len;
	e->pad2 = 0;
	dp_events_v3.ringbuf_submit(e, 0);
}

#endif /* DP_EVENTS_H */
