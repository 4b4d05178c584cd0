/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Address -> identity, longest prefix wins.
 *
 * Default (DP_IDENTITY_HASH): one hash map holding every prefix, masked, with
 * its length in the key, and a list of the lengths present per family,
 * longest first. A lookup probes one exact-match hash per length present
 * and stops at the first hit. Hosts (/32, /128) are probed first, so a known
 * host costs one hash lookup; an unknown address costs one miss per distinct
 * length. The LPM trie costs 5-6x a hash at 1M keys on these machines
 * (docs/datapath.md has the measurement); DP_IDENTITY_LPM builds the trie
 * variant for comparison.
 */
#ifndef DP_IDENTITY_H
#define DP_IDENTITY_H

#include "maps.h"
#include "parse.h"

/* An entry past its expiry (a session that has ended) does not count: the
 * address is the world until the ipcache is rewritten. */
static __always_inline void dp_expire(const __u32 *now_s, __u32 *identity, __u32 *expires_s)
{
	if (*expires_s && *now_s >= *expires_s) {
		*identity = DP_ID_WORLD;
		*expires_s = 0;
	}
}

#ifdef DP_IDENTITY_LPM

static __always_inline void dp_identity_of(__u8 family, const __be32 *addr, __u8 gen, const __u32 *now_s,
					   __u32 *identity, __u32 *expires_s)
{
	struct dp_ip_key k = {};

	*identity = DP_ID_WORLD;
	*expires_s = 0;
	k.family = family;
	k.gen = gen;
	k.prefixlen = 32 + (family == DP_FAMILY_IPV4 ? 32 : 128);	/* family, gen, pad: exact */
	k.addr[0] = addr[0];
	if (family == DP_FAMILY_IPV6) {
		k.addr[1] = addr[1];
		k.addr[2] = addr[2];
		k.addr[3] = addr[3];
	}
	struct dp_ip_val *v = dp_ipcache_v3.lookup(&k);
	if (v) {
		*identity = v->identity;
		*expires_s = v->expires_s;
	}
	dp_expire(now_s, identity, expires_s);
}

#else /* DP_IDENTITY_HASH */

/* IPv4 addresses have zero words 1-3 (struct dp_tuple), so one loop serves
 * both families. The results go to *identity and *expires_s, and now_s is
 * read from there too: all point into the per-CPU scratch value, so that
 * the loop's exits leave the verifier nothing different to track. */
static __always_inline void dp_identity_of(__u8 family, const __be32 *addr, __u8 gen, const __u32 *now_s,
					   __u32 *identity, __u32 *expires_s)
{
	__u32 slot = gen * 2 + (family == DP_FAMILY_IPV6);

	*identity = DP_ID_WORLD;
	*expires_s = 0;
	struct dp_plens *pl = dp_plens_v3.lookup(&slot);
	if (!pl)
		return;

	struct dp_ip_key k = { .family = family, .gen = gen };
	__u32 n = pl->count;
	for (int i = 0; i < DP_MAX_PLENS; i++) {
		if (i >= n)
			break;
		k.prefixlen = pl->e[i].prefixlen;
		k.addr[0] = addr[0] & pl->e[i].mask[0];
		k.addr[1] = addr[1] & pl->e[i].mask[1];
		k.addr[2] = addr[2] & pl->e[i].mask[2];
		k.addr[3] = addr[3] & pl->e[i].mask[3];
		struct dp_ip_val *v = dp_ipcache_v3.lookup(&k);
		if (v) {
			*identity = v->identity;
			*expires_s = v->expires_s;
			break;
		}
	}
	dp_expire(now_s, identity, expires_s);
}

#endif

#endif /* DP_IDENTITY_H */
