/* SPDX-License-Identifier: Apache-2.0 */
/* TC (sk_buff) adapter shared by tc_ingress.c and tc_egress.c. */
#ifndef DP_SKB_H
#define DP_SKB_H

#include <linux/pkt_cls.h>
#include "enforce.h"

/* Headers the parser may need, made linear before parsing. */
#ifndef DP_PULL_BYTES
#define DP_PULL_BYTES 256
#endif

/* Pass is TC_ACT_UNSPEC, not TC_ACT_OK: filters after ours still run, so
 * this program only ever removes packets from what others see. */
static __always_inline int dp_tc(struct __sk_buff *skb, __u8 hook, __u8 dir)
{
	__u32 want = skb->len < DP_PULL_BYTES ? skb->len : DP_PULL_BYTES;

	if ((long)skb->data_end - (long)skb->data < (long)want)
		bpf_skb_pull_data(skb, want);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (dp_process(data, data_end, skb->len, hook, dir, skb->ifindex))
		return TC_ACT_UNSPEC;
	return TC_ACT_SHOT;
}

#endif /* DP_SKB_H */
