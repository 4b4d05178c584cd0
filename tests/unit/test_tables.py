"""Laying policy entries and identities out in the maps (no kernel)."""

import ipaddress

import pytest

from loader import abi, tables
from loader.errors import MapError
from loader.tables import PolicyEntry

IN, OUT = abi.Direction.INGRESS, abi.Direction.EGRESS
ALLOW, AUDIT, DENY = abi.Verdict.ALLOW, abi.Verdict.AUDIT, abi.Verdict.DENY


def test_exact_port_any_port_and_any_protocol_get_their_own_keys():
    policy, sets = tables.layout_policy([
        PolicyEntry(300, 400, IN, 6, 443, 443, ALLOW, 1),
        PolicyEntry(300, 400, IN, 17, 0, 65535, ALLOW, 2),
        PolicyEntry(300, 0, OUT, 0, 0, 65535, DENY, 3),
    ])
    assert policy == {
        (300, 400, 443, 6, IN): (ALLOW, 1),
        (300, 400, 0, 17, IN): (ALLOW, 2),
        (300, 0, 0, 0, OUT): (DENY, 3),
    }
    assert sets == {}


def test_same_key_keeps_the_strongest_action_then_the_lowest_rule():
    policy, _ = tables.layout_policy([
        PolicyEntry(300, 400, IN, 6, 80, 80, ALLOW, 1),
        PolicyEntry(300, 400, IN, 6, 80, 80, DENY, 9),
        PolicyEntry(300, 400, IN, 6, 80, 80, DENY, 5),
        PolicyEntry(300, 400, IN, 6, 81, 81, AUDIT, 2),
        PolicyEntry(300, 400, IN, 6, 81, 81, ALLOW, 1),
    ])
    assert policy[(300, 400, 80, 6, IN)] == (DENY, 5)
    assert policy[(300, 400, 81, 6, IN)] == (AUDIT, 2)


def test_ranges_hang_off_the_any_port_key_sorted_deny_first_then_narrowest():
    policy, sets = tables.layout_policy([
        PolicyEntry(300, 400, IN, 6, 1000, 2000, ALLOW, 1),
        PolicyEntry(300, 400, IN, 6, 1500, 1600, ALLOW, 2),
        PolicyEntry(300, 400, IN, 6, 1900, 2100, DENY, 3),
        PolicyEntry(300, 400, IN, 6, 1550, 1560, AUDIT, 4),
    ])
    key = (300, 400, 0, 6, IN)
    assert policy[key] == (abi.Verdict.NONE, 0)  # ranges only, no any-port action
    assert sets[key] == ((1900, 2100, 3, DENY), (1550, 1560, 4, AUDIT), (1500, 1600, 2, ALLOW),
                         (1000, 2000, 1, ALLOW))


def test_layout_is_deterministic_whatever_the_input_order():
    entries = [PolicyEntry(300, r, IN, 6, p, p + 10 * (r % 2), ALLOW, r * 100 + p)
               for r in range(400, 420) for p in range(1, 60, 7)]
    assert tables.layout_policy(entries) == tables.layout_policy(list(reversed(entries)))


def test_too_many_ranges_for_one_key_names_the_map_and_the_key():
    entries = [PolicyEntry(300, 400, IN, 6, 1000 + 10 * i, 1005 + 10 * i, ALLOW, i + 1)
               for i in range(abi.MAX_RANGES + 1)]
    with pytest.raises(MapError, match=r"dp_ranges_v3: 17 port ranges for local identity 300, remote 400"):
        tables.layout_policy(entries)


@pytest.mark.parametrize("entry, message", [
    (PolicyEntry(0, 400, IN, 6, 80, 80, ALLOW, 1), "local identity cannot be the wildcard"),
    (PolicyEntry(300, 400, IN, 6, 90, 80, ALLOW, 1), "bad port range"),
    (PolicyEntry(300, 400, IN, 0, 80, 80, ALLOW, 1), "ports need a protocol"),
    (PolicyEntry(300, 400, IN, 6, 0, 80, ALLOW, 1), "port 0 only as part of 'any port'"),
    (PolicyEntry(300, 400, IN, 6, 80, 80, abi.Verdict.NONE, 1), "action must be"),
])
def test_invalid_entries_are_refused(entry, message):
    with pytest.raises(MapError, match=message):
        tables.layout_policy([entry])


def test_prefix_lengths_are_listed_longest_first_per_family_with_masks():
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "fd00::/64", "fd00::1/128")]
    plens = tables._plens_for(nets)
    v4, v6 = plens[0], plens[1]
    assert [v4.e[i].prefixlen for i in range(v4.count)] == [32, 16, 8]
    assert [v6.e[i].prefixlen for i in range(v6.count)] == [128, 64]
    assert bytes(v4.e[2].mask)[:4] == b"\xff\x00\x00\x00"
    assert bytes(v6.e[1].mask) == b"\xff" * 8 + b"\x00" * 8


def test_more_distinct_prefix_lengths_than_the_datapath_probes_is_refused():
    nets = [ipaddress.ip_network(f"fd00::/{n}", strict=False) for n in range(1, abi.MAX_PLENS + 2)]
    with pytest.raises(MapError, match="distinct IPv6 prefix lengths"):
        tables._plens_for(nets)
