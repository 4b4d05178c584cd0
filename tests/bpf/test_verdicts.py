"""Policy verdicts of new flows (bpf/lib/policy.h, identity.h), one row per behaviour.

Rows are written from the local endpoint's point of view: entries name the
local and remote identity, and the test builds the packet for the hook it
runs at (ingress: remote -> local, egress: local -> remote) with the entry
direction of that hook. Each row checks the reason, the per-rule packet and
byte counters of every rule it installs, and the events: a deny or an audit
emits exactly one event with the flow's fields; an allow emits none while
allow sampling is off.
"""

from __future__ import annotations

import ipaddress

import pytest

from loader import abi, tables
from tests.bpf.packets import (DIRECTION, ETH_P_8021Q, GRE_P, HOOK_ID, HOOKS, ICMP_OF, LOCAL, LOCAL_ID, REMOTE,
                               REMOTE_ID, TCP_P, UDP_P, UNKNOWN, arp_frame, echo_frame, endpoint_identities, eth,
                               expect, frame, icmp, send, tcp, tcp_frame, udp_frame)

R = abi.Reason
V = abi.Verdict
IN, EG = abi.Direction.INGRESS, abi.Direction.EGRESS
ANY = tables.ANY_PORT
ICMPX = -1            # ICMP of the packet's family
OTHER_LOCAL = {4: "10.1.0.11", 6: "fd00:1::11"}
OTHER_REMOTE = {4: "192.168.8.30", 6: "fd00:8::30"}
OTHER_LOCAL_ID, OTHER_REMOTE_ID = 301, 500
ADDR = {"local": LOCAL, "remote": REMOTE, "other_local": OTHER_LOCAL, "other_remote": OTHER_REMOTE,
        "unknown": UNKNOWN}
SPORT = 40000


def identities() -> dict:
    ids = endpoint_identities()
    for fam, plen in ((4, 32), (6, 128)):
        ids[f"{OTHER_LOCAL[fam]}/{plen}"] = OTHER_LOCAL_ID
        ids[f"{OTHER_REMOTE[fam]}/{plen}"] = OTHER_REMOTE_ID
    return ids


@pytest.fixture
def vdp(dp):
    tables.sync_identities(dp, identities())
    return dp


def E(rule, action=V.ALLOW, proto=TCP_P, ports=(80, 80), remote=REMOTE_ID, local=LOCAL_ID, direction=None):
    """A policy entry; direction None: the direction of the hook under test."""
    return (local, remote, direction, proto, ports[0], ports[1], action, rule)


def materialize(spec, family: int, direction: int) -> tables.PolicyEntry:
    local, remote, d, proto, lo, hi, action, rule = spec
    return tables.PolicyEntry(local, remote, direction if d is None else d,
                              ICMP_OF[family] if proto == ICMPX else proto, lo, hi, action, rule)


def packet(family: int, hook: str, proto: int, port: int, remote: str = "remote", local: str = "local"):
    """(frame, src, dst, sport, dport, ip proto) of a new flow between the two ends."""
    l_addr, r_addr = ADDR[local][family], ADDR[remote][family]
    src, dst = (r_addr, l_addr) if DIRECTION[hook] == IN else (l_addr, r_addr)
    if proto == TCP_P:
        return tcp_frame(family, src, dst, SPORT, port), src, dst, SPORT, port, TCP_P
    if proto == UDP_P:
        return udp_frame(family, src, dst, SPORT, port), src, dst, SPORT, port, UDP_P
    if proto == ICMPX:
        return echo_frame(family, src, dst, port), src, dst, port, port, ICMP_OF[family]
    return frame(family, src, dst, proto, bytes(8)), src, dst, 0, 0, proto


REASON_OF = {V.ALLOW: R.PASS_POLICY, V.AUDIT: R.PASS_AUDIT, V.DENY: R.DROP_POLICY_DENY}


def check_event(ev, *, hook, src, dst, sport, dport, proto, verdict, reason, rule, local_id, remote_id,
                length, direction=None):
    want = dict(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), sport=sport, dport=dport,
                proto=proto, direction=DIRECTION[hook] if direction is None else direction, verdict=verdict,
                reason=reason, hook=HOOK_ID[hook], rule_id=rule, local_id=local_id, remote_id=remote_id,
                ifindex=1, pkt_len=length)
    got = {k: getattr(ev, k) for k in want}
    assert got == want


def judge_row(dp, tap, hook, family, specs, proto, port, reason, rule, remote="remote", local="local",
              remote_id=None, local_id=None):
    """Installs specs, sends one new flow, checks reason, rule counters and events."""
    direction = DIRECTION[hook]
    entries = [materialize(s, family, direction) for s in specs]
    tables.sync_policy(dp, entries)
    dp.ct.clear()
    rules = {0} | {e.rule_id for e in entries}
    before = {r: dp.rule_counter(r) for r in rules}
    sampled_out = dp.stat_counters()[abi.Stat.EVENTS_SAMPLED_OUT]
    data, src, dst, sport, dport, ip_proto = packet(family, hook, proto, port, remote, local)
    expect(dp, hook, data, reason)
    after = {r: dp.rule_counter(r) for r in rules}
    want = {r: before[r] for r in rules}
    want[rule] = (before[rule][0] + 1, before[rule][1] + len(data))
    assert after == want, f"rule counters: {after}, want {want}"
    evs = tap.take()
    if reason == R.PASS_POLICY:
        assert evs == []
        assert dp.stat_counters()[abi.Stat.EVENTS_SAMPLED_OUT] == sampled_out + 1
        return
    assert len(evs) == 1, evs
    ids = identities()
    check_event(evs[0], hook=hook, src=src, dst=dst, sport=sport, dport=dport, proto=ip_proto,
                verdict=V.AUDIT if reason == R.PASS_AUDIT else V.DENY, reason=reason, rule=rule,
                local_id=local_id if local_id is not None else _id_of(ids, ADDR[local][family]),
                remote_id=remote_id if remote_id is not None else _id_of(ids, ADDR[remote][family]),
                length=len(data))


def _id_of(ids, address):
    ip = ipaddress.ip_address(address)
    for net, ident in ids.items():
        if ip in ipaddress.ip_network(net):
            return ident
    return abi.ReservedIdentity.WORLD


# (name, entries, (proto, port[, remote[, local]]), reason, rule)
ROWS = [
    # --- exact port ---
    ("exact_port_matches", [E(1)], (TCP_P, 80), R.PASS_POLICY, 1),
    ("exact_port_not_port_below", [E(1)], (TCP_P, 79), R.DROP_POLICY_DEFAULT, 0),
    ("exact_port_not_port_above", [E(1)], (TCP_P, 81), R.DROP_POLICY_DEFAULT, 0),
    ("exact_port_not_other_protocol", [E(1)], (UDP_P, 80), R.DROP_POLICY_DEFAULT, 0),
    ("exact_port_not_other_remote", [E(1)], (TCP_P, 80, "other_remote"), R.DROP_POLICY_DEFAULT, 0),
    ("exact_port_not_unknown_remote", [E(1)], (TCP_P, 80, "unknown"), R.DROP_POLICY_DEFAULT, 0),
    ("exact_port_not_other_local", [E(1)], (TCP_P, 80, "remote", "other_local"), R.DROP_POLICY_DEFAULT, 0),
    ("exact_port_1", [E(1, ports=(1, 1))], (TCP_P, 1), R.PASS_POLICY, 1),
    ("exact_port_65535", [E(1, ports=(65535, 65535))], (TCP_P, 65535), R.PASS_POLICY, 1),
    ("exact_port_udp", [E(1, proto=UDP_P, ports=(53, 53))], (UDP_P, 53), R.PASS_POLICY, 1),
    ("exact_port_udp_not_tcp", [E(1, proto=UDP_P, ports=(53, 53))], (TCP_P, 53), R.DROP_POLICY_DEFAULT, 0),
    ("exact_echo_identifier", [E(1, proto=ICMPX, ports=(7, 7))], (ICMPX, 7), R.PASS_POLICY, 1),
    ("exact_echo_identifier_other_id", [E(1, proto=ICMPX, ports=(7, 7))], (ICMPX, 8), R.DROP_POLICY_DEFAULT, 0),
    ("several_exact_ports", [E(1, ports=(80, 80)), E(2, ports=(443, 443))], (TCP_P, 443), R.PASS_POLICY, 2),

    # --- any port ---
    ("any_port_port_1", [E(1, ports=ANY)], (TCP_P, 1), R.PASS_POLICY, 1),
    ("any_port_port_80", [E(1, ports=ANY)], (TCP_P, 80), R.PASS_POLICY, 1),
    ("any_port_port_65535", [E(1, ports=ANY)], (TCP_P, 65535), R.PASS_POLICY, 1),
    ("any_port_port_0", [E(1, ports=ANY)], (TCP_P, 0), R.PASS_POLICY, 1),
    ("any_port_any_echo_id", [E(1, proto=ICMPX, ports=ANY)], (ICMPX, 4242), R.PASS_POLICY, 1),
    ("any_port_not_other_protocol", [E(1, ports=ANY)], (UDP_P, 80), R.DROP_POLICY_DEFAULT, 0),
    ("any_port_portless_protocol", [E(1, proto=GRE_P, ports=ANY)], (GRE_P, 0), R.PASS_POLICY, 1),
    ("portless_protocol_without_rule", [E(1, ports=ANY)], (GRE_P, 0), R.DROP_POLICY_DEFAULT, 0),

    # --- any protocol ---
    ("any_protocol_tcp", [E(1, proto=0, ports=ANY)], (TCP_P, 22), R.PASS_POLICY, 1),
    ("any_protocol_udp", [E(1, proto=0, ports=ANY)], (UDP_P, 53), R.PASS_POLICY, 1),
    ("any_protocol_echo", [E(1, proto=0, ports=ANY)], (ICMPX, 9), R.PASS_POLICY, 1),
    ("any_protocol_gre", [E(1, proto=0, ports=ANY)], (GRE_P, 0), R.PASS_POLICY, 1),
    ("any_protocol_not_other_remote", [E(1, proto=0, ports=ANY)], (TCP_P, 22, "other_remote"),
     R.DROP_POLICY_DEFAULT, 0),

    # --- any remote (remote 0) and the WORLD identity ---
    ("any_remote_known_remote", [E(1, remote=0)], (TCP_P, 80), R.PASS_POLICY, 1),
    ("any_remote_other_remote", [E(1, remote=0)], (TCP_P, 80, "other_remote"), R.PASS_POLICY, 1),
    ("any_remote_unknown_address", [E(1, remote=0)], (TCP_P, 80, "unknown"), R.PASS_POLICY, 1),
    ("any_remote_still_needs_the_port", [E(1, remote=0)], (TCP_P, 81, "other_remote"), R.DROP_POLICY_DEFAULT, 0),
    ("any_remote_still_needs_the_local", [E(1, remote=0)], (TCP_P, 80, "remote", "other_local"),
     R.DROP_POLICY_DEFAULT, 0),
    ("any_remote_any_protocol", [E(1, remote=0, proto=0, ports=ANY)], (UDP_P, 9999, "unknown"), R.PASS_POLICY, 1),
    ("world_remote_unknown_address", [E(1, remote=abi.ReservedIdentity.WORLD)], (TCP_P, 80, "unknown"),
     R.PASS_POLICY, 1),
    ("world_remote_not_a_known_remote", [E(1, remote=abi.ReservedIdentity.WORLD)], (TCP_P, 80),
     R.DROP_POLICY_DEFAULT, 0),
    ("unknown_local_is_world", [E(1, local=abi.ReservedIdentity.WORLD)], (TCP_P, 80, "remote", "unknown"),
     R.PASS_POLICY, 1),

    # --- port ranges ---
    ("range_below", [E(1, ports=(1000, 2000))], (TCP_P, 999), R.DROP_POLICY_DEFAULT, 0),
    ("range_low_edge", [E(1, ports=(1000, 2000))], (TCP_P, 1000), R.PASS_POLICY, 1),
    ("range_inside", [E(1, ports=(1000, 2000))], (TCP_P, 1500), R.PASS_POLICY, 1),
    ("range_high_edge", [E(1, ports=(1000, 2000))], (TCP_P, 2000), R.PASS_POLICY, 1),
    ("range_above", [E(1, ports=(1000, 2000))], (TCP_P, 2001), R.DROP_POLICY_DEFAULT, 0),
    ("range_not_other_protocol", [E(1, ports=(1000, 2000))], (UDP_P, 1500), R.DROP_POLICY_DEFAULT, 0),
    ("range_udp", [E(1, proto=UDP_P, ports=(5000, 5100))], (UDP_P, 5100), R.PASS_POLICY, 1),
    ("range_echo_ids", [E(1, proto=ICMPX, ports=(100, 200))], (ICMPX, 150), R.PASS_POLICY, 1),
    ("range_from_port_1", [E(1, ports=(1, 1023))], (TCP_P, 1), R.PASS_POLICY, 1),
    ("range_from_port_1_not_port_0", [E(1, ports=(1, 1023))], (TCP_P, 0), R.DROP_POLICY_DEFAULT, 0),
    ("range_to_65535_high_edge", [E(1, ports=(60000, 65535))], (TCP_P, 65535), R.PASS_POLICY, 1),
    ("range_to_65535_below", [E(1, ports=(60000, 65535))], (TCP_P, 59999), R.DROP_POLICY_DEFAULT, 0),
    ("range_two_ports_wide", [E(1, ports=(8080, 8081))], (TCP_P, 8081), R.PASS_POLICY, 1),
    ("adjacent_ranges_low", [E(1, ports=(1000, 1999)), E(2, ports=(2000, 2999))], (TCP_P, 1999), R.PASS_POLICY, 1),
    ("adjacent_ranges_high", [E(1, ports=(1000, 1999)), E(2, ports=(2000, 2999))], (TCP_P, 2000), R.PASS_POLICY, 2),
    ("range_any_remote", [E(1, remote=0, ports=(1000, 2000))], (TCP_P, 1234, "unknown"), R.PASS_POLICY, 1),
    ("range_and_exact_port_on_one_key", [E(1, ports=(1000, 2000)), E(2, ports=(80, 80))], (TCP_P, 80),
     R.PASS_POLICY, 2),
    ("range_next_to_any_port_entry", [E(1, ports=(1000, 2000)), E(2, ports=ANY)], (TCP_P, 3000), R.PASS_POLICY, 2),
    ("narrower_deny_range_inside_allow_range", [E(1, ports=(1000, 2000)), E(2, V.DENY, ports=(1400, 1600))],
     (TCP_P, 1500), R.DROP_POLICY_DENY, 2),
    ("narrower_deny_range_low_edge", [E(1, ports=(1000, 2000)), E(2, V.DENY, ports=(1400, 1600))],
     (TCP_P, 1400), R.DROP_POLICY_DENY, 2),
    ("narrower_deny_range_just_outside", [E(1, ports=(1000, 2000)), E(2, V.DENY, ports=(1400, 1600))],
     (TCP_P, 1601), R.PASS_POLICY, 1),
    ("narrower_allow_range_inside_deny_range", [E(1, V.DENY, ports=(1000, 2000)), E(2, ports=(1400, 1600))],
     (TCP_P, 1500), R.DROP_POLICY_DENY, 1),
    ("overlapping_allow_ranges_narrower_names_rule", [E(1, ports=(1000, 2000)), E(2, ports=(1400, 1600))],
     (TCP_P, 1500), R.PASS_POLICY, 2),
    ("overlapping_allow_ranges_outside_narrower", [E(1, ports=(1000, 2000)), E(2, ports=(1400, 1600))],
     (TCP_P, 1100), R.PASS_POLICY, 1),
    ("audit_range_inside_allow_range", [E(1, ports=(1000, 2000)), E(2, V.AUDIT, ports=(1400, 1600))],
     (TCP_P, 1500), R.PASS_AUDIT, 2),

    # --- actions, entries sharing a key, default ---
    ("default_deny_without_entries", [], (TCP_P, 80), R.DROP_POLICY_DEFAULT, 0),
    ("default_deny_with_unrelated_entries", [E(1, remote=OTHER_REMOTE_ID), E(2, local=OTHER_LOCAL_ID)],
     (TCP_P, 80), R.DROP_POLICY_DEFAULT, 0),
    ("explicit_deny", [E(7, V.DENY)], (TCP_P, 80), R.DROP_POLICY_DENY, 7),
    ("explicit_deny_any_remote_any_protocol", [E(7, V.DENY, remote=0, proto=0, ports=ANY)], (UDP_P, 1),
     R.DROP_POLICY_DENY, 7),
    ("audit_passes", [E(8, V.AUDIT)], (TCP_P, 80), R.PASS_AUDIT, 8),
    ("audit_any_remote", [E(8, V.AUDIT, remote=0, ports=ANY)], (TCP_P, 5, "unknown"), R.PASS_AUDIT, 8),
    ("same_key_deny_and_allow", [E(5), E(6, V.DENY)], (TCP_P, 80), R.DROP_POLICY_DENY, 6),
    ("same_key_audit_and_allow", [E(5), E(6, V.AUDIT)], (TCP_P, 80), R.PASS_AUDIT, 6),
    ("same_key_deny_and_audit", [E(5, V.DENY), E(6, V.AUDIT)], (TCP_P, 80), R.DROP_POLICY_DENY, 5),
    ("same_key_two_allows_lower_rule_id", [E(9), E(4)], (TCP_P, 80), R.PASS_POLICY, 4),
    ("same_key_two_denies_lower_rule_id", [E(9, V.DENY), E(4, V.DENY)], (TCP_P, 80), R.DROP_POLICY_DENY, 4),
    ("deny_on_other_port_leaves_allow", [E(1, ports=ANY), E(2, V.DENY, ports=(22, 22))], (TCP_P, 80),
     R.PASS_POLICY, 1),
    ("deny_on_other_remote_leaves_allow", [E(1), E(2, V.DENY, remote=OTHER_REMOTE_ID, proto=0, ports=ANY)],
     (TCP_P, 80), R.PASS_POLICY, 1),
]


def _row_params():
    for name, specs, pkt, reason, rule in ROWS:
        for hook in HOOKS:
            yield pytest.param(hook, specs, pkt, reason, rule, id=f"{name}-{hook}")


@pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))
@pytest.mark.parametrize("hook,specs,pkt,reason,rule", list(_row_params()))
def test_verdict(vdp, tap, family, hook, specs, pkt, reason, rule):
    judge_row(vdp, tap, hook, family, specs, *pkt[:2], reason, rule, *pkt[2:])


# --- precedence at every wildcard level ----------------------------------------------
#
# The packet is REMOTE -> LOCAL, TCP port 1500. Each level is one way an
# entry can match it, most specific first: the order the datapath probes.

LEVELS = [
    ("exact_port", dict(remote=REMOTE_ID, proto=TCP_P, ports=(1500, 1500))),
    ("port_range", dict(remote=REMOTE_ID, proto=TCP_P, ports=(1000, 2000))),
    ("any_port", dict(remote=REMOTE_ID, proto=TCP_P, ports=ANY)),
    ("any_protocol", dict(remote=REMOTE_ID, proto=0, ports=ANY)),
    ("any_remote_exact_port", dict(remote=0, proto=TCP_P, ports=(1500, 1500))),
    ("any_remote_port_range", dict(remote=0, proto=TCP_P, ports=(1000, 2000))),
    ("any_remote_any_port", dict(remote=0, proto=TCP_P, ports=ANY)),
    ("any_remote_any_protocol", dict(remote=0, proto=0, ports=ANY)),
]
ACTION_NAME = {V.ALLOW: "allow", V.AUDIT: "audit", V.DENY: "deny"}


def _precedence_params():
    for strong, weak in ((V.DENY, V.ALLOW), (V.AUDIT, V.ALLOW), (V.DENY, V.AUDIT)):
        for i, (si, _) in enumerate(LEVELS):
            for j, (sj, _) in enumerate(LEVELS):
                name = f"{ACTION_NAME[strong]}_{si}_beats_{ACTION_NAME[weak]}_{sj}"
                yield pytest.param(strong, i, weak, j, id=name)


@pytest.mark.parametrize("strong,i,weak,j", list(_precedence_params()))
def test_stronger_action_wins_at_any_level(vdp, tap, strong, i, weak, j):
    specs = [E(100 + i, strong, **LEVELS[i][1]), E(200 + j, weak, **LEVELS[j][1])]
    for family in (4, 6):
        judge_row(vdp, tap, "xdp_ingress", family, specs, TCP_P, 1500, REASON_OF[strong], 100 + i)


def _specificity_params():
    for action in (V.ALLOW, V.AUDIT, V.DENY):
        for i, (si, _) in enumerate(LEVELS):
            for j, (sj, _) in enumerate(LEVELS):
                if i < j:
                    yield pytest.param(action, i, j, id=f"{ACTION_NAME[action]}_{si}_names_rule_over_{sj}")


@pytest.mark.parametrize("action,i,j", list(_specificity_params()))
def test_equal_actions_most_specific_names_the_rule(vdp, tap, action, i, j):
    """Among entries with the same action, the first the datapath finds, the
    most specific, is the rule reported and counted. Rule ids are chosen so
    that the lower id is the less specific entry."""
    specs = [E(300 - i, action, **LEVELS[i][1]), E(100 - j, action, **LEVELS[j][1])]
    for family in (4, 6):
        judge_row(vdp, tap, "tc_ingress", family, specs, TCP_P, 1500, REASON_OF[action], 300 - i)


def test_full_range_set(vdp, tap):
    """A key holds up to DP_MAX_RANGES ranges; every one of them is searched."""
    specs = [E(10 + k, ports=(1000 + 10 * k, 1001 + 10 * k)) for k in range(abi.MAX_RANGES)]
    for k in range(abi.MAX_RANGES):
        judge_row(vdp, tap, "xdp_ingress", 4, specs, TCP_P, 1001 + 10 * k, R.PASS_POLICY, 10 + k)
        judge_row(vdp, tap, "xdp_ingress", 6, specs, TCP_P, 1000 + 10 * k, R.PASS_POLICY, 10 + k)
        judge_row(vdp, tap, "xdp_ingress", 4, specs, TCP_P, 1002 + 10 * k, R.DROP_POLICY_DEFAULT, 0)


# --- direction -------------------------------------------------------------------------

@pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))
def test_egress_judges_source_as_local(vdp, tap, family):
    vdp.set_config(allow_sample=1)
    tables.sync_policy(vdp, [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, EG, TCP_P, 443, 443, V.ALLOW, 3)])
    out = tcp_frame(family, LOCAL[family], REMOTE[family], SPORT, 443)
    expect(vdp, "tc_egress", out, R.PASS_POLICY)
    check_event(tap.one(), hook="tc_egress", src=LOCAL[family], dst=REMOTE[family], sport=SPORT, dport=443,
                proto=TCP_P, verdict=V.ALLOW, reason=R.PASS_POLICY, rule=3, local_id=LOCAL_ID,
                remote_id=REMOTE_ID, length=len(out))
    # The same packet arriving is judged with its destination as the local end.
    vdp.ct.clear()
    expect(vdp, "xdp_ingress", out, R.DROP_POLICY_DEFAULT)
    check_event(tap.one(), hook="xdp_ingress", src=LOCAL[family], dst=REMOTE[family], sport=SPORT, dport=443,
                proto=TCP_P, verdict=V.DENY, reason=R.DROP_POLICY_DEFAULT, rule=0, local_id=REMOTE_ID,
                remote_id=LOCAL_ID, length=len(out))


@pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))
def test_ingress_entry_does_not_allow_egress(vdp, family):
    tables.sync_policy(vdp, [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, TCP_P, 443, 443, V.ALLOW, 3)])
    expect(vdp, "tc_egress", tcp_frame(family, LOCAL[family], REMOTE[family], SPORT, 443), R.DROP_POLICY_DEFAULT)
    expect(vdp, "tc_egress", tcp_frame(family, REMOTE[family], LOCAL[family], SPORT, 443), R.DROP_POLICY_DEFAULT)
    expect(vdp, "tc_ingress", tcp_frame(family, REMOTE[family], LOCAL[family], SPORT, 443), R.PASS_POLICY)


@pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))
def test_egress_entry_does_not_allow_ingress(vdp, family):
    tables.sync_policy(vdp, [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, EG, TCP_P, 443, 443, V.ALLOW, 3)])
    expect(vdp, "xdp_ingress", tcp_frame(family, REMOTE[family], LOCAL[family], SPORT, 443), R.DROP_POLICY_DEFAULT)
    expect(vdp, "tc_ingress", tcp_frame(family, REMOTE[family], LOCAL[family], SPORT, 443), R.DROP_POLICY_DEFAULT)


# --- longest prefix wins --------------------------------------------------------------

NESTED = {
    "10.0.0.0/8": 500, "10.1.0.0/24": 501, "10.1.0.10/32": 502,
    "172.16.0.0/12": 310, "172.16.5.5/32": 300,
    "fd00::/16": 600, "fd00:1::/64": 601, "fd00:1::10/128": 602,
    "fd10::/16": 610, "fd10::5/128": 300,
}
NESTED_POLICY = [
    tables.PolicyEntry(300, 500, IN, TCP_P, 0, 65535, V.ALLOW, 50),
    tables.PolicyEntry(300, 501, IN, TCP_P, 0, 65535, V.ALLOW, 51),
    tables.PolicyEntry(300, 502, IN, TCP_P, 0, 65535, V.ALLOW, 52),
    tables.PolicyEntry(300, 600, IN, TCP_P, 0, 65535, V.ALLOW, 60),
    tables.PolicyEntry(300, 601, IN, TCP_P, 0, 65535, V.ALLOW, 61),
    tables.PolicyEntry(300, 602, IN, TCP_P, 0, 65535, V.ALLOW, 62),
    tables.PolicyEntry(310, 502, IN, TCP_P, 0, 65535, V.ALLOW, 70),
    tables.PolicyEntry(610, 602, IN, TCP_P, 0, 65535, V.ALLOW, 71),
]
W = abi.ReservedIdentity.WORLD

# (name, src, dst, local id, remote id, reason, rule)
LPM_ROWS = [
    ("v4_host_inside_24_inside_8", "10.1.0.10", "172.16.5.5", 300, 502, R.PASS_POLICY, 52),
    ("v4_24_around_host", "10.1.0.11", "172.16.5.5", 300, 501, R.PASS_POLICY, 51),
    ("v4_24_last_address", "10.1.0.255", "172.16.5.5", 300, 501, R.PASS_POLICY, 51),
    ("v4_8_outside_24", "10.1.1.10", "172.16.5.5", 300, 500, R.PASS_POLICY, 50),
    ("v4_8_last_address", "10.255.255.255", "172.16.5.5", 300, 500, R.PASS_POLICY, 50),
    ("v4_outside_every_prefix", "11.1.0.10", "172.16.5.5", 300, W, R.DROP_POLICY_DEFAULT, 0),
    ("v4_just_below_8", "9.255.255.255", "172.16.5.5", 300, W, R.DROP_POLICY_DEFAULT, 0),
    ("v4_local_12_around_local_host", "10.1.0.10", "172.16.5.6", 310, 502, R.PASS_POLICY, 70),
    ("v4_local_12_other_remote", "10.1.0.11", "172.31.0.1", 310, 501, R.DROP_POLICY_DEFAULT, 0),
    ("v4_local_outside_12", "10.1.0.10", "172.32.0.1", W, 502, R.DROP_POLICY_DEFAULT, 0),
    ("v6_host_inside_64_inside_16", "fd00:1::10", "fd10::5", 300, 602, R.PASS_POLICY, 62),
    ("v6_64_around_host", "fd00:1::11", "fd10::5", 300, 601, R.PASS_POLICY, 61),
    ("v6_64_last_address", "fd00:1::ffff:ffff:ffff:ffff", "fd10::5", 300, 601, R.PASS_POLICY, 61),
    ("v6_16_outside_64", "fd00:2::10", "fd10::5", 300, 600, R.PASS_POLICY, 60),
    ("v6_outside_every_prefix", "fd01::10", "fd10::5", 300, W, R.DROP_POLICY_DEFAULT, 0),
    ("v6_local_16_around_local_host", "fd00:1::10", "fd10::6", 610, 602, R.PASS_POLICY, 71),
    ("v4_prefixes_do_not_match_v4_mapped_v6", "::ffff:10.1.0.10", "fd10::5", 300, W, R.DROP_POLICY_DEFAULT, 0),
    ("v4_prefixes_do_not_match_v4_compatible_v6", "::10.1.0.10", "fd10::5", 300, W, R.DROP_POLICY_DEFAULT, 0),
]


@pytest.mark.parametrize("hook", ("xdp_ingress", "tc_ingress"))
@pytest.mark.parametrize("src,dst,local_id,remote_id,reason,rule",
                         [pytest.param(*row[1:], id=row[0]) for row in LPM_ROWS])
def test_longest_prefix_wins(dp, tap, hook, src, dst, local_id, remote_id, reason, rule):
    dp.set_config(allow_sample=1)
    tables.sync_identities(dp, NESTED)
    tables.sync_policy(dp, NESTED_POLICY)
    family = ipaddress.ip_address(src).version
    data = tcp_frame(family, src, dst, SPORT, 22)
    before = dp.rule_counter(rule)
    expect(dp, hook, data, reason)
    assert dp.rule_counter(rule) == (before[0] + 1, before[1] + len(data))
    check_event(tap.one(), hook=hook, src=src, dst=dst, sport=SPORT, dport=22, proto=TCP_P,
                verdict=V.ALLOW if reason == R.PASS_POLICY else V.DENY, reason=reason, rule=rule,
                local_id=local_id, remote_id=remote_id, length=len(data))


@pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))
def test_removing_the_longest_prefix_exposes_the_next(dp, family):
    tables.sync_identities(dp, NESTED)
    tables.sync_policy(dp, NESTED_POLICY)
    src, dst, rule_host, rule_mid = (("10.1.0.10", "172.16.5.5", 52, 51) if family == 4 else
                                     ("fd00:1::10", "fd10::5", 62, 61))
    data = tcp_frame(family, src, dst, SPORT, 22)
    expect(dp, "xdp_ingress", data, R.PASS_POLICY)
    assert dp.rule_counter(rule_host)[0] == 1
    dp.ct.clear()
    tables.sync_identities(dp, {n: i for n, i in NESTED.items() if n not in ("10.1.0.10/32", "fd00:1::10/128")})
    expect(dp, "xdp_ingress", data, R.PASS_POLICY)
    assert dp.rule_counter(rule_mid)[0] == 1
    assert dp.rule_counter(rule_host)[0] == 1


def test_zero_length_prefix_names_every_other_address(dp):
    tables.sync_identities(dp, {**NESTED, "0.0.0.0/0": 700, "::/0": 701})
    tables.sync_policy(dp, NESTED_POLICY + [tables.PolicyEntry(300, 700, IN, TCP_P, 0, 65535, V.ALLOW, 80),
                                            tables.PolicyEntry(300, 701, IN, TCP_P, 0, 65535, V.ALLOW, 81)])
    expect(dp, "xdp_ingress", tcp_frame(4, "11.1.1.1", "172.16.5.5", SPORT, 22), R.PASS_POLICY)
    expect(dp, "xdp_ingress", tcp_frame(6, "2001:db8::1", "fd10::5", SPORT, 22), R.PASS_POLICY)
    # Longer prefixes still win over the default.
    expect(dp, "xdp_ingress", tcp_frame(4, "10.1.0.10", "172.16.5.5", SPORT, 23), R.PASS_POLICY)
    assert dp.rule_counter(80)[0] == 1 and dp.rule_counter(81)[0] == 1 and dp.rule_counter(52)[0] == 1


# --- audit-default mode ------------------------------------------------------------------

@pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))
@pytest.mark.parametrize("hook", HOOKS)
def test_audit_default_passes_unmatched_flows(vdp, tap, hook, family):
    vdp.set_config(audit_default=True)
    judge_row(vdp, tap, hook, family, [], TCP_P, 80, R.PASS_AUDIT, 0)
    judge_row(vdp, tap, hook, family, [E(1, ports=(22, 22))], TCP_P, 80, R.PASS_AUDIT, 0)
    judge_row(vdp, tap, hook, family, [E(1, V.DENY)], TCP_P, 80, R.DROP_POLICY_DENY, 1)
    judge_row(vdp, tap, hook, family, [E(1)], TCP_P, 80, R.PASS_POLICY, 1)
    judge_row(vdp, tap, hook, family, [E(2, V.AUDIT)], TCP_P, 80, R.PASS_AUDIT, 2)
    vdp.set_config(audit_default=False)
    judge_row(vdp, tap, hook, family, [], TCP_P, 80, R.DROP_POLICY_DEFAULT, 0)


def test_audited_flow_is_tracked_with_audit_verdict(vdp, tap):
    vdp.set_config(audit_default=True)
    first = tcp_frame(4, REMOTE[4], LOCAL[4], SPORT, 80)
    expect(vdp, "xdp_ingress", first, R.PASS_AUDIT)
    assert len(tap.take()) == 1
    (_key, val), = vdp.ct.items()
    assert (val.verdict, val.rule_id, val.local_id, val.remote_id) == (V.AUDIT, 0, LOCAL_ID, REMOTE_ID)
    # Later packets of the flow pass from conntrack without further events.
    expect(vdp, "xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], SPORT, 80, "A"), R.PASS_ESTABLISHED)
    expect(vdp, "tc_egress", tcp_frame(4, LOCAL[4], REMOTE[4], 80, SPORT, "SA"), R.PASS_REPLY)
    assert tap.take() == []


# --- counters ----------------------------------------------------------------------------

def test_rule_counters_count_packets_and_bytes(vdp):
    tables.sync_policy(vdp, [
        tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, TCP_P, 80, 80, V.ALLOW, 11),
        tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, TCP_P, 22, 22, V.DENY, 12),
        tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, UDP_P, 0, 65535, V.AUDIT, 13)])
    sent = {11: [], 12: [], 13: [], 0: []}
    for k, size in enumerate((0, 1, 100, 700)):
        payload = bytes(size)
        for rule, data in (
                (11, tcp_frame(4, REMOTE[4], LOCAL[4], SPORT + k, 80, payload=payload)),
                (11, tcp_frame(6, REMOTE[6], LOCAL[6], SPORT + k, 80, payload=payload)),
                (12, tcp_frame(4, REMOTE[4], LOCAL[4], SPORT + k, 22, payload=payload)),
                (13, udp_frame(6, REMOTE[6], LOCAL[6], SPORT + k, 9, payload=payload)),
                (0, tcp_frame(4, REMOTE[4], LOCAL[4], SPORT + k, 443, payload=payload))):
            send(vdp, "xdp_ingress", data)
            sent[rule].append(len(data))
    # Packets of an admitted flow count to the rule that admitted it.
    follow = tcp_frame(4, REMOTE[4], LOCAL[4], SPORT, 80, "A", payload=bytes(1000))
    expect(vdp, "tc_ingress", follow, R.PASS_ESTABLISHED)
    sent[11].append(len(follow))
    reply = tcp_frame(4, LOCAL[4], REMOTE[4], 80, SPORT, "A", payload=bytes(333))
    expect(vdp, "tc_egress", reply, R.PASS_REPLY)
    sent[11].append(len(reply))
    for rule, lengths in sent.items():
        assert vdp.rule_counter(rule) == (len(lengths), sum(lengths)), f"rule {rule}"
    # Packets decided without policy count to no rule.
    expect(vdp, "xdp_ingress", frame(4, REMOTE[4], LOCAL[4], TCP_P, tcp(SPORT, 80, dataofs=3)), R.DROP_TCP_DOFF)
    for rule, lengths in sent.items():
        assert vdp.rule_counter(rule) == (len(lengths), sum(lengths)), f"rule {rule}"


def test_reason_counters_sum_every_packet(vdp):
    tables.sync_policy(vdp, [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, TCP_P, 80, 80, V.ALLOW, 1),
                             tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, TCP_P, 22, 22, V.DENY, 2)])
    frames = [
        ("xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], SPORT, 80), R.PASS_POLICY),
        ("xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], SPORT, 80, "A", payload=bytes(10)), R.PASS_ESTABLISHED),
        ("tc_egress", tcp_frame(4, LOCAL[4], REMOTE[4], 80, SPORT, "SA"), R.PASS_REPLY),
        ("tc_ingress", tcp_frame(6, REMOTE[6], LOCAL[6], SPORT, 80), R.PASS_POLICY),
        ("tc_ingress", tcp_frame(6, REMOTE[6], LOCAL[6], SPORT, 22), R.DROP_POLICY_DENY),
        ("tc_ingress", tcp_frame(6, REMOTE[6], LOCAL[6], SPORT + 1, 22, payload=bytes(99)), R.DROP_POLICY_DENY),
        ("xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], SPORT, 23), R.DROP_POLICY_DEFAULT),
        ("xdp_ingress", frame(4, REMOTE[4], LOCAL[4], TCP_P, tcp(SPORT, 23, dataofs=2)), R.DROP_TCP_DOFF),
    ]
    want: dict = {}
    for hook, data, reason in frames:
        run_reason = send(vdp, hook, data).reason
        assert run_reason == reason
        pk, by = want.get(reason, (0, 0))
        want[reason] = (pk + 1, by + len(data))
    assert vdp.reason_counters() == want


# --- events ------------------------------------------------------------------------------

@pytest.mark.parametrize("hook", HOOKS)
def test_every_drop_emits_an_event(vdp, tap, hook):
    tables.sync_policy(vdp, [materialize(E(2, V.DENY, ports=(22, 22)), 4, DIRECTION[hook])])
    ingress = DIRECTION[hook] == IN
    src, dst = (REMOTE[4], LOCAL[4]) if ingress else (LOCAL[4], REMOTE[4])
    cases = [
        (tcp_frame(4, src, dst, SPORT, 22), R.DROP_POLICY_DENY, dict(sport=SPORT, dport=22, rule_id=2)),
        (tcp_frame(4, src, dst, SPORT, 23), R.DROP_POLICY_DEFAULT, dict(sport=SPORT, dport=23, rule_id=0)),
        (frame(4, src, dst, TCP_P, tcp(SPORT, 23, dataofs=4)), R.DROP_TCP_DOFF, dict(sport=0, dport=0, rule_id=0)),
        (frame(4, src, dst, TCP_P, b"", flags="MF", frag=3, id=77), R.DROP_FRAG_NO_FIRST,
         dict(sport=0, dport=0, rule_id=0)),
    ]
    for data, reason, fields in cases:
        expect(vdp, hook, data, reason)
        ev = tap.one()
        assert (ev.verdict, ev.reason, ev.hook, ev.direction, ev.pkt_len, ev.ifindex) == \
            (V.DENY, reason, HOOK_ID[hook], DIRECTION[hook], len(data), 1)
        assert (ev.src, ev.dst, ev.proto) == (ipaddress.ip_address(src), ipaddress.ip_address(dst), TCP_P)
        assert {k: getattr(ev, k) for k in fields} == fields
    # Drops decided before an IP header is read carry the reason and no addresses.
    data = eth_three_tags()
    expect(vdp, hook, data, R.DROP_VLAN_DEPTH)
    ev = tap.one()
    assert (ev.reason, ev.verdict, ev.hook, ev.pkt_len, ev.src, ev.dst) == \
        (R.DROP_VLAN_DEPTH, V.DENY, HOOK_ID[hook], len(data), None, None)


def eth_three_tags():
    return eth(0x0800, ((ETH_P_8021Q, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3))) + bytes(40)


def test_passes_without_judgement_emit_no_event(vdp, tap):
    vdp.set_config(allow_sample=1)
    expect(vdp, "xdp_ingress", arp_frame(), R.PASS_ARP)
    expect(vdp, "xdp_ingress", frame(6, REMOTE[6], LOCAL[6], 58, icmp(6, 135)), R.PASS_ND)
    assert tap.take() == []
    assert vdp.stat_counters()[abi.Stat.EVENTS_SAMPLED_OUT] == 0


def test_allow_events_are_sampled(vdp, tap):
    tables.sync_policy(vdp, [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, TCP_P, 80, 80, V.ALLOW, 1)])

    def flows(n, first_port):
        for k in range(n):
            expect(vdp, "xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], first_port + k, 80), R.PASS_POLICY)
            # established packets are never sampled
            expect(vdp, "xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], first_port + k, 80, "A"),
                   R.PASS_ESTABLISHED)
        return tap.take(), vdp.stat_counters()[abi.Stat.EVENTS_SAMPLED_OUT]

    got, skipped = flows(20, 10000)        # allow_sample 0: none reported
    assert (len(got), skipped) == (0, 20)

    vdp.set_config(allow_sample=1)         # every allowed new flow reported
    got, skipped = flows(20, 20000)
    assert (len(got), skipped) == (20, 20)
    assert sorted(e.sport for e in got) == list(range(20000, 20020))
    assert {(e.verdict, e.reason, e.rule_id) for e in got} == {(V.ALLOW, R.PASS_POLICY, 1)}

    vdp.set_config(allow_sample=2)         # about one in two
    got, skipped = flows(400, 30000)
    assert len(got) + (skipped - 20) == 400
    assert 100 < len(got) < 300, f"{len(got)} of 400 flows reported with allow_sample=2"

    # Denies and audits are reported whatever the sampling.
    vdp.set_config(allow_sample=1_000_000)
    tables.sync_policy(vdp, [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, TCP_P, 81, 81, V.AUDIT, 2)])
    for k in range(10):
        expect(vdp, "xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], 40000 + k, 81), R.PASS_AUDIT)
        expect(vdp, "xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], 40000 + k, 82), R.DROP_POLICY_DEFAULT)
    assert len(tap.take()) == 20
