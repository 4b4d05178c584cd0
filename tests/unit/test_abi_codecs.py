"""Address and key codecs (no kernel)."""

import ipaddress

import pytest

from loader import abi


@pytest.mark.parametrize("net", ["10.1.2.0/24", "10.1.2.3/32", "0.0.0.0/0", "fd00:1::/48", "fd00::1/128"])
@pytest.mark.parametrize("lpm", [False, True])
def test_ip_key_round_trip(net, lpm):
    net = ipaddress.ip_network(net)
    key = abi.ip_key(net, lpm)
    assert key.prefixlen == net.prefixlen + (32 if lpm else 0)
    assert abi.ip_key_network(key, lpm) == net


def test_ipv4_addresses_leave_the_upper_words_zero():
    raw = bytes(abi.addr_to_c(ipaddress.ip_address("192.0.2.1")))
    assert raw == bytes([192, 0, 2, 1]) + b"\0" * 12


def test_masks():
    assert bytes(abi.mask_words(abi.Family.IPV4, 20))[:4] == b"\xff\xff\xf0\x00"
    assert bytes(abi.mask_words(abi.Family.IPV4, 0)) == b"\0" * 16
    assert bytes(abi.mask_words(abi.Family.IPV6, 65)) == b"\xff" * 8 + b"\x80" + b"\0" * 7


def test_reason_ranges_split_pass_and_drop():
    assert all(not r.is_drop for r in abi.Reason if 0 < r < abi.REASON_FIRST_DROP)
    assert all(r.is_drop for r in abi.Reason if r >= abi.REASON_FIRST_DROP)
    assert max(abi.Reason) < abi.REASON_MAX


def test_verdicts_are_ordered_by_precedence():
    assert abi.Verdict.DENY > abi.Verdict.AUDIT > abi.Verdict.ALLOW > abi.Verdict.NONE
