/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Per-load options. The loader passes every one of these as a -D cflag
 * (loader/compile.py); the defaults here only make the headers compile on
 * their own. Runtime knobs (epoch, audit default, sampling) live in the
 * dp_config map instead, so changing them needs no reload.
 */
#ifndef DP_CONFIG_H
#define DP_CONFIG_H

#ifndef DP_PIN_DIR
#define DP_PIN_DIR "/sys/fs/bpf/dataplane"
#endif

/* Map capacities. */
/* The ipcache and policy maps hold two generations: half each is usable. */
#ifndef DP_IPCACHE_MAX
#define DP_IPCACHE_MAX 262144
#endif
#ifndef DP_POLICY_MAX
#define DP_POLICY_MAX 262144
#endif
#ifndef DP_RANGES_MAX
#define DP_RANGES_MAX 4096
#endif
#ifndef DP_CT_MAX
#define DP_CT_MAX 262144
#endif
#ifndef DP_FRAG_MAX
#define DP_FRAG_MAX 8192
#endif
#ifndef DP_RULES_MAX
#define DP_RULES_MAX 65536
#endif
#ifndef DP_EVENTS_BYTES
#define DP_EVENTS_BYTES (256 * 1024)
#endif

/* Conntrack timeouts in seconds (Cilium's and nf_conntrack's orders of magnitude). */
#ifndef DP_CT_TIMEOUT_TCP
#define DP_CT_TIMEOUT_TCP 21600
#endif
/* A TCP flow the responder has not answered yet (a SYN and nothing back). */
#ifndef DP_CT_TIMEOUT_OPENING
#define DP_CT_TIMEOUT_OPENING 60
#endif
#ifndef DP_CT_TIMEOUT_CLOSING
#define DP_CT_TIMEOUT_CLOSING 10
#endif
#ifndef DP_CT_TIMEOUT_OTHER
#define DP_CT_TIMEOUT_OTHER 60
#endif
/* How long a first fragment's verdict covers the later fragments. */
#ifndef DP_FRAG_TIMEOUT
#define DP_FRAG_TIMEOUT 30
#endif

/* Parser bounds. */
#ifndef DP_IPV6_MAX_EXT
#define DP_IPV6_MAX_EXT 6
#endif

/* Identity structure: hash per prefix length (default) or one LPM trie. */
#if !defined(DP_IDENTITY_HASH) && !defined(DP_IDENTITY_LPM)
#define DP_IDENTITY_HASH 1
#endif

/* Non-IP EtherTypes other than ARP: 1 pass (default), 0 drop. */
#ifndef DP_ALLOW_NON_IP
#define DP_ALLOW_NON_IP 1
#endif

#define DP_NS_PER_SEC 1000000000ULL

#endif /* DP_CONFIG_H */
