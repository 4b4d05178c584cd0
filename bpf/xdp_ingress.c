/* SPDX-License-Identifier: Apache-2.0 */
/* XDP ingress: judges packets arriving on the interface before the stack sees them. */
#include "lib/enforce.h"

int dp_xdp_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	if (dp_process(data, data_end, data_end - data, DP_HOOK_XDP_INGRESS, DP_DIR_INGRESS,
		       ctx->ingress_ifindex))
		return XDP_PASS;
	return XDP_DROP;
}
