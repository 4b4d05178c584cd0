/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Traffic generator for bench/live.py, run with BPF_PROG_TEST_RUN and
 * BPF_F_TEST_XDP_LIVE_FRAMES: the kernel builds `repeat` frames from one
 * template, runs this program on each, and really transmits what it
 * redirects. Every frame goes out of one veth end (gen_cfg.ifindex, in the
 * namespace the test run is made from) and arrives at its peer, where the
 * program or firewall under test receives it.
 *
 * Optionally the IPv4 source is rewritten to one of gen_cfg.nsrc addresses
 * from gen_cfg.src_base on, chosen at random per frame, with the header
 * checksum updated incrementally. Live-frame pages are recycled without
 * being reset to the template, so the update starts from whatever the frame
 * holds now, never from the template's values.
 *
 * Compiled with bcc (loaded as BPF_PROG_TYPE_XDP, never attached).
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

struct gen_cfg {
	__u32 ifindex;		/* where frames leave: a veth end in the caller's namespace */
	__u32 nsrc;		/* 0: keep the template's source; else that many sources */
	__u32 src_base;		/* first source address, host byte order */
	__u32 pad;
};
BPF_ARRAY(gen_cfg, struct gen_cfg, 1);

/* One's-complement sum of 16-bit words folded to 16 bits. */
static __always_inline __u16 gen_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

int xdp_gen(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct gen_cfg *cfg = gen_cfg.lookup(&zero);

	if (!cfg)
		return XDP_ABORTED;
	if (cfg->nsrc) {
		void *data = (void *)(long)ctx->data;
		void *data_end = (void *)(long)ctx->data_end;
		struct iphdr *ip = data + sizeof(struct ethhdr);

		if ((void *)(ip + 1) > data_end)
			return XDP_ABORTED;
		__u32 old = ip->saddr;
		__u32 new = __builtin_bswap32(cfg->src_base + bpf_get_prandom_u32() % cfg->nsrc);
		/* RFC 1624: HC' = ~(~HC + ~m + m'), over both 16-bit halves. */
		__u32 sum = (__u16)~ip->check;
		sum += (__u16)~(old & 0xffff) + (__u16)~(old >> 16);
		sum += (new & 0xffff) + (new >> 16);
		ip->check = ~gen_fold(sum);
		ip->saddr = new;
	}
	return bpf_redirect(cfg->ifindex, 0);
}
