/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Policy: (local identity, remote identity, direction, protocol, port) ->
 * verdict and the rule that decided it.
 *
 * A new flow probes at most six keys, most specific first:
 *   (remote, proto, port)  (remote, proto, any port + ranges)  (remote, any proto)
 * Port ranges hang off the (remote, proto, any port) entries only.
 * and the same three for remote = DP_ID_ANY. Every entry found takes part:
 * deny beats audit beats allow (enum dp_verdict is numbered so that this is
 * the maximum), and among equals the first found, the most specific, names
 * the rule. So the datapath honours an explicit deny without help from the
 * compiler. A deny ends the probing. No entry: deny, or audit when the
 * policy runs in audit mode (DP_GEN_AUDIT_DEFAULT). Only new flows and
 * stale conntrack entries come here.
 */
#ifndef DP_POLICY_H
#define DP_POLICY_H

#include "maps.h"

struct dp_decision {
	__u32 rule_id;
	__u8 verdict;		/* enum dp_verdict */
	__u8 reason;		/* enum dp_reason */
};

/* Takes one matching entry into account; returns 1 once a deny settled it. */
static __always_inline int dp_fold(struct dp_decision *d, __u8 action, __u32 rule_id)
{
	if (action > d->verdict) {
		d->verdict = action;
		d->rule_id = rule_id;
	}
	return d->verdict >= DP_VERDICT_DENY;
}

static __always_inline int dp_probe(struct dp_policy_key *k, __u16 port, int with_ranges,
				    struct dp_decision *d)
{
	struct dp_policy_val *v = dp_policy_v3.lookup(k);
	if (!v)
		return 0;
	if (with_ranges && v->ranges) {
		/* The loader sorts a set deny, audit, allow, so the first range
		 * holding the port has the highest action of all that do. The
		 * match is folded inside the loop so that nothing indexed by i
		 * outlives it: the verifier then merges all the loop's exits. */
		__u32 idx = v->ranges;
		struct dp_range_set *rs = dp_ranges_v3.lookup(&idx);
		if (rs) {
			__u32 n = rs->count;
			for (int i = 0; i < DP_MAX_RANGES; i++) {
				if (i >= n)
					break;
				if ((__u16)(port - rs->r[i].lo) <= (__u16)(rs->r[i].hi - rs->r[i].lo)) {
					dp_fold(d, rs->r[i].action, rs->r[i].rule_id);
					break;
				}
			}
			if (d->verdict >= DP_VERDICT_DENY)
				return 1;
		}
	}
	return dp_fold(d, v->action, v->rule_id);
}

static __always_inline void dp_policy_decide(__u32 local_id, __u32 remote_id, __u8 dir, __u8 proto,
					     __u16 port, __u8 gen, __u32 gen_flags, struct dp_decision *d)
{
	struct dp_policy_key k = { .local_id = local_id, .dir = dir, .gen = gen };

	d->verdict = DP_VERDICT_NONE;
	d->rule_id = 0;
#pragma unroll
	for (int probe = 0; probe < 6; probe++) {
		int specificity = probe % 3;	/* 0: port, 1: protocol, 2: any */

		k.remote_id = probe < 3 ? remote_id : DP_ID_ANY;
		k.proto = specificity == 2 ? 0 : proto;
		k.dport = specificity == 0 ? port : 0;
		/* A portless packet probes its (proto, 0) key twice; finding an
		 * entry twice changes nothing, and not branching on it keeps the
		 * verifier's state count down. */
		if (dp_probe(&k, port, specificity == 1, d))
			break;
	}

	switch (d->verdict) {
	case DP_VERDICT_DENY:
		d->reason = DP_DROP_POLICY_DENY;
		break;
	case DP_VERDICT_AUDIT:
		d->reason = DP_PASS_AUDIT;
		break;
	case DP_VERDICT_ALLOW:
		d->reason = DP_PASS_POLICY;
		break;
	default:
		d->rule_id = 0;
		if (gen_flags & DP_GEN_AUDIT_DEFAULT) {
			d->verdict = DP_VERDICT_AUDIT;
			d->reason = DP_PASS_AUDIT;
		} else {
			d->verdict = DP_VERDICT_DENY;
			d->reason = DP_DROP_POLICY_DEFAULT;
		}
	}
}

#endif /* DP_POLICY_H */
