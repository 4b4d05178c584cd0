/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Packet parser: Ethernet, up to two VLAN tags, IPv4 (options, fragments),
 * IPv6 (bounded extension-header walk), TCP, UDP, ICMP, ICMPv6.
 *
 * Every parse_* step takes a cursor and either advances it or returns a
 * reason from enum dp_reason. Bounds checks all take one form: compute the
 * end of what is about to be read, compare it with c->end, then read.
 * Offsets added to the cursor are bounded first, so the verifier can follow
 * the pointer arithmetic.
 */
#ifndef DP_PARSE_H
#define DP_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "dp_abi.h"
#include "config.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "dataplane BPF programs assume a little-endian target"
#endif
#define dp_ntohs(x) ((__u16)__builtin_bswap16(x))
#define dp_htons(x) ((__be16)__builtin_bswap16(x))
#define dp_ntohl(x) ((__u32)__builtin_bswap32(x))
#define dp_htonl(x) ((__be32)__builtin_bswap32(x))

#define DP_ETH_P_8021Q	0x8100
#define DP_ETH_P_8021AD	0x88A8
#define DP_ETH_P_ARP	0x0806
#define DP_ETH_P_IP	0x0800
#define DP_ETH_P_IPV6	0x86DD

#define DP_IPPROTO_HOPOPTS	0
#define DP_IPPROTO_ROUTING	43
#define DP_IPPROTO_FRAGMENT	44
#define DP_IPPROTO_AH		51
#define DP_IPPROTO_DSTOPTS	60

#define DP_TCP_FIN 0x01
#define DP_TCP_SYN 0x02
#define DP_TCP_RST 0x04
#define DP_TCP_ACK 0x10

/* Largest IPv6 extension-header chain the walk follows, in bytes. */
#define DP_IPV6_EXT_MAX_BYTES 1024

enum dp_frag_kind {
	DP_FRAG_NONE = 0,
	DP_FRAG_FIRST = 1,	/* offset 0, more fragments follow: carries the L4 header */
	DP_FRAG_LATER = 2,	/* offset > 0: no L4 header, follows the first's verdict */
};

enum dp_echo_kind {
	DP_ECHO_NONE = 0,
	DP_ECHO_REQUEST = 1,
	DP_ECHO_REPLY = 2,
};

/* A flow as policy sees it: the five-tuple and the address family. */
struct dp_tuple {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;		/* ICMP echo: the identifier, in both ports */
	__u8 family;		/* enum dp_family */
	__u8 proto;
	__u8 pad[2];
};

/* What the parser extracted. For an ICMP error the tuple is the flow the
 * error quotes and icmp_error is set. */
struct dp_pkt {
	struct dp_tuple t;
	struct dp_tuple outer;	/* ICMP error: the error's own tuple (its fragment key) */
	__u32 frag_id;
	__u32 len;		/* bytes on the wire, for counters */
	__u8 tcp_flags;
	__u8 frag;		/* enum dp_frag_kind */
	__u8 icmp_error;
	__u8 parse_reason;	/* enum dp_reason: NONE for an IP flow to judge */
	__u8 echo;		/* enum dp_echo_kind */
	__u8 pad;
	__u16 l4_off;		/* offset of the transport header from the frame start */
};

struct dp_cursor {
	void *pos;
	void *end;
};

struct dp_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

struct dp_ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;	/* offset in 8-byte units << 3 | M flag */
	__be32 id;
};

struct dp_icmp_hdr {
	__u8 type;
	__u8 code;
	__u16 csum;
	__be16 id;		/* echo only */
	__be16 seq;
};

/* Ethernet and up to two 802.1Q/802.1ad tags. *proto gets the inner EtherType. */
static __always_inline int dp_parse_eth(struct dp_cursor *c, __u16 *proto)
{
	struct ethhdr *eth = c->pos;

	if ((void *)(eth + 1) > c->end)
		return DP_DROP_L2_TRUNCATED;
	c->pos = eth + 1;
	*proto = dp_ntohs(eth->h_proto);

#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (*proto != DP_ETH_P_8021Q && *proto != DP_ETH_P_8021AD)
			return DP_REASON_NONE;
		struct dp_vlan_hdr *vh = c->pos;
		if ((void *)(vh + 1) > c->end)
			return DP_DROP_L2_TRUNCATED;
		c->pos = vh + 1;
		*proto = dp_ntohs(vh->proto);
	}
	if (*proto == DP_ETH_P_8021Q || *proto == DP_ETH_P_8021AD)
		return DP_DROP_VLAN_DEPTH;
	return DP_REASON_NONE;
}

static __always_inline int dp_is_icmp_error(__u8 family, __u8 type)
{
	if (family == DP_FAMILY_IPV4)
		return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH ||
		       type == ICMP_REDIRECT || type == ICMP_TIME_EXCEEDED ||
		       type == ICMP_PARAMETERPROB;
	return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG ||
	       type == ICMPV6_TIME_EXCEED || type == ICMPV6_PARAMPROB;
}

static __always_inline int dp_is_icmp_echo(__u8 family, __u8 type)
{
	if (family == DP_FAMILY_IPV4)
		return type == ICMP_ECHO || type == ICMP_ECHOREPLY;
	return type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY;
}

static __always_inline int dp_is_ipv6_ext(__u8 nh)
{
	return nh == DP_IPPROTO_HOPOPTS || nh == DP_IPPROTO_ROUTING ||
	       nh == DP_IPPROTO_FRAGMENT || nh == DP_IPPROTO_AH || nh == DP_IPPROTO_DSTOPTS;
}

/* Walks the extension headers starting at c->pos, at most DP_IPV6_MAX_EXT
 * of them and DP_IPV6_EXT_MAX_BYTES in all. *nh holds the first next-header
 * value on entry and the transport protocol on return, with c->pos at the
 * transport header. A Fragment header sets *frag and *frag_id; a later
 * fragment ends the walk there (*nh is then the Fragment header's next
 * header, c->pos is not moved). */
static __always_inline int dp_walk_ipv6_ext(struct dp_cursor *c, __u8 *nh, __u8 *frag, __u32 *frag_id)
{
	void *start = c->pos;
	__u32 off = 0;
	__u8 next = *nh;

#pragma unroll
	for (int i = 0; i < DP_IPV6_MAX_EXT; i++) {
		if (!dp_is_ipv6_ext(next))
			break;
		__u8 *h = start + off;
		if ((void *)(h + 8) > c->end)
			return DP_DROP_IPV6_EXT_TRUNCATED;
		__u32 len;
		if (next == DP_IPPROTO_FRAGMENT) {
			struct dp_ipv6_frag_hdr *fh = (void *)h;
			__u16 fo = dp_ntohs(fh->frag_off);
			*frag_id = dp_ntohl(fh->id);
			if (fo & 0xfff8) {
				*nh = fh->nexthdr;
				*frag = DP_FRAG_LATER;
				return DP_REASON_NONE;
			}
			if (fo & 1)
				*frag = DP_FRAG_FIRST;
			len = 8;
		} else if (next == DP_IPPROTO_AH) {
			len = ((__u32)h[1] + 2) * 4;
		} else {
			len = ((__u32)h[1] + 1) * 8;
		}
		next = h[0];
		off += len;
		if (off > DP_IPV6_EXT_MAX_BYTES)
			return DP_DROP_IPV6_EXT_TRUNCATED;
	}
	if (dp_is_ipv6_ext(next))
		return DP_DROP_IPV6_EXT_LIMIT;

	c->pos = start + off;
	if (c->pos > c->end)
		return DP_DROP_IPV6_EXT_TRUNCATED;
	*nh = next;
	return DP_REASON_NONE;
}

/* The transport header the quoted packet of an ICMP error starts with:
 * ports (TCP/UDP, first 4 bytes) or the echo identifier. */
static __always_inline int dp_parse_quoted_l4(struct dp_cursor *c, struct dp_pkt *p)
{
	if (p->t.proto == IPPROTO_TCP || p->t.proto == IPPROTO_UDP) {
		__be16 *ports = c->pos;
		if ((void *)(ports + 2) > c->end)
			return DP_DROP_ICMP_TRUNCATED;
		p->t.sport = ports[0];
		p->t.dport = ports[1];
	} else if (p->t.proto == IPPROTO_ICMP || p->t.proto == IPPROTO_ICMPV6) {
		struct dp_icmp_hdr *ih = c->pos;
		if ((void *)(ih + 1) > c->end)
			return DP_DROP_ICMP_TRUNCATED;
		/* Only the family's own ICMP has echo ids; ICMP inside the
		 * other IP version is just another protocol, as in dp_parse_l4. */
		if ((p->t.proto == IPPROTO_ICMP) == (p->t.family == DP_FAMILY_IPV4) &&
		    dp_is_icmp_echo(p->t.family, ih->type)) {
			p->t.sport = ih->id;
			p->t.dport = ih->id;
		}
	}
	return DP_REASON_NONE;
}

/* The packet an ICMP error quotes: same family as the error, fixed IP header,
 * then the first bytes of its transport header. The quoted flow replaces the
 * error's own tuple. */
static __always_inline int dp_parse_icmp_quote(struct dp_cursor *c, struct dp_pkt *p)
{
	p->outer = p->t;
	p->icmp_error = 1;
	p->t.sport = 0;
	p->t.dport = 0;
	if (p->t.family == DP_FAMILY_IPV4) {
		struct iphdr *ip = c->pos;
		if ((void *)(ip + 1) > c->end)
			return DP_DROP_ICMP_TRUNCATED;
		__u32 ihl = ip->ihl * 4;
		if (ip->version != 4 || ihl < sizeof(*ip))
			return DP_DROP_ICMP_TRUNCATED;
		if (c->pos + ihl > c->end)
			return DP_DROP_ICMP_TRUNCATED;
		p->t.saddr[0] = ip->saddr;
		p->t.daddr[0] = ip->daddr;
		p->t.proto = ip->protocol;
		/* A quoted later fragment has no ports: judge by protocol only. */
		if (ip->frag_off & dp_htons(0x1fff))
			return DP_REASON_NONE;
		c->pos += ihl;
	} else {
		struct ipv6hdr *ip6 = c->pos;
		if ((void *)(ip6 + 1) > c->end)
			return DP_DROP_ICMP_TRUNCATED;
		if (ip6->version != 6)
			return DP_DROP_ICMP_TRUNCATED;
		__builtin_memcpy(p->t.saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->t.daddr, &ip6->daddr, 16);
		__u8 nh = ip6->nexthdr, quoted_frag = DP_FRAG_NONE;
		__u32 quoted_id = 0;
		c->pos = ip6 + 1;
		if (dp_walk_ipv6_ext(c, &nh, &quoted_frag, &quoted_id) != DP_REASON_NONE)
			return DP_DROP_ICMP_TRUNCATED;
		p->t.proto = nh;
		if (quoted_frag == DP_FRAG_LATER)
			return DP_REASON_NONE;
	}
	return dp_parse_quoted_l4(c, p);
}

/* TCP, UDP, ICMP, ICMPv6. Other protocols have no ports. */
static __always_inline int dp_parse_l4(struct dp_cursor *c, struct dp_pkt *p)
{
	switch (p->t.proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = c->pos;
		if ((void *)(th + 1) > c->end)
			return DP_DROP_L4_TRUNCATED;
		if (th->doff < 5)
			return DP_DROP_TCP_DOFF;
		p->t.sport = th->source;
		p->t.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		return DP_REASON_NONE;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = c->pos;
		if ((void *)(uh + 1) > c->end)
			return DP_DROP_L4_TRUNCATED;
		p->t.sport = uh->source;
		p->t.dport = uh->dest;
		return DP_REASON_NONE;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		struct dp_icmp_hdr *ih = c->pos;
		if ((void *)(ih + 1) > c->end)
			return DP_DROP_L4_TRUNCATED;
		/* ICMP inside the wrong IP version is just another protocol. */
		if ((p->t.proto == IPPROTO_ICMP) != (p->t.family == DP_FAMILY_IPV4))
			return DP_REASON_NONE;
		if (p->t.family == DP_FAMILY_IPV6 && ih->type >= 133 && ih->type <= 137)
			return DP_PASS_ND;
		/* Multicast listener discovery (queries, reports, done) to a
		 * multicast group: link-local control, like neighbour discovery. */
		if (p->t.family == DP_FAMILY_IPV6 && ((const __u8 *)p->t.daddr)[0] == 0xff &&
		    ((ih->type >= 130 && ih->type <= 132) || ih->type == 143))
			return DP_PASS_ND;
		if (dp_is_icmp_echo(p->t.family, ih->type)) {
			p->t.sport = ih->id;
			p->t.dport = ih->id;
			p->echo = (ih->type == ICMP_ECHO || ih->type == ICMPV6_ECHO_REQUEST) ?
				  DP_ECHO_REQUEST : DP_ECHO_REPLY;
			return DP_REASON_NONE;
		}
		if (dp_is_icmp_error(p->t.family, ih->type)) {
			c->pos = ih + 1;
			return dp_parse_icmp_quote(c, p);
		}
		return DP_REASON_NONE;
	}
	}
	return DP_REASON_NONE;
}

/* IPv4. l3_len is the number of bytes from the IP header to the end of the
 * packet, including any part not in the linear buffer (TC). */
static __always_inline int dp_parse_ipv4(struct dp_cursor *c, __u32 l3_len, struct dp_pkt *p)
{
	struct iphdr *ip = c->pos;

	if ((void *)(ip + 1) > c->end)
		return DP_DROP_L3_TRUNCATED;
	if (ip->version != 4)
		return DP_DROP_IP_VERSION;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return DP_DROP_IPV4_IHL;
	__u32 tot_len = dp_ntohs(ip->tot_len);
	/* tot_len 0 is a GSO packet larger than 64 KiB (BIG TCP), seen at TC only. */
	if (tot_len != 0 && (tot_len < ihl || tot_len > l3_len))
		return DP_DROP_IPV4_LENGTH;
	if (c->pos + ihl > c->end)
		return DP_DROP_L3_TRUNCATED;

	p->t.family = DP_FAMILY_IPV4;
	p->t.saddr[0] = ip->saddr;
	p->t.daddr[0] = ip->daddr;
	p->t.proto = ip->protocol;

	__u16 frag_off = dp_ntohs(ip->frag_off);
	if (frag_off & 0x1fff) {
		p->frag = DP_FRAG_LATER;
		p->frag_id = dp_ntohs(ip->id);
		return DP_REASON_NONE;
	}
	if (frag_off & 0x2000) {
		p->frag = DP_FRAG_FIRST;
		p->frag_id = dp_ntohs(ip->id);
	}
	c->pos += ihl;
	return DP_REASON_NONE;
}

/* IPv6 with a walk of at most DP_IPV6_MAX_EXT extension headers. */
static __always_inline int dp_parse_ipv6(struct dp_cursor *c, __u32 l3_len, struct dp_pkt *p)
{
	struct ipv6hdr *ip6 = c->pos;

	if ((void *)(ip6 + 1) > c->end)
		return DP_DROP_L3_TRUNCATED;
	if (ip6->version != 6)
		return DP_DROP_IP_VERSION;
	/* payload_len 0 is a jumbogram or a BIG TCP GSO packet. */
	__u32 payload_len = dp_ntohs(ip6->payload_len);
	if (payload_len + sizeof(*ip6) > l3_len)
		return DP_DROP_IPV6_LENGTH;

	p->t.family = DP_FAMILY_IPV6;
	__builtin_memcpy(p->t.saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->t.daddr, &ip6->daddr, 16);

	__u8 nh = ip6->nexthdr;
	c->pos = ip6 + 1;
	int r = dp_walk_ipv6_ext(c, &nh, &p->frag, &p->frag_id);
	if (r != DP_REASON_NONE)
		return r;
	p->t.proto = nh;
	return DP_REASON_NONE;
}

/* Largest transport-header offset the parser can produce: Ethernet, two
 * VLAN tags, and an IPv6 header with the longest extension chain walked. */
#define DP_MAX_L4_OFF (14 + 8 + 40 + DP_IPV6_EXT_MAX_BYTES + 8)

/* Whole packet. Returns DP_REASON_NONE when p holds an IP flow to judge,
 * otherwise the pass or drop reason that decides the packet by itself. */
static __always_inline int dp_parse(void *data, void *data_end, __u32 pkt_len, struct dp_pkt *p)
{
	struct dp_cursor c = { .pos = data, .end = data_end };
	__u16 proto;
	int r;

	p->len = pkt_len;
	r = dp_parse_eth(&c, &proto);
	if (r != DP_REASON_NONE)
		return r;
	__u32 l2_len = c.pos - data;
	__u32 l3_len = pkt_len > l2_len ? pkt_len - l2_len : 0;

	if (proto == DP_ETH_P_IP)
		r = dp_parse_ipv4(&c, l3_len, p);
	else if (proto == DP_ETH_P_IPV6)
		r = dp_parse_ipv6(&c, l3_len, p);
	else if (proto == DP_ETH_P_ARP)
		return DP_PASS_ARP;
	else
		return DP_ALLOW_NON_IP ? DP_PASS_NON_IP : DP_DROP_NON_IP;
	if (r != DP_REASON_NONE || p->frag == DP_FRAG_LATER)
		return r;

	/* Every IPv4 and IPv6 header shape ends here with its own cursor range,
	 * and the verifier would check the transport parser once per shape. The
	 * offset goes through the scratch map value and comes back as one
	 * unknown, bounded again, so the transport parser is checked once. */
	p->l4_off = c.pos - data;
	__u32 off = *(volatile __u16 *)&p->l4_off;
	if (off > DP_MAX_L4_OFF)
		return DP_DROP_L3_TRUNCATED;
	c.pos = data + off;
	return dp_parse_l4(&c, p);
}

#endif /* DP_PARSE_H */
