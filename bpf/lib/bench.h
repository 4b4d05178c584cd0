/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Benchmark builds only (bench/, -DDP_BENCH_KEYS=N): BPF_PROG_TEST_RUN
 * repeats one packet, which would hit the same map keys every time and
 * overstate speed 10-20x at large map sizes. This rewrites the parsed IPv4
 * source to one of N addresses from DP_BENCH_BASE (and, with
 * DP_BENCH_RANDOM_SPORT, the source port) after parsing, so every run looks
 * up a random key. Never part of a production load.
 */
#ifndef DP_BENCH_H
#define DP_BENCH_H

#include "parse.h"

#ifndef DP_BENCH_BASE
#define DP_BENCH_BASE 0x0a000000	/* 10.0.0.0 */
#endif

static __always_inline void dp_bench_randomize(struct dp_pkt *p)
{
	__u32 r = bpf_get_prandom_u32();

	if (p->t.family != DP_FAMILY_IPV4)
		return;
	p->t.saddr[0] = dp_htonl(DP_BENCH_BASE + (r & (DP_BENCH_KEYS - 1)));
#ifdef DP_BENCH_RANDOM_SPORT
	p->t.sport = dp_htons(1024 + bpf_get_prandom_u32() % (65536 - 1024));
#endif
}

#endif /* DP_BENCH_H */
