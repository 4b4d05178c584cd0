"""Conntrack (bpf/lib/conntrack.h and the flow part of enforce.h).

One entry per flow, shared by every hook, found from either direction.
Replies and later packets of an admitted flow pass without policy until the
epoch changes; a stale entry is judged again as the flow's first packet was,
in the flow's own direction, and is revoked when the policy or the
identities no longer allow it.
"""

from __future__ import annotations

import ipaddress

import pytest

from loader import abi, tables
from tests.bpf.packets import (ICMP_OF, INGRESS_HOOKS, LOCAL, LOCAL_ID, REMOTE, REMOTE_ID, TCP_P, UDP_P,
                               echo_frame, endpoint_identities, expect, tcp_frame, udp_frame)

R = abi.Reason
V = abi.Verdict
IN, EG = abi.Direction.INGRESS, abi.Direction.EGRESS
FAMILIES = pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))
RPORT = 40000   # the remote end's port of inbound flows
LPORT = 50000   # the local end's port of outbound flows


@pytest.fixture
def cdp(dp):
    tables.sync_identities(dp, endpoint_identities())
    return dp


def allow(direction, port, rule, proto=TCP_P, local=LOCAL_ID, remote=REMOTE_ID, action=V.ALLOW):
    return tables.PolicyEntry(local, remote, direction, proto, port, port, action, rule)


def inbound(f, flags="S", sport=RPORT, dport=80, **kw):
    return tcp_frame(f, REMOTE[f], LOCAL[f], sport, dport, flags, **kw)


def inbound_reply(f, flags="SA", sport=RPORT, dport=80, **kw):
    return tcp_frame(f, LOCAL[f], REMOTE[f], dport, sport, flags, **kw)


def outbound(f, flags="S", sport=LPORT, dport=443, **kw):
    return tcp_frame(f, LOCAL[f], REMOTE[f], sport, dport, flags, **kw)


def outbound_reply(f, flags="SA", sport=LPORT, dport=443, **kw):
    return tcp_frame(f, REMOTE[f], LOCAL[f], dport, sport, flags, **kw)


def entries(dp):
    return list(dp.ct.items())


def only_entry(dp):
    got = entries(dp)
    assert len(got) == 1, got
    return got[0]


def addr_bytes(text):
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


# --- admission and the entry's content ------------------------------------------------

@FAMILIES
@pytest.mark.parametrize("hook", INGRESS_HOOKS)
def test_inbound_flow_entry(cdp, hook, family):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, hook, inbound(family), R.PASS_POLICY)
    key, val = only_entry(cdp)
    # Canonical order: the smaller address is side a.
    a_is_remote = addr_bytes(REMOTE[family]) < addr_bytes(LOCAL[family])
    a, b = (REMOTE, LOCAL) if a_is_remote else (LOCAL, REMOTE)
    pa, pb = (RPORT, 80) if a_is_remote else (80, RPORT)
    assert (bytes(key.addr_a), bytes(key.addr_b)) == (addr_bytes(a[family]), addr_bytes(b[family]))
    assert (abi.ntohs(key.port_a), abi.ntohs(key.port_b), key.proto, key.family) == (pa, pb, TCP_P, family)
    assert (val.epoch, val.rule_id, val.local_id, val.remote_id, val.verdict) == (0, 5, LOCAL_ID, REMOTE_ID, V.ALLOW)
    assert val.flags == (abi.CT_INIT_IS_A if a_is_remote else 0)
    assert val.last_seen_ns > 0
    assert cdp.stat_counters()[abi.Stat.CT_CREATED] == 1


@FAMILIES
def test_outbound_flow_entry_remembers_egress(cdp, family):
    tables.sync_policy(cdp, [allow(EG, 443, 6)])
    expect(cdp, "tc_egress", outbound(family), R.PASS_POLICY)
    _key, val = only_entry(cdp)
    assert val.flags & abi.CT_INIT_EGRESS
    assert (val.rule_id, val.local_id, val.remote_id) == (6, LOCAL_ID, REMOTE_ID)


@FAMILIES
@pytest.mark.parametrize("action", (V.DENY, None), ids=("denied", "default_denied"))
def test_denied_flows_are_not_tracked(cdp, family, action):
    tables.sync_policy(cdp, [allow(IN, 80, 5, action=action)] if action else [])
    expect(cdp, "xdp_ingress", inbound(family), R.DROP_POLICY_DENY if action else R.DROP_POLICY_DEFAULT)
    assert entries(cdp) == []
    assert cdp.stat_counters()[abi.Stat.CT_CREATED] == 0


# --- replies and established packets -------------------------------------------------

@FAMILIES
@pytest.mark.parametrize("hook", INGRESS_HOOKS)
def test_reply_to_allowed_inbound_flow_passes_at_egress(cdp, tap, hook, family):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    # With no flow, the local end may not send this.
    expect(cdp, "tc_egress", inbound_reply(family, sport=RPORT + 1), R.DROP_POLICY_DEFAULT)
    tap.take()
    syn, synack, ack = inbound(family), inbound_reply(family), inbound(family, "A", payload=b"x" * 50)
    expect(cdp, hook, syn, R.PASS_POLICY)
    expect(cdp, "tc_egress", synack, R.PASS_REPLY)
    expect(cdp, hook, ack, R.PASS_ESTABLISHED)
    expect(cdp, "tc_egress", inbound_reply(family, "A"), R.PASS_REPLY)
    assert cdp.rule_counter(5) == (4, len(syn) + len(synack) + len(ack) + len(inbound_reply(family, "A")))
    assert tap.take() == []          # allow sampling is off; conntrack hits are never reported
    assert len(entries(cdp)) == 1


@FAMILIES
@pytest.mark.parametrize("hook", INGRESS_HOOKS)
def test_reply_to_allowed_outbound_flow_passes_at_ingress(cdp, hook, family):
    tables.sync_policy(cdp, [allow(EG, 443, 6)])
    expect(cdp, hook, outbound_reply(family, sport=LPORT + 1), R.DROP_POLICY_DEFAULT)
    expect(cdp, "tc_egress", outbound(family), R.PASS_POLICY)
    expect(cdp, hook, outbound_reply(family), R.PASS_REPLY)
    expect(cdp, "tc_egress", outbound(family, "A"), R.PASS_ESTABLISHED)
    expect(cdp, hook, outbound_reply(family, "A"), R.PASS_REPLY)
    assert cdp.rule_counter(6)[0] == 4


@FAMILIES
def test_reply_passes_at_both_ingress_hooks(cdp, family):
    tables.sync_policy(cdp, [allow(EG, 443, 6)])
    expect(cdp, "tc_egress", outbound(family), R.PASS_POLICY)
    expect(cdp, "xdp_ingress", outbound_reply(family), R.PASS_REPLY)
    expect(cdp, "tc_ingress", outbound_reply(family), R.PASS_REPLY)


@FAMILIES
def test_udp_and_echo_replies(cdp, family):
    tables.sync_policy(cdp, [allow(IN, 53, 7, proto=UDP_P), allow(EG, 9, 8, proto=ICMP_OF[family])])
    expect(cdp, "xdp_ingress", udp_frame(family, REMOTE[family], LOCAL[family], RPORT, 53), R.PASS_POLICY)
    expect(cdp, "tc_egress", udp_frame(family, LOCAL[family], REMOTE[family], 53, RPORT), R.PASS_REPLY)
    expect(cdp, "tc_egress", echo_frame(family, LOCAL[family], REMOTE[family], 9), R.PASS_POLICY)
    expect(cdp, "xdp_ingress", echo_frame(family, REMOTE[family], LOCAL[family], 9, reply=True), R.PASS_REPLY)
    # Another identifier is another flow.
    expect(cdp, "xdp_ingress", echo_frame(family, REMOTE[family], LOCAL[family], 10, reply=True),
           R.DROP_POLICY_DEFAULT)
    assert len(entries(cdp)) == 2


@FAMILIES
def test_echo_in_the_wrong_role_is_not_part_of_the_exchange(cdp, family):
    """After the local end pings the remote one, an echo REQUEST from the
    remote end with the same identifier is a flow of its own, judged by
    policy (no ingress rule here), not a reply of the tracked exchange."""
    tables.sync_policy(cdp, [allow(EG, 7, 3, proto=ICMP_OF[family])])
    expect(cdp, "tc_egress", echo_frame(family, LOCAL[family], REMOTE[family], 7), R.PASS_POLICY)
    for hook in INGRESS_HOOKS:
        expect(cdp, hook, echo_frame(family, REMOTE[family], LOCAL[family], 7), R.DROP_POLICY_DEFAULT)
        expect(cdp, hook, echo_frame(family, REMOTE[family], LOCAL[family], 7, reply=True), R.PASS_REPLY)
    # A reply from the initiator's side is judged by policy too (here the
    # egress rule allows it), not passed as part of the exchange.
    expect(cdp, "tc_egress", echo_frame(family, LOCAL[family], REMOTE[family], 7, reply=True),
           R.PASS_POLICY)


@FAMILIES
def test_flow_is_shared_by_all_hooks(cdp, family):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    expect(cdp, "tc_ingress", inbound(family, "A"), R.PASS_ESTABLISHED)
    expect(cdp, "tc_egress", inbound_reply(family), R.PASS_REPLY)


@FAMILIES
def test_established_flow_skips_policy_while_epoch_unchanged(cdp, family):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    tables.sync_policy(cdp, [])
    for _ in range(3):
        expect(cdp, "xdp_ingress", inbound(family, "A"), R.PASS_ESTABLISHED)
        expect(cdp, "tc_egress", inbound_reply(family, "A"), R.PASS_REPLY)
    # A new flow is judged by the current (empty) policy.
    expect(cdp, "xdp_ingress", inbound(family, sport=RPORT + 1), R.DROP_POLICY_DEFAULT)
    # Packets of the tracked flow still count to the rule that admitted it.
    assert cdp.rule_counter(5)[0] == 7
    assert cdp.stat_counters()[abi.Stat.CT_REJUDGED] == 0


# --- epoch changes --------------------------------------------------------------------

@FAMILIES
@pytest.mark.parametrize("side", ("initiator", "responder"))
def test_epoch_bump_after_rule_removed_revokes(cdp, tap, family, side):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    tables.sync_policy(cdp, [])
    expect(cdp, "xdp_ingress", inbound(family, "A"), R.PASS_ESTABLISHED)   # epoch unchanged
    tap.take()
    epoch = cdp.bump_epoch()
    assert epoch == 1
    hook, data = (("xdp_ingress", inbound(family, "A")) if side == "initiator" else
                  ("tc_egress", inbound_reply(family, "A")))
    expect(cdp, hook, data, R.DROP_REVOKED)
    assert entries(cdp) == []
    assert cdp.stat_counters()[abi.Stat.CT_REJUDGED] == 1
    ev = tap.one()
    assert (ev.reason, ev.verdict, ev.rule_id, ev.direction, ev.local_id, ev.remote_id) == \
        (R.DROP_REVOKED, V.DENY, 0, IN, LOCAL_ID, REMOTE_ID)
    # With the entry gone the flow's packets are new flows, and denied.
    expect(cdp, "xdp_ingress", inbound(family, "A"), R.DROP_POLICY_DEFAULT)
    expect(cdp, "tc_egress", inbound_reply(family, "A"), R.DROP_POLICY_DEFAULT)


@FAMILIES
@pytest.mark.parametrize("side", ("initiator", "responder"))
def test_epoch_bump_with_rule_kept_rejudges(cdp, family, side):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    _, before = only_entry(cdp)
    epoch = cdp.bump_epoch()
    hook, data = (("tc_ingress", inbound(family, "A")) if side == "initiator" else
                  ("tc_egress", inbound_reply(family, "A")))
    expect(cdp, hook, data, R.PASS_REJUDGED)
    _, after = only_entry(cdp)
    assert after.epoch == epoch != before.epoch
    # The responder's packet also records that the flow was answered.
    seen_reply = abi.CT_SEEN_REPLY if side == "responder" else 0
    assert (after.rule_id, after.verdict, after.flags, after.local_id, after.remote_id) == \
        (before.rule_id, before.verdict, before.flags | seen_reply, before.local_id, before.remote_id)
    assert cdp.rule_counter(5)[0] == 2
    # Judged once per epoch: the next packets are conntrack hits again.
    expect(cdp, "xdp_ingress", inbound(family, "A"), R.PASS_ESTABLISHED)
    expect(cdp, "tc_egress", inbound_reply(family, "A"), R.PASS_REPLY)
    assert cdp.stat_counters()[abi.Stat.CT_REJUDGED] == 1


@FAMILIES
def test_rejudged_flow_takes_the_new_rule_and_verdict(cdp, tap, family):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    tables.sync_policy(cdp, [allow(IN, 80, 9, action=V.AUDIT)])
    cdp.bump_epoch()
    tap.take()
    data = inbound(family, "A")
    expect(cdp, "xdp_ingress", data, R.PASS_REJUDGED)
    _, val = only_entry(cdp)
    assert (val.rule_id, val.verdict) == (9, V.AUDIT)
    assert cdp.rule_counter(9) == (1, len(data))
    ev = tap.one()      # an audited judgement is reported
    assert (ev.reason, ev.verdict, ev.rule_id) == (R.PASS_REJUDGED, V.AUDIT, 9)


@FAMILIES
def test_stale_outbound_flow_is_judged_in_its_own_direction(cdp, family):
    """The first packet after the bump is a reply arriving at an ingress hook;
    the flow was admitted at egress and is judged again as egress (local =
    the initiator). Only the egress entry exists, so judging it in the
    hook's direction would revoke it."""
    tables.sync_policy(cdp, [allow(EG, 443, 6)])
    expect(cdp, "tc_egress", outbound(family), R.PASS_POLICY)
    cdp.bump_epoch()
    expect(cdp, "xdp_ingress", outbound_reply(family), R.PASS_REJUDGED)
    _, val = only_entry(cdp)
    assert val.flags & abi.CT_INIT_EGRESS and (val.local_id, val.remote_id) == (LOCAL_ID, REMOTE_ID)


@FAMILIES
def test_revoking_the_remote_identity_revokes_the_flow(cdp, family):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    tables.sync_identities(cdp, {n: i for n, i in endpoint_identities().items() if i != REMOTE_ID})
    # The address is now WORLD, which no entry allows; the flow holds until the epoch moves.
    expect(cdp, "xdp_ingress", inbound(family, "A"), R.PASS_ESTABLISHED)
    cdp.bump_epoch()
    expect(cdp, "xdp_ingress", inbound(family, "A"), R.DROP_REVOKED)
    assert entries(cdp) == []


@FAMILIES
def test_revoking_the_local_identity_revokes_outbound_flow(cdp, family):
    tables.sync_policy(cdp, [allow(EG, 443, 6)])
    expect(cdp, "tc_egress", outbound(family), R.PASS_POLICY)
    tables.sync_identities(cdp, {n: i for n, i in endpoint_identities().items() if i != LOCAL_ID})
    cdp.bump_epoch()
    expect(cdp, "tc_ingress", outbound_reply(family, "A"), R.DROP_REVOKED)
    assert entries(cdp) == []


@FAMILIES
def test_epoch_bump_only_touches_flows_it_sees(cdp, family):
    """Stale entries are judged lazily, on their next packet: other flows'
    entries keep their old epoch until then."""
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family, sport=RPORT), R.PASS_POLICY)
    expect(cdp, "xdp_ingress", inbound(family, sport=RPORT + 1), R.PASS_POLICY)
    epoch = cdp.bump_epoch()
    expect(cdp, "xdp_ingress", inbound(family, "A", sport=RPORT), R.PASS_REJUDGED)
    epochs = sorted((abi.ntohs(k.port_a) + abi.ntohs(k.port_b) - 80, v.epoch) for k, v in entries(cdp))
    assert epochs == [(RPORT, epoch), (RPORT + 1, 0)]


# --- TCP close -----------------------------------------------------------------------

@FAMILIES
@pytest.mark.parametrize("flags,closer", [("FA", "initiator"), ("FA", "responder"), ("R", "initiator"),
                                          ("RA", "responder")])
def test_fin_or_rst_marks_the_flow_closing(cdp, family, flags, closer):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    expect(cdp, "tc_egress", inbound_reply(family), R.PASS_REPLY)
    assert not only_entry(cdp)[1].flags & abi.CT_CLOSING
    if closer == "initiator":
        expect(cdp, "xdp_ingress", inbound(family, flags), R.PASS_ESTABLISHED)
    else:
        expect(cdp, "tc_egress", inbound_reply(family, flags), R.PASS_REPLY)
    assert only_entry(cdp)[1].flags & abi.CT_CLOSING
    # The rest of the close still passes from conntrack.
    expect(cdp, "xdp_ingress", inbound(family, "A"), R.PASS_ESTABLISHED)
    expect(cdp, "tc_egress", inbound_reply(family, "A"), R.PASS_REPLY)


@FAMILIES
def test_new_syn_on_a_closing_tuple_is_judged_again(cdp, family):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    expect(cdp, "xdp_ingress", inbound(family, "FA"), R.PASS_ESTABLISHED)
    expected_before = cdp.stat_counters()[abi.Stat.CT_EXPIRED]
    # A SYN-ACK is not a new connection.
    expect(cdp, "tc_egress", inbound_reply(family, "SA"), R.PASS_REPLY)
    # A new SYN reusing the tuple is a new connection, judged by policy.
    expect(cdp, "xdp_ingress", inbound(family, "S"), R.PASS_POLICY)
    assert cdp.stat_counters()[abi.Stat.CT_EXPIRED] == expected_before + 1
    assert not only_entry(cdp)[1].flags & abi.CT_CLOSING
    # Open again: a retransmitted SYN is just another packet of the flow.
    expect(cdp, "xdp_ingress", inbound(family, "S"), R.PASS_ESTABLISHED)


@FAMILIES
def test_new_syn_on_a_closing_tuple_meets_the_current_policy(cdp, family):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    expect(cdp, "tc_egress", inbound_reply(family, "RA"), R.PASS_REPLY)
    tables.sync_policy(cdp, [])
    expect(cdp, "xdp_ingress", inbound(family, "A"), R.PASS_ESTABLISHED)     # still closing, still tracked
    expect(cdp, "xdp_ingress", inbound(family, "S"), R.DROP_POLICY_DEFAULT)  # no epoch bump needed


@FAMILIES
def test_syn_on_an_open_flow_is_established(cdp, family):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    tables.sync_policy(cdp, [])
    expect(cdp, "xdp_ingress", inbound(family, "S"), R.PASS_ESTABLISHED)
    assert cdp.stat_counters()[abi.Stat.CT_EXPIRED] == 0


# --- timeouts ------------------------------------------------------------------------
#
# Entries are aged by moving their timestamps back (the loader may write
# these maps); the clock is bpf_ktime_get_coarse_ns, CLOCK_MONOTONIC.

def _age_ct(dp, seconds: float) -> None:
    for key, val in entries(dp):
        assert val.last_seen_ns > seconds * 1e9 + 1e9, "monotonic clock too young to age entries this far"
        val.last_seen_ns -= int(seconds * 1e9)
        dp.ct.update(key, val)


def udp_in(f):
    return udp_frame(f, REMOTE[f], LOCAL[f], RPORT, 53)


@FAMILIES
@pytest.mark.parametrize("idle,reason", [(59, R.PASS_ESTABLISHED), (61, R.DROP_POLICY_DEFAULT)],
                         ids=("within_60s", "past_60s"))
def test_udp_flow_idle_timeout(cdp, family, idle, reason):
    tables.sync_policy(cdp, [allow(IN, 53, 7, proto=UDP_P)])
    expect(cdp, "xdp_ingress", udp_in(family), R.PASS_POLICY)
    tables.sync_policy(cdp, [])
    _age_ct(cdp, idle)
    expect(cdp, "xdp_ingress", udp_in(family), reason)
    assert cdp.stat_counters()[abi.Stat.CT_EXPIRED] == (1 if reason.is_drop else 0)


@FAMILIES
def test_expired_flow_is_admitted_afresh(cdp, family):
    tables.sync_policy(cdp, [allow(IN, 53, 7, proto=UDP_P)])
    expect(cdp, "xdp_ingress", udp_in(family), R.PASS_POLICY)
    _age_ct(cdp, 61)
    expect(cdp, "xdp_ingress", udp_in(family), R.PASS_POLICY)
    expect(cdp, "xdp_ingress", udp_in(family), R.PASS_ESTABLISHED)


@FAMILIES
@pytest.mark.parametrize("closing,idle,reason", [
    (True, 9, R.PASS_ESTABLISHED), (True, 11, R.DROP_POLICY_DEFAULT), (False, 11, R.PASS_ESTABLISHED),
], ids=("closing_within_10s", "closing_past_10s", "open_past_10s"))
def test_tcp_flow_idle_timeout(cdp, family, closing, idle, reason):
    tables.sync_policy(cdp, [allow(IN, 80, 5)])
    expect(cdp, "xdp_ingress", inbound(family), R.PASS_POLICY)
    if closing:
        expect(cdp, "xdp_ingress", inbound(family, "FA"), R.PASS_ESTABLISHED)
    tables.sync_policy(cdp, [])
    _age_ct(cdp, idle)
    expect(cdp, "xdp_ingress", inbound(family, "A"), reason)
