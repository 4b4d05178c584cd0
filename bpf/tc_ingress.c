/* SPDX-License-Identifier: Apache-2.0 */
/* TC ingress (clsact): judges arriving packets as sk_buffs, for interfaces
 * where XDP is not wanted. Attach this or dp_xdp_ingress, not both. */
#include "lib/skb.h"

int dp_tc_ingress(struct __sk_buff *skb)
{
	return dp_tc(skb, DP_HOOK_TC_INGRESS, DP_DIR_INGRESS);
}
