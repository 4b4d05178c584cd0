/* SPDX-License-Identifier: Apache-2.0 */
/* TC egress (clsact): judges packets leaving the interface. */
#include "lib/skb.h"

int dp_tc_egress(struct __sk_buff *skb)
{
	return dp_tc(skb, DP_HOOK_TC_EGRESS, DP_DIR_EGRESS);
}
