/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map, pinned under DP_PIN_DIR. bcc opens a pin that exists and
 * creates and pins one that does not, so the first program loaded creates
 * the maps and every later one (and every later process) shares them. The
 * loader checks a pinned map's shape against what it is about to load
 * before compiling (loader/instance.py), because bcc would not.
 *
 * Map names carry the ABI version (dp_abi.h); bcc cannot use maps through
 * macros, so the versioned names are spelled out in the code.
 */
#ifndef DP_MAPS_H
#define DP_MAPS_H

#include "dp_abi.h"
#include "config.h"

#define DP_PIN(name) DP_PIN_DIR "/" #name

/* Address -> identity, for both ends of a packet. */
#ifdef DP_IDENTITY_LPM
BPF_TABLE_PINNED("lpm_trie", struct dp_ip_key, struct dp_ip_val, dp_ipcache_v3,
		 DP_IPCACHE_MAX, DP_PIN(dp_ipcache_v3), BPF_F_NO_PREALLOC);
#else
BPF_TABLE_PINNED("hash", struct dp_ip_key, struct dp_ip_val, dp_ipcache_v3,
		 DP_IPCACHE_MAX, DP_PIN(dp_ipcache_v3));
#endif
/* Prefix lengths in dp_ipcache_v3, per generation and family (hash mode). A
 * hash, not an array: a hash update swaps the whole value in at once, an
 * array update copies into the live value and a reader could see half a list. */
BPF_TABLE_PINNED("hash", __u32, struct dp_plens, dp_plens_v3, 4, DP_PIN(dp_plens_v3));

/* The live policy generation (struct dp_gen). */
BPF_TABLE_PINNED("hash", __u32, struct dp_gen, dp_gen_v3, 1, DP_PIN(dp_gen_v3));

/* (local identity, remote identity, port, protocol, direction) -> action. */
BPF_TABLE_PINNED("hash", struct dp_policy_key, struct dp_policy_val, dp_policy_v3,
		 DP_POLICY_MAX, DP_PIN(dp_policy_v3));
/* Port range sets, referenced by index from dp_policy_v3 values. A set in
 * use is never rewritten (array updates are not atomic): the loader writes a
 * new set at a free index, then switches the policy entry to it. */
BPF_TABLE_PINNED("array", __u32, struct dp_range_set, dp_ranges_v3, DP_RANGES_MAX,
		 DP_PIN(dp_ranges_v3));

/* Flows admitted, shared by all hooks. A plain hash, not an LRU: a full
 * table refuses new entries (the flow passes statelessly and
 * DP_STAT_CT_INSERT_FAILED counts it) instead of evicting an established
 * flow, so a flood of new flows cannot cut connections already admitted.
 * The agent deletes expired entries (loader/ctgc.py). */
BPF_TABLE_PINNED("hash", struct dp_ct_key, struct dp_ct_val, dp_ct_v3, DP_CT_MAX,
		 DP_PIN(dp_ct_v3));
BPF_TABLE_PINNED("lru_hash", struct dp_frag_key, struct dp_frag_val, dp_frag_v3, DP_FRAG_MAX,
		 DP_PIN(dp_frag_v3));

BPF_TABLE_PINNED("array", __u32, struct dp_config, dp_config_v3, 1, DP_PIN(dp_config_v3));

/* Counters, per CPU: per rule id, per reason, and global stats. */
BPF_TABLE_PINNED("percpu_array", __u32, struct dp_rule_counter, dp_rules_v3, DP_RULES_MAX,
		 DP_PIN(dp_rules_v3));
BPF_TABLE_PINNED("percpu_array", __u32, struct dp_counter, dp_reasons_v3, DP_REASON_MAX,
		 DP_PIN(dp_reasons_v3));
BPF_TABLE_PINNED("percpu_array", __u32, __u64, dp_stats_v3, DP_STAT_MAX, DP_PIN(dp_stats_v3));

/* Verdict events. bcc's BPF_RINGBUF_OUTPUT cannot be pinned, so this spells
 * out the same table shape with a pinned section name. */
struct dp_events_v2_table_t {
	int key;
	u32 leaf;
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" DP_PIN(dp_events_v3))))
struct dp_events_v2_table_t dp_events_v3 = { .max_entries = DP_EVENTS_BYTES };

#endif /* DP_MAPS_H */
