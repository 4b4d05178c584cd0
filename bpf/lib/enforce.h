/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The per-packet pipeline shared by every hook:
 *   parse -> (later fragment: follow the first) -> conntrack -> identities ->
 *   policy -> conntrack insert -> counters and events.
 * Entry files only adapt their context (XDP or skb) and map the outcome to
 * their return codes.
 */
#ifndef DP_ENFORCE_H
#define DP_ENFORCE_H

#include "maps.h"
#include "parse.h"
#include "identity.h"
#include "policy.h"
#include "conntrack.h"
#include "counters.h"
#include "events.h"
#ifdef DP_BENCH_KEYS
#include "bench.h"
#endif

/* Judges flow t as seen in direction dir: local is the destination for
 * ingress, the source for egress. Identities and policy come from the live
 * generation, read once, so one judgement never mixes two states. */
static __always_inline void dp_judge(const struct dp_tuple *t, __u8 dir, struct dp_decision *d,
				     struct dp_result *res)
{
	__u32 zero = 0;
	struct dp_gen *g = dp_gen_v3.lookup(&zero);
	__u8 gen = g ? g->active & 1 : 0;
	__u32 gen_flags = g ? g->flags : 0;

	dp_identity_of(t->family, dir == DP_DIR_INGRESS ? t->daddr : t->saddr, gen, &res->now_s,
		       &res->local_id, &res->local_exp);
	dp_identity_of(t->family, dir == DP_DIR_INGRESS ? t->saddr : t->daddr, gen, &res->now_s,
		       &res->remote_id, &res->remote_exp);
	res->expires_s = res->local_exp;
	if (res->remote_exp && (!res->expires_s || res->remote_exp < res->expires_s))
		res->expires_s = res->remote_exp;
	dp_policy_decide(res->local_id, res->remote_id, dir, t->proto, dp_ntohs(t->dport), gen, gen_flags, d);
	res->dir = dir;
	res->rule_id = d->rule_id;
	res->verdict = d->verdict;
	res->reason = d->reason;
	res->has_rule = 1;
	res->judged = 1;
}

/* The datagram a fragment belongs to: the packet's own addresses, also for
 * an ICMP error, whose p->t holds the quoted flow. */
static __always_inline void dp_frag_key_of(const struct dp_pkt *p, struct dp_frag_key *fk)
{
	const struct dp_tuple *t = p->icmp_error ? &p->outer : &p->t;

	__builtin_memcpy(fk->saddr, t->saddr, 16);
	__builtin_memcpy(fk->daddr, t->daddr, 16);
	fk->id = p->frag_id;
	fk->proto = t->family == DP_FAMILY_IPV4 ? t->proto : 0;
	fk->family = t->family;
}

/* A later fragment has no ports: it gets its first fragment's verdict. */
static __always_inline void dp_follow_fragment(struct dp_pkt *p, __u64 now, struct dp_result *res)
{
	struct dp_frag_key fk = {};

	dp_frag_key_of(p, &fk);
	struct dp_frag_val *fv = dp_frag_v3.lookup(&fk);
	if (!fv || now - fv->created_ns > DP_FRAG_TIMEOUT * DP_NS_PER_SEC) {
		res->verdict = DP_VERDICT_DENY;
		res->reason = DP_DROP_FRAG_NO_FIRST;
		return;
	}
	p->t.sport = fv->sport;
	p->t.dport = fv->dport;
	p->t.proto = fv->proto;
	res->rule_id = fv->rule_id;
	res->local_id = fv->local_id;
	res->remote_id = fv->remote_id;
	res->verdict = fv->verdict;
	res->has_rule = 1;
	res->reason = fv->verdict == DP_VERDICT_DENY ? DP_DROP_FRAG_DENIED : DP_PASS_FRAGMENT;
}

static __always_inline void dp_track_fragment(const struct dp_pkt *p, __u64 now, const struct dp_result *res)
{
	struct dp_frag_key fk = {};
	struct dp_frag_val fv = {};

	dp_frag_key_of(p, &fk);
	fv.created_ns = now;
	fv.rule_id = res->rule_id;
	fv.local_id = res->local_id;
	fv.remote_id = res->remote_id;
	fv.sport = p->t.sport;
	fv.dport = p->t.dport;
	fv.proto = p->t.proto;
	fv.verdict = res->reason < DP_REASON_FIRST_DROP ? res->verdict : DP_VERDICT_DENY;
	if (dp_frag_v3.update(&fk, &fv) == 0)
		dp_stat_inc(DP_STAT_FRAG_TRACKED);
}

static __always_inline void dp_ct_admit(struct dp_ct_key *ck, int src_is_a, __u32 epoch, __u64 now,
					const struct dp_result *res)
{
	struct dp_ct_val v = {};

	v.last_seen_ns = now;
	v.epoch = epoch;
	v.rule_id = res->rule_id;
	v.local_id = res->local_id;
	v.remote_id = res->remote_id;
	v.verdict = res->verdict;
	v.expires_s = res->expires_s;
	v.flags = (src_is_a ? DP_CT_INIT_IS_A : 0) | (res->dir == DP_DIR_EGRESS ? DP_CT_INIT_EGRESS : 0);
	if (dp_ct_v3.update(ck, &v) == 0)
		dp_stat_inc(DP_STAT_CT_CREATED);
	else
		dp_stat_inc(DP_STAT_CT_INSERT_FAILED);
}

/*
 * Per-CPU working memory for one packet. Everything the pipeline computes
 * lives here rather than on the stack: the verifier does not track what a
 * map value holds, so the many states that parsing and policy probing would
 * otherwise leave behind (one per protocol, fragment kind, match so far...)
 * collapse into one, and verification stays linear in program size.
 */
struct dp_scratch {
	struct dp_pkt p;
	struct dp_tuple subject;	/* the flow being judged */
	struct dp_result res;
	struct dp_decision d;
};
BPF_PERCPU_ARRAY(dp_scratch, struct dp_scratch, 1);

enum dp_judgement {
	DP_JUDGE_NEW,		/* no usable conntrack entry: the packet starts a flow */
	DP_JUDGE_STALE,		/* entry from an older epoch: judge its first packet again */
	DP_JUDGE_RELATED,	/* ICMP error about an untracked flow: judge the quoted flow */
};

/* Judges an IP packet the parser accepted; fills res. Policy is consulted
 * from exactly one place, which keeps the verifier's work linear. */
static __always_inline void dp_enforce_ip(struct dp_scratch *s, __u8 dir, const struct dp_config *cfg)
{
	struct dp_pkt *p = &s->p;
	struct dp_result *res = &s->res;
	__u64 now = bpf_ktime_get_coarse_ns();
	__u8 judge_dir = dir;
	int kind = DP_JUDGE_NEW;

	res->dir = dir;
	res->now_s = now / DP_NS_PER_SEC;
	if (p->frag == DP_FRAG_LATER) {
		dp_follow_fragment(p, now, res);
		return;
	}

	struct dp_ct_key ck = {};
	int src_is_a = dp_ct_key_of(p, &ck);
	struct dp_ct_val *ct = dp_ct_v3.lookup(&ck);
	if (ct && !dp_ct_usable(ct, p, now)) {
		dp_stat_inc(DP_STAT_CT_EXPIRED);
		ct = NULL;
	}
	int from_initiator = ct && src_is_a == !!(ct->flags & DP_CT_INIT_IS_A);
	/* An echo request from the responder (or a reply from the initiator) is
	 * not part of the tracked exchange: it starts a flow of its own. */
	if (ct && p->echo && from_initiator != (p->echo == DP_ECHO_REQUEST))
		ct = NULL;

	/* Current epoch and no identity of the flow past its expiry. */
	if (ct && ct->epoch == cfg->epoch && !(ct->expires_s && res->now_s >= ct->expires_s)) {
		res->rule_id = ct->rule_id;
		res->local_id = ct->local_id;
		res->remote_id = ct->remote_id;
		res->verdict = ct->verdict;
		res->dir = (ct->flags & DP_CT_INIT_EGRESS) ? DP_DIR_EGRESS : DP_DIR_INGRESS;
		res->has_rule = 1;
		if (p->icmp_error)
			res->reason = DP_PASS_RELATED;
		else
			res->reason = from_initiator ? DP_PASS_ESTABLISHED : DP_PASS_REPLY;
		dp_ct_touch(ct, p, now, from_initiator);
		goto out;
	}

	if (ct) {
		kind = DP_JUDGE_STALE;
		dp_stat_inc(DP_STAT_CT_REJUDGED);
		dp_ct_first_packet(&ck, ct, &s->subject);
		judge_dir = (ct->flags & DP_CT_INIT_EGRESS) ? DP_DIR_EGRESS : DP_DIR_INGRESS;
	} else {
		s->subject = p->t;
		if (p->icmp_error) {
			/* The quoted packet travelled the other way. */
			kind = DP_JUDGE_RELATED;
			judge_dir = !dir;
		}
	}

	dp_judge(&s->subject, judge_dir, &s->d, res);
	int allowed = res->reason < DP_REASON_FIRST_DROP;

	if (kind == DP_JUDGE_RELATED) {
		/* Not admitted: an error is no flow of its own. Its later
		 * fragments still follow this verdict (below). */
		res->reason = allowed ? DP_PASS_RELATED : DP_DROP_ICMP_UNRELATED;
		goto out;
	}
	if (kind == DP_JUDGE_STALE) {
		if (!allowed) {
			dp_ct_v3.delete(&ck);
			res->reason = DP_DROP_REVOKED;
			goto out;
		}
		/* Judged as the flow's first packet was: the flow keeps its direction. */
		if (ct) {	/* always true here; the verifier cannot tell */
			ct->epoch = cfg->epoch;
			ct->rule_id = res->rule_id;
			ct->verdict = res->verdict;
			ct->local_id = res->local_id;
			ct->remote_id = res->remote_id;
			ct->expires_s = res->expires_s;
			dp_ct_touch(ct, p, now, from_initiator);
		}
		res->reason = p->icmp_error ? DP_PASS_RELATED : DP_PASS_REJUDGED;
		goto out;
	}
	if (allowed)
		dp_ct_admit(&ck, src_is_a, cfg->epoch, now, res);
out:
	if (p->frag == DP_FRAG_FIRST)
		dp_track_fragment(p, now, res);
}

/* Parses, judges, counts and reports one packet. Returns 1 to pass it. */
static __always_inline int dp_process(void *data, void *data_end, __u32 pkt_len, __u8 hook, __u8 dir,
				      __u32 ifindex)
{
	__u32 zero = 0;

	struct dp_config *cfg = dp_config_v3.lookup(&zero);
	struct dp_scratch *s = dp_scratch.lookup(&zero);
	if (!cfg || !s)
		return 0;	/* cannot happen: array maps always hold index 0 */
	__builtin_memset(s, 0, sizeof(*s));

	struct dp_pkt *p = &s->p;
	struct dp_result *res = &s->res;
	res->dir = dir;
	p->parse_reason = dp_parse(data, data_end, pkt_len, p);
#ifdef DP_BENCH_PARSE_ONLY
	return p->parse_reason < DP_REASON_FIRST_DROP;	/* benchmark builds: the parser's own cost */
#endif
#ifdef DP_BENCH_KEYS
	dp_bench_randomize(p);
#endif
	if (p->parse_reason == DP_REASON_NONE) {
		dp_enforce_ip(s, dir, cfg);
	} else {
		res->reason = p->parse_reason;
		res->verdict = res->reason < DP_REASON_FIRST_DROP ? DP_VERDICT_ALLOW : DP_VERDICT_DENY;
	}

	int pass = res->reason < DP_REASON_FIRST_DROP;
	dp_count_reason(res->reason, p->len);
	if (res->has_rule)
		dp_count_rule(res->rule_id, res->dir, p->len);

	if (!pass || (res->judged && res->verdict == DP_VERDICT_AUDIT)) {
		dp_emit(p, res, hook, ifindex);
	} else if (res->judged && res->verdict == DP_VERDICT_ALLOW) {
		if (cfg->allow_sample && bpf_get_prandom_u32() % cfg->allow_sample == 0)
			dp_emit(p, res, hook, ifindex);
		else
			dp_stat_inc(DP_STAT_EVENTS_SAMPLED_OUT);
	}
	return pass;
}

#endif /* DP_ENFORCE_H */
