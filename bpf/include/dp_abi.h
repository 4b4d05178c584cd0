/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Types shared between the BPF programs and the Python loader.
 *
 * This is the only header Python mirrors (loader/abi.py); tests/bpf/test_abi.py
 * compares both layouts field by field against the BTF the compiler emits.
 * Rules: fixed-width fields, explicit padding, byte order in the type
 * (__be* is network order, everything else host order), enums numbered
 * explicitly and never renumbered. A layout change bumps DP_ABI_VERSION,
 * which is also the _vN suffix of every map name, so a new layout can be
 * loaded next to pins of the old one.
 */
#ifndef DP_ABI_H
#define DP_ABI_H

#define DP_ABI_VERSION 3

/* Reserved identities. Allocated identities start at DP_ID_FIRST_ALLOCATED. */
enum dp_reserved_identity {
	DP_ID_ANY = 0,		/* wildcard in policy keys; never the identity of an address */
	DP_ID_HOST = 1,		/* the host's own addresses */
	DP_ID_WORLD = 2,	/* any address the ipcache does not know */
	DP_ID_CONTROLLER = 3,	/* a controller's address, in a fleet agent's bootstrap state */
	DP_ID_FIRST_ALLOCATED = 256,
};

/* What happened to a packet (also the action of a policy entry). Numbered
 * in order of precedence, so combining matches is taking the maximum:
 * deny beats audit beats allow. */
enum dp_verdict {
	DP_VERDICT_NONE = 0,	/* policy entry: no any-port action, only its port ranges */
	DP_VERDICT_ALLOW = 1,
	DP_VERDICT_AUDIT = 2,	/* would be denied; passed, counted and reported */
	DP_VERDICT_DENY = 3,
};

/*
 * Why a packet got its verdict. Values below DP_REASON_FIRST_DROP pass the
 * packet, values from it up drop it. Counted per reason in dp_reasons.
 */
enum dp_reason {
	DP_REASON_NONE = 0,
	DP_PASS_POLICY = 1,		/* new flow allowed by a policy entry */
	DP_PASS_ESTABLISHED = 2,	/* conntrack hit, packet from the initiator */
	DP_PASS_REPLY = 3,		/* conntrack hit, packet from the responder */
	DP_PASS_RELATED = 4,		/* ICMP error quoting an allowed flow */
	DP_PASS_FRAGMENT = 5,		/* later fragment whose first fragment passed */
	DP_PASS_ARP = 6,
	DP_PASS_ND = 7,			/* IPv6 neighbour and multicast listener discovery */
	DP_PASS_NON_IP = 8,		/* neither IPv4, IPv6 nor ARP: not subject to IP policy */
	DP_PASS_AUDIT = 9,		/* would be denied (audit rule or audit default) */
	DP_PASS_REJUDGED = 10,		/* stale conntrack entry judged again and still allowed */

	DP_REASON_FIRST_DROP = 32,
	DP_DROP_POLICY_DENY = 32,	/* an explicit deny entry matched */
	DP_DROP_POLICY_DEFAULT = 33,	/* no entry matched: default deny */
	DP_DROP_REVOKED = 34,		/* established flow judged again after an epoch change, now denied */
	DP_DROP_L2_TRUNCATED = 35,	/* shorter than its Ethernet/VLAN headers */
	DP_DROP_VLAN_DEPTH = 36,	/* more than two VLAN tags */
	DP_DROP_L3_TRUNCATED = 37,	/* IP header cut short */
	DP_DROP_IP_VERSION = 38,	/* version field disagrees with the EtherType */
	DP_DROP_IPV4_IHL = 39,		/* IHL below 5 */
	DP_DROP_IPV4_LENGTH = 40,	/* total length below the header or beyond the frame */
	DP_DROP_IPV6_LENGTH = 41,	/* payload length beyond the frame */
	DP_DROP_IPV6_EXT_LIMIT = 42,	/* more extension headers than the walk limit */
	DP_DROP_IPV6_EXT_TRUNCATED = 43, /* extension header cut short */
	DP_DROP_L4_TRUNCATED = 44,	/* TCP/UDP/ICMP header cut short (incl. tiny first fragments) */
	DP_DROP_TCP_DOFF = 45,		/* TCP data offset below 5 */
	DP_DROP_FRAG_NO_FIRST = 46,	/* later fragment whose first fragment was not seen */
	DP_DROP_FRAG_DENIED = 47,	/* later fragment whose first fragment was denied */
	DP_DROP_ICMP_UNRELATED = 48,	/* ICMP error quoting a flow that policy does not allow */
	DP_DROP_ICMP_TRUNCATED = 49,	/* ICMP error whose quoted headers are cut short */
	DP_DROP_NON_IP = 50,		/* non-IP EtherType, when loaded with DP_ALLOW_NON_IP=0 */
	DP_REASON_MAX = 64,
};

enum dp_direction {
	DP_DIR_INGRESS = 0,	/* towards the local endpoint: local = destination */
	DP_DIR_EGRESS = 1,	/* from the local endpoint: local = source */
};

enum dp_hook {
	DP_HOOK_XDP_INGRESS = 0,
	DP_HOOK_TC_INGRESS = 1,
	DP_HOOK_TC_EGRESS = 2,
};

enum dp_family {
	DP_FAMILY_IPV4 = 4,
	DP_FAMILY_IPV6 = 6,
};

/* Global counters, one slot each in dp_stats. */
enum dp_stat {
	DP_STAT_EVENTS_LOST = 0,	/* ring buffer full: event dropped, packet unaffected */
	DP_STAT_EVENTS_SAMPLED_OUT = 1,	/* allow events skipped by sampling */
	DP_STAT_CT_CREATED = 2,
	DP_STAT_CT_REJUDGED = 3,	/* stale epoch: flow judged again */
	DP_STAT_CT_EXPIRED = 4,		/* entry past its timeout: flow judged as new */
	DP_STAT_CT_INSERT_FAILED = 5,	/* flow passed statelessly */
	DP_STAT_FRAG_TRACKED = 6,
	DP_STAT_MAX = 16,
};

/* dp_gen.flags: properties of the live generation's policy */
#define DP_GEN_AUDIT_DEFAULT	(1U << 0)	/* no match: pass as audit instead of deny */

/* dp_ct_val.flags */
#define DP_CT_INIT_IS_A		(1U << 0)	/* the initiator is side a of the key */
#define DP_CT_INIT_EGRESS	(1U << 1)	/* the flow was judged in the egress direction */
#define DP_CT_CLOSING		(1U << 2)	/* TCP FIN or RST seen: short timeout */
#define DP_CT_SEEN_REPLY	(1U << 3)	/* a packet from the responder passed: TCP is open */

#define DP_MAX_PLENS		40	/* distinct prefix lengths per family in hash mode */
#define DP_MAX_RANGES		16	/* port ranges per (local, remote, direction, protocol) */

/* ipcache key. Written by the loader, read by every hook. IPv4 uses addr[0]
 * and leaves the rest zero. Hash mode: prefixlen is the prefix length and
 * addr is masked to it. LPM mode: prefixlen also counts the 32 bits of
 * family, generation and pad, so a v4 and a v6 prefix never match each
 * other and each generation is a trie of its own. */
struct dp_ip_key {
	__u32 prefixlen;
	__u8 family;		/* enum dp_family */
	__u8 gen;		/* policy generation, 0 or 1 (struct dp_gen) */
	__u8 pad[2];
	__be32 addr[4];
};

/* ipcache value. Written by the loader, read by every hook. */
struct dp_ip_val {
	__u32 identity;
	__u32 expires_s;	/* CLOCK_MONOTONIC seconds after which the entry no longer
				 * counts (a user session's end); 0: never */
};

/* One prefix length present in the ipcache, with its mask precomputed so
 * the lookup loop has no branches of its own. */
struct dp_plen {
	__u32 prefixlen;
	__be32 mask[4];
};

/* Prefix lengths present in the ipcache for one family, longest first.
 * Written by the loader together with the ipcache; read by hooks (hash mode).
 * Key: generation * 2 + (0 IPv4, 1 IPv6). */
struct dp_plens {
	__u32 count;
	struct dp_plen e[DP_MAX_PLENS];
};

/* Policy key. Written by the loader, read by every hook. A packet probes
 * (remote, proto, port), (remote, proto, 0), (remote, 0, 0) and the same
 * three with remote = DP_ID_ANY; every entry found takes part: deny beats
 * audit beats allow, nothing found is deny. dport is the destination port of
 * the flow's first packet (ICMP echo: the identifier); 0 means any port. */
struct dp_policy_key {
	__u32 local_id;
	__u32 remote_id;	/* DP_ID_ANY: any remote identity */
	__u16 dport;		/* host order; 0: any port */
	__u8 proto;		/* IPPROTO_*; 0: any protocol (then dport is 0) */
	__u8 dir;		/* enum dp_direction */
	__u8 gen;		/* policy generation, 0 or 1 (struct dp_gen) */
	__u8 pad[3];
};

/* Policy value. action applies to every port (only meaningful when the key's
 * dport is 0); ranges, when not 0, indexes dp_ranges for port ranges. */
struct dp_policy_val {
	__u32 rule_id;
	__u8 action;		/* enum dp_verdict; NONE: ranges only */
	__u8 pad;
	__u16 ranges;
};

/* One port range of a range set. */
struct dp_port_range {
	__u16 lo;		/* host order, inclusive */
	__u16 hi;		/* host order, inclusive */
	__u32 rule_id;
	__u8 action;		/* enum dp_verdict */
	__u8 pad[3];
};

/* Port ranges of one policy entry. Written by the loader, read by hooks. */
struct dp_range_set {
	__u32 count;
	struct dp_port_range r[DP_MAX_RANGES];
};

/* Conntrack key: both directions of a flow share one entry because the
 * endpoints are stored in canonical order, (addr_a, port_a) <= (addr_b, port_b)
 * comparing the address bytes first. Written by hooks (and by the loader in
 * tests and benchmarks), read by every hook. */
struct dp_ct_key {
	__be32 addr_a[4];
	__be32 addr_b[4];
	__be16 port_a;
	__be16 port_b;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

/* Conntrack value. epoch is dp_config.epoch when the flow was last judged;
 * a different current epoch, or passing expires_s, makes the entry stale. */
struct dp_ct_val {
	__u64 last_seen_ns;	/* bpf_ktime_get_coarse_ns(), refreshed at most once a second */
	__u32 epoch;
	__u32 rule_id;
	__u32 local_id;
	__u32 remote_id;
	__u8 verdict;		/* ALLOW or AUDIT */
	__u8 flags;		/* DP_CT_* */
	__u8 pad[2];
	__u32 expires_s;	/* earliest expiry of the identities it was judged with; 0: never */
};

/* Fragment tracking key: one IP datagram. Written and read by hooks. */
struct dp_frag_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__u32 id;		/* IPv4 id (16 bits) or IPv6 fragment identification */
	__u8 proto;		/* IPv4 protocol; 0 for IPv6, whose id is unique per address pair
				 * and whose later fragments may name an extension header */
	__u8 family;
	__u8 pad[2];
};

/* Verdict of a datagram's first fragment, applied to the later ones. */
struct dp_frag_val {
	__u64 created_ns;
	__u32 rule_id;
	__u32 local_id;
	__u32 remote_id;
	__be16 sport;
	__be16 dport;
	__u8 verdict;
	__u8 proto;		/* transport protocol of the datagram */
	__u8 pad[6];
};

/* Which policy generation is live. The ipcache, prefix-length and policy
 * maps hold two generations side by side (a field of their keys); the
 * loader writes a whole new state into the idle one and then switches this
 * single value, so every packet is judged entirely by the old state or
 * entirely by the new. One entry, key 0, in a hash map, whose updates
 * replace the value at once (an array update copies in place). Written by
 * the loader, read when a flow is judged. No entry: generation 0. */
struct dp_gen {
	__u32 active;		/* 0 or 1 */
	__u32 flags;		/* DP_GEN_*, of the live generation: switched with it */
};

/* Runtime configuration, one entry. Written by the loader, read by hooks. */
struct dp_config {
	__u32 epoch;		/* bumped on any identity or policy change that can revoke */
	__u32 flags;		/* reserved, zero */
	__u32 allow_sample;	/* report 1 of every N allowed new flows; 0: none */
	__u32 pad;
};

/* Per-CPU packet and byte counter (per reason in dp_reasons). */
struct dp_counter {
	__u64 packets;
	__u64 bytes;
};

/* Per-CPU counters of one rule in dp_rules, by the direction of the
 * judgement (enum dp_direction): packets of a flow count under the
 * direction the flow was judged in, replies included. */
struct dp_rule_counter {
	struct dp_counter dir[2];
};

/* Verdict event. Written by hooks to the dp_events ring buffer, read by the
 * agent. Every deny and audit, and sampled allowed new flows. */
struct dp_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns() */
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 dir;		/* enum dp_direction of the judgement */
	__u8 verdict;		/* enum dp_verdict */
	__u8 reason;		/* enum dp_reason */
	__u8 hook;		/* enum dp_hook */
	__u16 pad;
	__u32 rule_id;
	__u32 local_id;
	__u32 remote_id;
	__u32 ifindex;
	__u32 pkt_len;
	__u32 pad2;
};

#endif /* DP_ABI_H */
