"""Two policy generations and the atomic switch between them
(loader/tables.py apply_state, struct dp_gen): packets see the old state
until the switch and the new one after it, never a mix, and a state that
does not fit is refused before anything is written."""

from __future__ import annotations

import ipaddress

import pytest

from loader import abi, tables
from loader.errors import MapError
from loader.model import Model
from tests.bpf.packets import LOCAL, LOCAL_ID, REMOTE, REMOTE_ID, TCP_P, expect, send, tcp_frame

R, V = abi.Reason, abi.Verdict
IN = abi.Direction.INGRESS
OTHER_ID = 500


def entry(remote, port, action, rule, lo=None, hi=None):
    return tables.PolicyEntry(LOCAL_ID, remote, IN, TCP_P, lo or port, hi or port, action, rule)


# Old: REMOTE may use 80 (rule 1) and 1000-2000 (rule 2); 443 is denied (rule 3).
# New: REMOTE moves to another identity, whose rules are the other way round.
OLD_IDS = {f"{LOCAL[4]}/32": LOCAL_ID, f"{REMOTE[4]}/32": REMOTE_ID}
NEW_IDS = {f"{LOCAL[4]}/32": LOCAL_ID, f"{REMOTE[4]}/32": OTHER_ID}
OLD = [entry(REMOTE_ID, 80, V.ALLOW, 1), entry(REMOTE_ID, 0, V.ALLOW, 2, 1000, 2000),
       entry(REMOTE_ID, 443, V.DENY, 3), entry(OTHER_ID, 443, V.ALLOW, 4)]
NEW = [entry(OTHER_ID, 443, V.ALLOW, 4), entry(OTHER_ID, 0, V.ALLOW, 5, 1500, 2500),
       entry(OTHER_ID, 80, V.DENY, 6), entry(REMOTE_ID, 80, V.ALLOW, 7)]


def syn(port, sport=40000):
    return tcp_frame(4, REMOTE[4], LOCAL[4], sport, port, "S")


def verdicts(dp, ports=(80, 443, 1200, 1800, 2200, 22)):
    """Reason for a new flow to each port (a fresh source port each time)."""
    out = {}
    for i, port in enumerate(ports):
        dp.ct.clear()
        out[port] = send(dp, "xdp_ingress", syn(port, 41000 + i)).reason
    return out


OLD_VERDICTS = {80: R.PASS_POLICY, 443: R.DROP_POLICY_DENY, 1200: R.PASS_POLICY, 1800: R.PASS_POLICY,
                2200: R.DROP_POLICY_DEFAULT, 22: R.DROP_POLICY_DEFAULT}
NEW_VERDICTS = {80: R.DROP_POLICY_DENY, 443: R.PASS_POLICY, 1200: R.DROP_POLICY_DEFAULT, 1800: R.PASS_POLICY,
                2200: R.PASS_POLICY, 22: R.DROP_POLICY_DEFAULT}


def test_apply_switches_everything_at_once_and_keeps_both_generations_equal(dp):
    first = tables.apply_state(dp, OLD_IDS, OLD)
    assert verdicts(dp) == OLD_VERDICTS
    second = tables.apply_state(dp, NEW_IDS, NEW)
    assert second.generation == 1 - first.generation
    assert second.epoch == first.epoch + 1
    assert verdicts(dp) == NEW_VERDICTS
    for gen in (0, 1):
        assert tables.read_identities(dp, gen) == {ipaddress.ip_network(n): i for n, i in NEW_IDS.items()}
        policy, sets = tables.read_policy(dp, gen)
        assert (policy, sets["sets"]) == tables.layout_policy(NEW)


def test_the_idle_generation_is_invisible_until_the_switch(dp):
    tables.apply_state(dp, OLD_IDS, OLD)
    live = tables.active_generation(dp)
    tables.sync_identities(dp, NEW_IDS, gen=1 - live)
    tables.sync_policy(dp, NEW, gen=1 - live)
    assert verdicts(dp) == OLD_VERDICTS          # fully written, not live: old state
    tables.set_active_generation(dp, 1 - live)
    assert verdicts(dp) == NEW_VERDICTS          # one update later: new state


def test_established_flows_meet_the_new_state_at_their_next_packet(dp):
    tables.apply_state(dp, OLD_IDS, OLD)
    expect(dp, "xdp_ingress", syn(80), R.PASS_POLICY)
    expect(dp, "xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], 40000, 80, "A"), R.PASS_ESTABLISHED)
    tables.apply_state(dp, NEW_IDS, NEW)
    expect(dp, "xdp_ingress", tcp_frame(4, REMOTE[4], LOCAL[4], 40000, 80, "A"), R.DROP_REVOKED)


def test_model_reads_the_live_generation(dp):
    tables.apply_state(dp, OLD_IDS, OLD)
    tables.apply_state(dp, NEW_IDS, NEW)
    model = Model.from_datapath(dp)
    assert model.identity_of(REMOTE[4]) == OTHER_ID
    assert model.judge(REMOTE[4], LOCAL[4], TCP_P, 2200, IN).rule_id == 5


def test_a_state_that_does_not_fit_is_refused_and_nothing_is_written(dp):
    tables.apply_state(dp, OLD_IDS, OLD)
    before = (tables.active_generation(dp), dp.read_config().epoch, sorted(bytes(k) for k in dp.policy.keys()))
    room = dp.policy.max_entries // 2
    too_many = [tables.PolicyEntry(LOCAL_ID, 1000 + i, IN, TCP_P, 80, 80, V.ALLOW, 1) for i in range(room + 1)]
    with pytest.raises(MapError, match=rf"dp_policy_v3: {room + 1} entries wanted, room for {room} per generation"):
        tables.apply_state(dp, OLD_IDS, too_many)
    after = (tables.active_generation(dp), dp.read_config().epoch, sorted(bytes(k) for k in dp.policy.keys()))
    assert after == before
    assert verdicts(dp) == OLD_VERDICTS


def test_capacity_check_names_each_map_that_overflows(dp):
    ids = {f"{10 + (i >> 16)}.{i >> 8 & 255}.{i & 255}.0/24": 1000 + i for i in range(dp.ipcache.max_entries // 2 + 1)}
    problems = tables.check_capacity(dp, ids, [entry(REMOTE_ID, 80, V.ALLOW, dp.rules.max_entries)])
    assert any(p.startswith("dp_ipcache_v3:") for p in problems), problems
    assert any(p.startswith("dp_rules_v3:") for p in problems), problems
