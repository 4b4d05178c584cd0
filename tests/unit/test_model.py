"""The reference model of the datapath's decision (no kernel). The bpf tier
checks that the kernel agrees with it on random maps."""

from loader import abi
from loader.model import Model
from loader.tables import PolicyEntry

IN, OUT = abi.Direction.INGRESS, abi.Direction.EGRESS
ALLOW, AUDIT, DENY = abi.Verdict.ALLOW, abi.Verdict.AUDIT, abi.Verdict.DENY
R = abi.Reason

IDS = {"10.0.0.0/8": 100, "10.1.0.0/16": 200, "10.1.2.3/32": 300, "fd00::/64": 400, "fd00::5/128": 500}


def model(entries, audit_default=False):
    return Model.from_entries(IDS, entries, audit_default)


def test_longest_prefix_wins_and_unknown_is_world():
    m = model([])
    assert m.identity_of("10.1.2.3") == 300
    assert m.identity_of("10.1.2.4") == 200
    assert m.identity_of("10.9.9.9") == 100
    assert m.identity_of("11.0.0.1") == abi.ReservedIdentity.WORLD
    assert m.identity_of("fd00::5") == 500
    assert m.identity_of("fd00::6") == 400
    assert m.identity_of("fd01::1") == abi.ReservedIdentity.WORLD


def test_no_entry_is_default_deny_or_audit_in_audit_mode():
    assert model([]).decide(300, 200, IN, 6, 80).reason == R.DROP_POLICY_DEFAULT
    d = model([], audit_default=True).decide(300, 200, IN, 6, 80)
    assert (d.verdict, d.reason, d.rule_id) == (AUDIT, R.PASS_AUDIT, 0)


def test_deny_on_a_wildcard_beats_a_specific_allow():
    m = model([PolicyEntry(300, 200, IN, 6, 80, 80, ALLOW, 1), PolicyEntry(300, 0, IN, 0, 0, 65535, DENY, 2)])
    d = m.decide(300, 200, IN, 6, 80)
    assert (d.verdict, d.reason, d.rule_id) == (DENY, R.DROP_POLICY_DENY, 2)


def test_audit_beats_allow_and_deny_beats_audit():
    m = model([PolicyEntry(300, 200, IN, 6, 80, 80, ALLOW, 1), PolicyEntry(300, 0, IN, 6, 0, 65535, AUDIT, 2)])
    assert m.decide(300, 200, IN, 6, 80).rule_id == 2
    m = model([PolicyEntry(300, 200, IN, 6, 80, 80, AUDIT, 1), PolicyEntry(300, 200, IN, 6, 70, 90, DENY, 2)])
    assert m.decide(300, 200, IN, 6, 80).verdict == DENY


def test_most_specific_allow_names_the_rule():
    m = model([PolicyEntry(300, 0, IN, 0, 0, 65535, ALLOW, 1), PolicyEntry(300, 200, IN, 6, 80, 80, ALLOW, 2)])
    assert m.decide(300, 200, IN, 6, 80).rule_id == 2
    assert m.decide(300, 200, IN, 6, 81).rule_id == 1


def test_ranges_edges():
    m = model([PolicyEntry(300, 200, IN, 17, 1000, 2000, ALLOW, 7)])
    assert m.decide(300, 200, IN, 17, 1000).verdict == ALLOW
    assert m.decide(300, 200, IN, 17, 2000).verdict == ALLOW
    assert m.decide(300, 200, IN, 17, 999).verdict == DENY
    assert m.decide(300, 200, IN, 17, 2001).verdict == DENY
    assert m.decide(300, 200, IN, 6, 1500).verdict == DENY


def test_direction_is_part_of_the_key():
    m = model([PolicyEntry(300, 200, OUT, 6, 80, 80, ALLOW, 1)])
    assert m.decide(300, 200, OUT, 6, 80).verdict == ALLOW
    assert m.decide(300, 200, IN, 6, 80).verdict == DENY


def test_judge_takes_local_from_the_direction():
    m = model([PolicyEntry(300, 200, IN, 6, 80, 80, ALLOW, 1), PolicyEntry(300, 200, OUT, 6, 53, 53, ALLOW, 2)])
    assert m.judge("10.1.9.9", "10.1.2.3", 6, 80, IN).rule_id == 1
    assert m.judge("10.1.2.3", "10.1.9.9", 6, 53, OUT).rule_id == 2
