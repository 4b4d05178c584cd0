/* SPDX-License-Identifier: Apache-2.0 */
/* Per-CPU counters: no atomics, the agent sums the CPUs at read time. */
#ifndef DP_COUNTERS_H
#define DP_COUNTERS_H

#include "maps.h"

static __always_inline void dp_count_rule(__u32 rule_id, __u8 dir, __u32 bytes)
{
	struct dp_rule_counter *r = dp_rules_v3.lookup(&rule_id);
	if (r) {
		struct dp_counter *c = &r->dir[dir & 1];
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline void dp_count_reason(__u32 reason, __u32 bytes)
{
	struct dp_counter *c = dp_reasons_v3.lookup(&reason);
	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline void dp_stat_inc(__u32 stat)
{
	__u64 *v = dp_stats_v3.lookup(&stat);
	if (v)
		(*v)++;
}

#endif /* DP_COUNTERS_H */
