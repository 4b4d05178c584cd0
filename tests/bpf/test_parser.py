"""Parser branches (bpf/lib/parse.h), one table row per behaviour.

Every row is a frame from REMOTE to LOCAL and the reason the datapath must
give it. The policy lets the two endpoints reach each other on TCP 80,
UDP 53, ICMP echo id 7 and GRE in both directions, so a frame the parser
reads correctly is judged the same at every hook; frames whose ports are
misread land on default deny instead of the expected allow. Each row runs
through every hook that can receive it (all three, except where
BPF_PROG_TEST_RUN itself refuses the frame for skb programs) and checks the
reason counter, the return code and the per-rule counters.
"""

from __future__ import annotations

import pytest

from loader import abi, tables, testrun
from loader.errors import DataplaneError
from tests.bpf.packets import (AH, DEST_UNREACH, DSTOPTS, ECHO_REQUEST, ETH_P_8021AD, ETH_P_8021Q,
                               ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETHERTYPE, FRAGMENT, GRE_P, HOOKS, HOPOPTS,
                               ICMP_OF, ICMP_P, ICMPV6_P, LOCAL, LOCAL_ID, QINQ, REMOTE, REMOTE_ID, ROUTING,
                               TCP_P, UDP_P, allow_both_ways, arp_frame, counts_delta, echo, echo_frame,
                               endpoint_identities, eth, expect, ext, frame, icmp, icmp_error_frame, ip,
                               rule_counts, tcp, tcp_frame, udp, udp_frame)

R = abi.Reason
RULE_TCP, RULE_UDP, RULE_ECHO, RULE_ECHO6, RULE_GRE = 10, 11, 12, 13, 14
RULES = (0, RULE_TCP, RULE_UDP, RULE_ECHO, RULE_ECHO6, RULE_GRE)
RULE_ECHO_OF = {4: RULE_ECHO, 6: RULE_ECHO6}
PORT_OK, PORT_DENIED = 80, 81
UDP_OK = 53
ECHO_ID_OK, ECHO_ID_DENIED = 7, 8
SPORT = 40000


@pytest.fixture
def pdp(dp):
    """The datapath with both endpoints known and the parser-test policy."""
    tables.sync_identities(dp, endpoint_identities())
    tables.sync_policy(dp, (
        allow_both_ways(LOCAL_ID, REMOTE_ID, TCP_P, PORT_OK, PORT_OK, RULE_TCP)
        + allow_both_ways(LOCAL_ID, REMOTE_ID, UDP_P, UDP_OK, UDP_OK, RULE_UDP)
        + allow_both_ways(LOCAL_ID, REMOTE_ID, ICMP_P, ECHO_ID_OK, ECHO_ID_OK, RULE_ECHO)
        + allow_both_ways(LOCAL_ID, REMOTE_ID, ICMPV6_P, ECHO_ID_OK, ECHO_ID_OK, RULE_ECHO6)
        + allow_both_ways(LOCAL_ID, REMOTE_ID, GRE_P, 0, 65535, RULE_GRE)))
    return dp


# --- frame shorthands: REMOTE -> LOCAL unless said otherwise -------------------------

def syn(f, dport=PORT_OK, **kw):
    return tcp_frame(f, REMOTE[f], LOCAL[f], SPORT, dport, **kw)


def l3(f, proto, l4, **kw):
    """IP packet REMOTE -> LOCAL without the Ethernet header."""
    return ip(f, REMOTE[f], LOCAL[f], proto, l4, **kw)


def with_eth(f, packet):
    return eth(ETHERTYPE[f]) + packet


def quoted_tcp(f, dport=PORT_OK, **kw):
    """The packet an ICMP error quotes: one LOCAL sent towards REMOTE."""
    return ip(f, LOCAL[f], REMOTE[f], TCP_P, tcp(SPORT, dport), **kw)


def error_quoting(f, quoted, type_=None):
    return icmp_error_frame(f, REMOTE[f], LOCAL[f], quoted, type_)


def patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def ipv4_options(n_words: int) -> bytes:
    """n_words * 4 bytes of NOP options (IHL 5 + n_words)."""
    return syn(4, options=[b"\x01" * (4 * n_words)])


BOTH = (4, 6)
V4 = (4,)
V6 = (6,)
NONIP = (None,)
XDP = ("xdp_ingress",)
IPHDR = {4: 20, 6: 40}

# (name, families, frame builder(family), reason, rule counted or None[, hooks])
ROWS = [
    # --- Ethernet and VLAN tags ---
    ("untagged", BOTH, lambda f: syn(f), R.PASS_POLICY, RULE_TCP),
    ("one_8021q_tag", BOTH, lambda f: syn(f, vlans=((ETH_P_8021Q, 10),)), R.PASS_POLICY, RULE_TCP),
    ("one_8021ad_tag", BOTH, lambda f: syn(f, vlans=((ETH_P_8021AD, 10),)), R.PASS_POLICY, RULE_TCP),
    ("two_tags_8021ad_then_8021q", BOTH, lambda f: syn(f, vlans=QINQ), R.PASS_POLICY, RULE_TCP),
    ("two_8021q_tags", BOTH, lambda f: syn(f, vlans=((ETH_P_8021Q, 1), (ETH_P_8021Q, 2))),
     R.PASS_POLICY, RULE_TCP),
    ("two_tags_denied_port_still_judged", BOTH, lambda f: syn(f, PORT_DENIED, vlans=QINQ),
     R.DROP_POLICY_DEFAULT, 0),
    ("three_tags", BOTH, lambda f: syn(f, vlans=((ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3))),
     R.DROP_VLAN_DEPTH, None),
    ("three_8021ad_tags", BOTH,
     lambda f: syn(f, vlans=((ETH_P_8021AD, 1), (ETH_P_8021AD, 2), (ETH_P_8021AD, 3))), R.DROP_VLAN_DEPTH, None),
    ("ethernet_header_with_vlan_tpid_only", NONIP, lambda f: eth(ETH_P_8021Q), R.DROP_L2_TRUNCATED, None),
    ("first_vlan_tag_cut_short", NONIP, lambda f: eth(ETH_P_IP, ((ETH_P_8021Q, 5),))[:16],
     R.DROP_L2_TRUNCATED, None),
    ("second_vlan_tag_cut_short", NONIP, lambda f: eth(ETH_P_IP, QINQ)[:20], R.DROP_L2_TRUNCATED, None),
    # BPF_PROG_TEST_RUN refuses an skb whose EtherType is IPv4/IPv6 and that
    # is shorter than the fixed IP header, so untagged cut headers reach XDP
    # only; behind a VLAN tag they reach every hook.
    ("ethernet_header_only", BOTH, lambda f: eth(ETHERTYPE[f]), R.DROP_L3_TRUNCATED, None, XDP),
    ("ethernet_and_tag_only", BOTH, lambda f: eth(ETHERTYPE[f], ((ETH_P_8021Q, 5),)), R.DROP_L3_TRUNCATED, None),
    ("arp", NONIP, lambda f: arp_frame(), R.PASS_ARP, None),
    ("arp_behind_two_tags", NONIP, lambda f: arp_frame(vlans=QINQ), R.PASS_ARP, None),
    ("arp_ethertype_without_body", NONIP, lambda f: eth(ETH_P_ARP), R.PASS_ARP, None),
    ("other_ethertype_lldp", NONIP, lambda f: eth(0x88CC) + bytes(46), R.PASS_NON_IP, None),
    ("other_ethertype_behind_tag", NONIP, lambda f: eth(0x88B5, ((ETH_P_8021Q, 7),)) + bytes(46),
     R.PASS_NON_IP, None),

    # --- IP version ---
    ("ipv4_ethertype_with_ipv6_header", NONIP, lambda f: eth(ETH_P_IP) + l3(6, TCP_P, tcp(SPORT, PORT_OK)),
     R.DROP_IP_VERSION, None),
    ("ipv6_ethertype_with_ipv4_header", NONIP, lambda f: eth(ETH_P_IPV6) + l3(4, TCP_P, tcp(SPORT, PORT_OK)),
     R.DROP_IP_VERSION, None),

    # --- IPv4 header ---
    ("ipv4_header_truncated", V4, lambda f: syn(4)[:14 + 19], R.DROP_L3_TRUNCATED, None, XDP),
    ("ipv4_header_truncated_behind_tag", V4, lambda f: syn(4, vlans=((ETH_P_8021Q, 5),))[:18 + 19],
     R.DROP_L3_TRUNCATED, None),
    ("ipv4_ihl_4", V4, lambda f: syn(4, ihl=4), R.DROP_IPV4_IHL, None),
    ("ipv4_ihl_0", V4, lambda f: patch(syn(4), 14, b"\x40"), R.DROP_IPV4_IHL, None),
    ("ipv4_options_ihl_6", V4, lambda f: ipv4_options(1), R.PASS_POLICY, RULE_TCP),
    ("ipv4_options_ihl_15", V4, lambda f: ipv4_options(10), R.PASS_POLICY, RULE_TCP),
    ("ipv4_options_denied_port", V4, lambda f: syn(4, PORT_DENIED, options=[b"\x01" * 8]),
     R.DROP_POLICY_DEFAULT, 0),
    ("ipv4_tot_len_below_header", V4, lambda f: syn(4, len=19), R.DROP_IPV4_LENGTH, None),
    ("ipv4_tot_len_below_header_with_options", V4, lambda f: syn(4, len=24, options=[b"\x01" * 8]),
     R.DROP_IPV4_LENGTH, None),
    ("ipv4_tot_len_beyond_frame", V4, lambda f: syn(4, len=20 + 20 + 1), R.DROP_IPV4_LENGTH, None),
    ("ipv4_tot_len_short_of_frame_padding", V4, lambda f: syn(4) + bytes(12), R.PASS_POLICY, RULE_TCP),
    ("ipv4_tot_len_zero_gso", V4, lambda f: syn(4, len=0), R.PASS_POLICY, RULE_TCP),
    ("ipv4_tot_len_zero_options_cut_short", V4, lambda f: patch(syn(4, len=0), 14, b"\x4f"),
     R.DROP_L3_TRUNCATED, None),

    # --- IPv6 header ---
    ("ipv6_header_truncated", V6, lambda f: syn(6)[:14 + 39], R.DROP_L3_TRUNCATED, None, XDP),
    ("ipv6_header_truncated_behind_tags", V6, lambda f: syn(6, vlans=QINQ)[:22 + 39], R.DROP_L3_TRUNCATED, None),
    ("ipv6_payload_len_beyond_frame", V6, lambda f: syn(6, plen=21), R.DROP_IPV6_LENGTH, None),
    ("ipv6_payload_len_zero_jumbo", V6, lambda f: syn(6, plen=0), R.PASS_POLICY, RULE_TCP),
    ("ipv6_payload_len_short_of_frame_padding", V6, lambda f: syn(6) + bytes(12), R.PASS_POLICY, RULE_TCP),

    # --- IPv6 extension headers ---
    *[(f"ipv6_ext_{name}_to_{l4name}", V6, (lambda k, p: lambda f: frame(
        6, REMOTE[6], LOCAL[6], p, tcp(SPORT, PORT_OK) if p == TCP_P else udp(SPORT, UDP_OK), exts=[k]))(kind, proto),
       R.PASS_POLICY, RULE_TCP if proto == TCP_P else RULE_UDP)
      for name, kind in (("hopbyhop", HOPOPTS), ("routing", ROUTING), ("dstopts", DSTOPTS),
                         ("atomic_fragment", FRAGMENT), ("ah", AH))
      for l4name, proto in (("tcp", TCP_P), ("udp", UDP_P))],
    ("ipv6_ext_each_kind_once", V6,
     lambda f: syn(6, exts=[HOPOPTS, DSTOPTS, ROUTING, FRAGMENT, AH]), R.PASS_POLICY, RULE_TCP),
    ("ipv6_ext_each_kind_denied_port", V6,
     lambda f: syn(6, PORT_DENIED, exts=[HOPOPTS, DSTOPTS, ROUTING, FRAGMENT, AH]), R.DROP_POLICY_DEFAULT, 0),
    ("ipv6_ext_six_headers_at_walk_limit", V6,
     lambda f: syn(6, exts=[HOPOPTS, DSTOPTS, ROUTING, FRAGMENT, AH, DSTOPTS]), R.PASS_POLICY, RULE_TCP),
    ("ipv6_ext_seven_headers_over_walk_limit", V6,
     lambda f: syn(6, exts=[HOPOPTS, DSTOPTS, ROUTING, FRAGMENT, AH, DSTOPTS, DSTOPTS]),
     R.DROP_IPV6_EXT_LIMIT, None),
    ("ipv6_ext_seven_dstopts_over_walk_limit", V6, lambda f: syn(6, exts=[DSTOPTS] * 7),
     R.DROP_IPV6_EXT_LIMIT, None),
    ("ipv6_ext_long_hopbyhop_length_honoured", V6,
     lambda f: with_eth(6, l3(6, HOPOPTS, ext(HOPOPTS, TCP_P, size=64) + tcp(SPORT, PORT_OK))),
     R.PASS_POLICY, RULE_TCP),
    ("ipv6_ext_long_ah_length_honoured", V6,
     lambda f: with_eth(6, l3(6, AH, ext(AH, TCP_P, size=40) + tcp(SPORT, PORT_OK))), R.PASS_POLICY, RULE_TCP),
    ("ipv6_ext_chain_of_1024_bytes", V6,
     lambda f: with_eth(6, l3(6, HOPOPTS, ext(HOPOPTS, TCP_P, size=1024) + tcp(SPORT, PORT_OK))),
     R.PASS_POLICY, RULE_TCP),
    ("ipv6_ext_chain_over_1024_bytes", V6,
     lambda f: with_eth(6, l3(6, HOPOPTS, ext(HOPOPTS, TCP_P, size=2048) + tcp(SPORT, PORT_OK))),
     R.DROP_IPV6_EXT_TRUNCATED, None),
    ("ipv6_ext_header_cut_short", V6, lambda f: with_eth(6, l3(6, HOPOPTS, bytes([TCP_P, 0, 0, 0]))),
     R.DROP_IPV6_EXT_TRUNCATED, None),
    ("ipv6_ext_second_header_cut_short", V6,
     lambda f: with_eth(6, l3(6, HOPOPTS, ext(HOPOPTS, DSTOPTS) + bytes([TCP_P, 0, 0, 0]))),
     R.DROP_IPV6_EXT_TRUNCATED, None),
    ("ipv6_ext_length_beyond_frame", V6, lambda f: with_eth(6, l3(6, HOPOPTS, bytes([TCP_P, 3]) + bytes(6))),
     R.DROP_IPV6_EXT_TRUNCATED, None),

    # --- TCP, UDP, other protocols ---
    ("tcp_allowed_port", BOTH, lambda f: syn(f), R.PASS_POLICY, RULE_TCP),
    ("tcp_denied_port", BOTH, lambda f: syn(f, PORT_DENIED), R.DROP_POLICY_DEFAULT, 0),
    ("tcp_source_port_is_not_the_policy_port", BOTH,
     lambda f: tcp_frame(f, REMOTE[f], LOCAL[f], PORT_OK, PORT_DENIED), R.DROP_POLICY_DEFAULT, 0),
    ("tcp_truncated", BOTH, lambda f: with_eth(f, l3(f, TCP_P, tcp(SPORT, PORT_OK)[:19])),
     R.DROP_L4_TRUNCATED, None),
    ("tcp_doff_4", BOTH, lambda f: frame(f, REMOTE[f], LOCAL[f], TCP_P, tcp(SPORT, PORT_OK, dataofs=4)),
     R.DROP_TCP_DOFF, None),
    ("tcp_doff_0", BOTH, lambda f: frame(f, REMOTE[f], LOCAL[f], TCP_P, tcp(SPORT, PORT_OK, dataofs=0)),
     R.DROP_TCP_DOFF, None),
    ("tcp_with_options_doff_8", BOTH,
     lambda f: frame(f, REMOTE[f], LOCAL[f], TCP_P,
                     tcp(SPORT, PORT_OK, options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)])),
     R.PASS_POLICY, RULE_TCP),
    ("udp_allowed_port", BOTH, lambda f: udp_frame(f, REMOTE[f], LOCAL[f], SPORT, UDP_OK), R.PASS_POLICY, RULE_UDP),
    ("udp_denied_port", BOTH, lambda f: udp_frame(f, REMOTE[f], LOCAL[f], SPORT, UDP_OK + 1),
     R.DROP_POLICY_DEFAULT, 0),
    ("udp_truncated", BOTH, lambda f: with_eth(f, l3(f, UDP_P, udp(SPORT, UDP_OK)[:7])),
     R.DROP_L4_TRUNCATED, None),
    ("gre_judged_by_protocol", BOTH, lambda f: frame(f, REMOTE[f], LOCAL[f], GRE_P, bytes(8)), R.PASS_POLICY,
     RULE_GRE),
    ("sctp_without_rule", BOTH, lambda f: frame(f, REMOTE[f], LOCAL[f], 132, bytes(12)),
     R.DROP_POLICY_DEFAULT, 0),

    # --- ICMP and ICMPv6 ---
    ("echo_request_id_is_the_port", BOTH, lambda f: echo_frame(f, REMOTE[f], LOCAL[f], ECHO_ID_OK),
     R.PASS_POLICY, "echo"),
    ("echo_reply_id_is_the_port", BOTH, lambda f: echo_frame(f, REMOTE[f], LOCAL[f], ECHO_ID_OK, reply=True),
     R.PASS_POLICY, "echo"),
    ("echo_request_other_id", BOTH, lambda f: echo_frame(f, REMOTE[f], LOCAL[f], ECHO_ID_DENIED),
     R.DROP_POLICY_DEFAULT, 0),
    ("icmp_truncated", BOTH, lambda f: with_eth(f, l3(f, ICMP_OF[f], echo(f, ECHO_ID_OK)[:7])),
     R.DROP_L4_TRUNCATED, None),
    ("icmp_informational_identifier_is_not_a_port", BOTH,
     lambda f: frame(f, REMOTE[f], LOCAL[f], ICMP_OF[f], icmp(f, 13 if f == 4 else 139, 0, ECHO_ID_OK)),
     R.DROP_POLICY_DEFAULT, 0),
    ("icmpv4_inside_ipv6_is_a_plain_protocol", V6,
     lambda f: frame(6, REMOTE[6], LOCAL[6], ICMP_P, icmp(4, ECHO_REQUEST[4], 0, ECHO_ID_OK)),
     R.DROP_POLICY_DEFAULT, 0),
    ("icmpv6_inside_ipv4_is_a_plain_protocol", V4,
     lambda f: frame(4, REMOTE[4], LOCAL[4], ICMPV6_P, icmp(6, ECHO_REQUEST[6], 0, ECHO_ID_OK)),
     R.DROP_POLICY_DEFAULT, 0),
    *[(f"ipv6_nd_type_{t}", V6, (lambda t: lambda f: frame(6, REMOTE[6], LOCAL[6], ICMPV6_P, icmp(6, t)))(t),
       R.PASS_ND, None) for t in (133, 134, 135, 136, 137)],
    *[(f"icmpv6_type_{t}_is_not_nd", V6, (lambda t: lambda f: frame(6, REMOTE[6], LOCAL[6], ICMPV6_P, icmp(6, t)))(t),
       R.DROP_POLICY_DEFAULT, 0) for t in (132, 138)],
    *[(f"ipv6_mld_type_{t}_to_a_group", V6,
       (lambda t: lambda f: frame(6, LOCAL[6], "ff02::16", ICMPV6_P, icmp(6, t), exts=[HOPOPTS]))(t),
       R.PASS_ND, None) for t in (130, 131, 132, 143)],
    *[(f"icmpv6_mld_type_{t}_to_a_unicast_address_is_judged", V6,
       (lambda t: lambda f: frame(6, REMOTE[6], LOCAL[6], ICMPV6_P, icmp(6, t)))(t),
       R.DROP_POLICY_DEFAULT, 0) for t in (130, 143)],
    ("ipv6_nd_behind_hopbyhop", V6, lambda f: frame(6, REMOTE[6], LOCAL[6], ICMPV6_P, icmp(6, 135),
                                                     exts=[HOPOPTS]), R.PASS_ND, None),
    ("ipv6_nd_truncated", V6, lambda f: with_eth(6, l3(6, ICMPV6_P, icmp(6, 135)[:6])), R.DROP_L4_TRUNCATED, None),
    ("icmpv4_type_135_is_not_nd", V4, lambda f: frame(4, REMOTE[4], LOCAL[4], ICMP_P, icmp(4, 135)),
     R.DROP_POLICY_DEFAULT, 0),

    # --- ICMP errors about flows nothing tracks: the quoted flow is judged ---
    ("icmp_error_quoting_allowed_tcp", BOTH, lambda f: error_quoting(f, quoted_tcp(f)), R.PASS_RELATED, RULE_TCP),
    ("icmp_error_quoting_allowed_udp", BOTH,
     lambda f: error_quoting(f, ip(f, LOCAL[f], REMOTE[f], UDP_P, udp(SPORT, UDP_OK))), R.PASS_RELATED, RULE_UDP),
    ("icmp_error_quoting_allowed_echo", BOTH,
     lambda f: error_quoting(f, ip(f, LOCAL[f], REMOTE[f], ICMP_OF[f], echo(f, ECHO_ID_OK))), R.PASS_RELATED, "echo"),
    ("icmp_error_quoting_denied_tcp", BOTH, lambda f: error_quoting(f, quoted_tcp(f, PORT_DENIED)),
     R.DROP_ICMP_UNRELATED, 0),
    ("icmp_error_quoting_denied_echo", BOTH,
     lambda f: error_quoting(f, ip(f, LOCAL[f], REMOTE[f], ICMP_OF[f], echo(f, ECHO_ID_DENIED))),
     R.DROP_ICMP_UNRELATED, 0),
    ("icmp_error_quoting_flow_between_other_endpoints", BOTH,
     lambda f: error_quoting(f, ip(f, REMOTE[f], "10.9.9.9" if f == 4 else "fd00:9::9", TCP_P, tcp(SPORT, PORT_OK))),
     R.DROP_ICMP_UNRELATED, 0),
    *[(f"icmp_error_type_{t}", V4, (lambda t: lambda f: error_quoting(4, quoted_tcp(4), t))(t), R.PASS_RELATED,
       RULE_TCP) for t in (3, 4, 5, 11, 12)],
    *[(f"icmpv6_error_type_{t}", V6, (lambda t: lambda f: error_quoting(6, quoted_tcp(6), t))(t), R.PASS_RELATED,
       RULE_TCP) for t in (1, 2, 3, 4)],
    ("icmp_error_quote_with_ip_options", V4, lambda f: error_quoting(4, quoted_tcp(4, options=[b"\x01" * 8])),
     R.PASS_RELATED, RULE_TCP),
    ("icmp_error_quote_denied_port_behind_ip_options", V4,
     lambda f: error_quoting(4, quoted_tcp(4, PORT_DENIED, options=[b"\x01" * 8])), R.DROP_ICMP_UNRELATED, 0),
    ("icmp_error_quoting_later_fragment_has_no_ports", V4,
     lambda f: error_quoting(4, quoted_tcp(4, frag=4)), R.DROP_ICMP_UNRELATED, 0),
    ("icmp_error_quote_ip_header_cut", BOTH,
     lambda f: error_quoting(f, quoted_tcp(f)[:10 if f == 4 else 30]), R.DROP_ICMP_TRUNCATED, None),
    ("icmp_error_quote_ports_cut", BOTH,
     lambda f: error_quoting(f, quoted_tcp(f)[:IPHDR[f] + 3]), R.DROP_ICMP_TRUNCATED, None),
    ("icmp_error_quote_echo_header_cut", BOTH,
     lambda f: error_quoting(f, ip(f, LOCAL[f], REMOTE[f], ICMP_OF[f], echo(f, ECHO_ID_OK))[:IPHDR[f] + 4]),
     R.DROP_ICMP_TRUNCATED, None),
    ("icmp_error_quote_wrong_ip_version", BOTH,
     lambda f: error_quoting(f, patch(quoted_tcp(f), 0, b"\x65" if f == 4 else b"\x45")), R.DROP_ICMP_TRUNCATED, None),
    ("icmp_error_quote_ihl_below_5", V4, lambda f: error_quoting(4, patch(quoted_tcp(4), 0, b"\x44")),
     R.DROP_ICMP_TRUNCATED, None),
    ("icmp_error_quote_options_cut", V4, lambda f: error_quoting(4, patch(quoted_tcp(4), 0, b"\x4f")[:28]),
     R.DROP_ICMP_TRUNCATED, None),
    ("icmp_error_without_quote", BOTH, lambda f: error_quoting(f, b""), R.DROP_ICMP_TRUNCATED, None),
]


def _expand(rows):
    for name, families, build, reason, rule, *hooks in rows:
        for fam in families:
            for hook in (hooks[0] if hooks else HOOKS):
                yield pytest.param(hook, build, fam, reason, rule,
                                   id=f"{name}-{hook}" if fam is None else f"{name}-ipv{fam}-{hook}")


@pytest.mark.parametrize("hook,build,family,reason,rule", list(_expand(ROWS)))
def test_parser(pdp, hook, build, family, reason, rule):
    data = build(family)
    if rule == "echo":
        rule = RULE_ECHO_OF[family]
    before = rule_counts(pdp, RULES)
    expect(pdp, hook, data, reason)
    want = {r: (0, 0) for r in RULES}
    if rule is not None:
        want[rule] = (1, len(data))
    assert counts_delta(before, rule_counts(pdp, RULES)) == want


def test_row_names_are_unique():
    names = [p.id for p in _expand(ROWS)]
    assert len(names) == len(set(names))


# --- parser decisions that need more than one packet --------------------------------

FIRST_DATA = bytes(range(16))
IDENT = 0x1234


def first_fragment(f, dport=PORT_OK, ident=IDENT, l4=None, exts_v6=None):
    l4 = tcp(SPORT, dport, "S", FIRST_DATA) if l4 is None else l4
    if f == 4:
        return frame(4, REMOTE[4], LOCAL[4], TCP_P, l4, flags="MF", frag=0, id=ident)
    return frame(6, REMOTE[6], LOCAL[6], TCP_P, l4, exts=exts_v6 or [FRAGMENT],
                 frag_offset=0, more=True, ident=ident)


def later_fragment(f, ident=IDENT, offset=5, more=False, exts_v6=None, proto=TCP_P):
    body = bytes(range(100, 124))
    if f == 4:
        return frame(4, REMOTE[4], LOCAL[4], proto, body, flags="MF" if more else 0, frag=offset, id=ident)
    return frame(6, REMOTE[6], LOCAL[6], proto, body, exts=exts_v6 or [FRAGMENT],
                 frag_offset=offset, more=more, ident=ident)


@pytest.mark.parametrize("family", (4, 6))
@pytest.mark.parametrize("hook", HOOKS)
def test_later_fragments_follow_an_allowed_first(pdp, hook, family):
    before = rule_counts(pdp, RULES)
    first, middle, last = first_fragment(family), later_fragment(family, more=True), later_fragment(family, offset=8)
    expect(pdp, hook, first, R.PASS_POLICY)
    expect(pdp, hook, middle, R.PASS_FRAGMENT)
    expect(pdp, hook, last, R.PASS_FRAGMENT)
    assert pdp.stat_counters()[abi.Stat.FRAG_TRACKED] == 1
    delta = counts_delta(before, rule_counts(pdp, RULES))
    assert delta[RULE_TCP] == (3, len(first) + len(middle) + len(last))
    assert delta[0] == (0, 0)


@pytest.mark.parametrize("family", (4, 6))
@pytest.mark.parametrize("hook", HOOKS)
def test_later_fragment_follows_a_denied_first(pdp, tap, hook, family):
    tables.sync_policy(pdp, allow_both_ways(LOCAL_ID, REMOTE_ID, TCP_P, PORT_DENIED, PORT_DENIED, 21,
                                            abi.Verdict.DENY))
    before = rule_counts(pdp, (21,))
    first, later = first_fragment(family, PORT_DENIED), later_fragment(family)
    expect(pdp, hook, first, R.DROP_POLICY_DENY)
    expect(pdp, hook, later, R.DROP_FRAG_DENIED)
    assert counts_delta(before, rule_counts(pdp, (21,)))[21] == (2, len(first) + len(later))
    # The later fragment's event carries the datagram's ports and the first's judgement.
    ev_first, ev_later = tap.take()
    assert (ev_later.reason, ev_later.verdict, ev_later.rule_id, ev_later.sport, ev_later.dport, ev_later.proto,
            ev_later.local_id, ev_later.remote_id, ev_later.pkt_len) == \
        (R.DROP_FRAG_DENIED, abi.Verdict.DENY, 21, SPORT, PORT_DENIED, TCP_P, ev_first.local_id,
         ev_first.remote_id, len(later))


@pytest.mark.parametrize("family", (4, 6))
def test_later_fragment_follows_a_default_denied_first(pdp, family):
    before = rule_counts(pdp, RULES)
    first, later = first_fragment(family, PORT_DENIED), later_fragment(family)
    expect(pdp, "xdp_ingress", first, R.DROP_POLICY_DEFAULT)
    expect(pdp, "xdp_ingress", later, R.DROP_FRAG_DENIED)
    assert counts_delta(before, rule_counts(pdp, RULES))[0] == (2, len(first) + len(later))


@pytest.mark.parametrize("family", (4, 6))
@pytest.mark.parametrize("age,reason", [(29, R.PASS_FRAGMENT), (31, R.DROP_FRAG_NO_FIRST)],
                         ids=("within_30s", "past_30s"))
def test_first_fragment_verdict_times_out(pdp, family, age, reason):
    expect(pdp, "xdp_ingress", first_fragment(family), R.PASS_POLICY)
    (key, val), = pdp.frag.items()
    assert val.created_ns > (age + 1) * 10**9
    val.created_ns -= age * 10**9
    pdp.frag.update(key, val)
    expect(pdp, "xdp_ingress", later_fragment(family), reason)


@pytest.mark.parametrize("family", (4, 6))
@pytest.mark.parametrize("hook", HOOKS)
def test_later_fragment_without_first(pdp, hook, family):
    before = rule_counts(pdp, RULES)
    expect(pdp, hook, later_fragment(family), R.DROP_FRAG_NO_FIRST)
    assert set(counts_delta(before, rule_counts(pdp, RULES)).values()) == {(0, 0)}


def test_unfragmented_packets_are_not_tracked_as_fragments(pdp):
    expect(pdp, "xdp_ingress", frame(4, REMOTE[4], LOCAL[4], TCP_P, tcp(SPORT, PORT_OK), flags="DF"), R.PASS_POLICY)
    expect(pdp, "xdp_ingress", syn(6, exts=[FRAGMENT]), R.PASS_POLICY)   # atomic fragment
    assert pdp.stat_counters()[abi.Stat.FRAG_TRACKED] == 0
    assert list(pdp.frag.items()) == []


@pytest.mark.parametrize("family", (4, 6))
def test_later_fragment_of_another_datagram(pdp, family):
    expect(pdp, "xdp_ingress", first_fragment(family), R.PASS_POLICY)
    expect(pdp, "xdp_ingress", later_fragment(family, ident=IDENT + 1), R.DROP_FRAG_NO_FIRST)
    expect(pdp, "xdp_ingress", later_fragment(family), R.PASS_FRAGMENT)


@pytest.mark.parametrize("family", (4, 6))
def test_later_fragment_from_another_source(pdp, family):
    expect(pdp, "xdp_ingress", first_fragment(family), R.PASS_POLICY)
    other = later_fragment(family)
    src_off = 14 + (12 if family == 4 else 8)
    other = patch(other, src_off + (3 if family == 4 else 15), b"\x99")
    expect(pdp, "xdp_ingress", other, R.DROP_FRAG_NO_FIRST)


@pytest.mark.parametrize("family", (4, 6))
def test_fragments_seen_at_different_hooks_share_the_verdict(pdp, family):
    expect(pdp, "xdp_ingress", first_fragment(family), R.PASS_POLICY)
    expect(pdp, "tc_ingress", later_fragment(family), R.PASS_FRAGMENT)


@pytest.mark.parametrize("family", (4, 6))
def test_tiny_first_fragment_is_dropped_and_not_followed(pdp, family):
    tiny = first_fragment(family, l4=tcp(SPORT, PORT_OK)[:12])
    expect(pdp, "xdp_ingress", tiny, R.DROP_L4_TRUNCATED)
    expect(pdp, "xdp_ingress", later_fragment(family), R.DROP_FRAG_NO_FIRST)
    assert pdp.stat_counters()[abi.Stat.FRAG_TRACKED] == 0


def test_ipv6_later_fragment_follows_first_with_headers_before_fragment_header(pdp):
    expect(pdp, "xdp_ingress", first_fragment(6, exts_v6=[HOPOPTS, DSTOPTS, FRAGMENT]), R.PASS_POLICY)
    expect(pdp, "xdp_ingress", later_fragment(6, exts_v6=[HOPOPTS, DSTOPTS, FRAGMENT]), R.PASS_FRAGMENT)


@pytest.mark.parametrize("after", [AH, DSTOPTS], ids=["ah", "dstopts"])
def test_ipv6_later_fragment_follows_first_with_headers_after_fragment_header(pdp, after):
    """RFC 8200 section 4.5: headers after the Fragment header (AH, destination
    options) are part of the fragmentable part and travel only in the first
    fragment; later fragments carry a Fragment header whose next header names
    them. The datagram is still one datagram (source, destination, id)."""
    expect(pdp, "xdp_ingress", first_fragment(6, exts_v6=[FRAGMENT, after]), R.PASS_POLICY)
    later = frame(6, REMOTE[6], LOCAL[6], after, bytes(range(24)), exts=[FRAGMENT],
                  frag_offset=5, more=False, ident=IDENT)
    expect(pdp, "xdp_ingress", later, R.PASS_FRAGMENT)


@pytest.mark.parametrize("family", (4, 6))
@pytest.mark.parametrize("hook", HOOKS)
def test_icmp_error_quoting_tracked_flow_passes_without_policy(pdp, hook, family):
    """The quoted flow was admitted earlier (LOCAL -> REMOTE, judged at egress);
    with the policy gone the error still passes, from conntrack."""
    expect(pdp, "tc_egress", tcp_frame(family, LOCAL[family], REMOTE[family], SPORT, PORT_OK), R.PASS_POLICY)
    tables.sync_policy(pdp, [])
    before = rule_counts(pdp, RULES)
    err = error_quoting(family, quoted_tcp(family))
    expect(pdp, hook, err, R.PASS_RELATED)
    assert counts_delta(before, rule_counts(pdp, RULES))[RULE_TCP] == (1, len(err))
    assert len(list(pdp.ct.items())) == 1
    # Without the entry the same error is judged, and the policy is gone.
    expect(pdp, hook, error_quoting(family, quoted_tcp(family, PORT_DENIED)), R.DROP_ICMP_UNRELATED)


@pytest.mark.parametrize("family", (4, 6))
@pytest.mark.parametrize("hook", HOOKS)
def test_icmp_error_about_untracked_flow_creates_no_conntrack_entry(pdp, hook, family):
    expect(pdp, hook, error_quoting(family, quoted_tcp(family)), R.PASS_RELATED)
    assert list(pdp.ct.items()) == []
    # The flow the error quoted is not admitted by it: a packet of that flow
    # arriving afterwards is judged as a new flow.
    tables.sync_policy(pdp, [])
    expect(pdp, "tc_egress", tcp_frame(family, LOCAL[family], REMOTE[family], SPORT, PORT_OK, "A"),
           R.DROP_POLICY_DEFAULT)


@pytest.mark.parametrize("family", (4, 6))
def test_icmp_error_direction_is_the_quoted_flows(pdp, family):
    """At an ingress hook the quoted packet left LOCAL: it is judged egress
    with LOCAL as the local end. Only that direction is allowed here."""
    tables.sync_policy(pdp, [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, abi.Direction.EGRESS, TCP_P, PORT_OK,
                                                PORT_OK, abi.Verdict.ALLOW, RULE_TCP)])
    err = error_quoting(family, quoted_tcp(family))
    expect(pdp, "xdp_ingress", err, R.PASS_RELATED)
    expect(pdp, "tc_ingress", err, R.PASS_RELATED)
    # At egress the same error is judged as an ingress flow towards REMOTE.
    expect(pdp, "tc_egress", err, R.DROP_ICMP_UNRELATED)


@pytest.mark.parametrize("tracked", (True, False), ids=("tracked", "untracked"))
@pytest.mark.parametrize("kinds", ([HOPOPTS], [FRAGMENT]), ids=("hopbyhop", "fragment"))
def test_icmpv6_error_quoting_packet_with_extension_headers(pdp, kinds, tracked):
    """An ICMPv6 error quotes the invoking packet whole, extension headers
    included (RFC 4443 section 2.4); the flow it belongs to is the TCP flow
    behind them, as for the packets of the flow themselves."""
    if tracked:
        expect(pdp, "tc_egress", tcp_frame(6, LOCAL[6], REMOTE[6], SPORT, PORT_OK, exts=kinds), R.PASS_POLICY)
        tables.sync_policy(pdp, [])
    quoted = ip(6, LOCAL[6], REMOTE[6], TCP_P, tcp(SPORT, PORT_OK), exts=kinds)
    expect(pdp, "xdp_ingress", icmp_error_frame(6, REMOTE[6], LOCAL[6], quoted, 2), R.PASS_RELATED)


@pytest.mark.parametrize("family", (4, 6))
def test_icmp_error_sent_by_the_local_end(pdp, family):
    """LOCAL answers an inbound UDP packet with port unreachable: at egress
    the quoted packet travelled inwards and is judged as ingress to LOCAL."""
    tables.sync_policy(pdp, [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, abi.Direction.INGRESS, UDP_P, UDP_OK,
                                                UDP_OK, abi.Verdict.ALLOW, RULE_UDP)])
    port_unreachable = (3, 3) if family == 4 else (1, 4)     # (type, code)

    def error_for(dport):
        quoted = ip(family, REMOTE[family], LOCAL[family], UDP_P, udp(SPORT, dport))
        return icmp_error_frame(family, LOCAL[family], REMOTE[family], quoted, *port_unreachable)

    expect(pdp, "tc_egress", error_for(UDP_OK), R.PASS_RELATED)
    expect(pdp, "tc_egress", error_for(UDP_OK + 1), R.DROP_ICMP_UNRELATED)


def test_frames_shorter_than_ethernet_never_reach_the_programs(pdp):
    """BPF_PROG_TEST_RUN refuses frames below ETH_HLEN at both program types,
    so the shortest frame a hook can see is a bare Ethernet header. With a
    VLAN EtherType and no tag it is L2-truncated (rows above); with nothing
    behind it, it is non-IP."""
    for hook in HOOKS:
        with pytest.raises(DataplaneError):
            testrun.test_run(pdp.prog_fds[hook], eth(0x88CC)[:13])
        expect(pdp, hook, eth(0x88CC), R.PASS_NON_IP)


# --- found by the packet fuzzer (tests/bpf/test_packet_fuzz.py) --------------------------

@pytest.mark.parametrize("family", (4, 6))
def test_icmp_error_quoting_the_other_versions_icmp_has_no_ports(pdp, family):
    """ICMP of the other IP version inside a quote is just another protocol,
    as it is on its own: its "echo id" is no port. It once was, and an error
    quoting such a packet passed as related to the echo rule."""
    other = ICMPV6_P if family == 4 else ICMP_P
    quoted = ip(family, LOCAL[family], REMOTE[family], other, echo(family, ECHO_ID_OK))
    expect(pdp, "xdp_ingress", error_quoting(family, quoted), R.DROP_ICMP_UNRELATED)
    own = ip(family, LOCAL[family], REMOTE[family], ICMP_OF[family], echo(family, ECHO_ID_OK))
    expect(pdp, "xdp_ingress", error_quoting(family, own), R.PASS_RELATED)
    # Cut short, it is still a truncated quote, as a truncated ICMP header is at the top level.
    expect(pdp, "xdp_ingress", error_quoting(family, quoted[:len(quoted) - len(echo(family, 0)) + 4]),
           R.DROP_ICMP_TRUNCATED)


@pytest.mark.parametrize("family", (4, 6))
@pytest.mark.parametrize("allowed", (True, False), ids=("related", "unrelated"))
def test_fragmented_icmp_error_later_fragments_follow_it(pdp, family, allowed):
    """The later fragments of an ICMP error belong to the error datagram
    (its own addresses and id), not to the flow it quotes; they get the
    error's verdict, also when the error matched no conntrack entry."""
    body = icmp(family, DEST_UNREACH[family], body=quoted_tcp(family, PORT_OK if allowed else PORT_DENIED))
    if family == 4:
        first = frame(4, REMOTE[4], LOCAL[4], ICMP_P, body, flags="MF", id=IDENT)
    else:
        first = frame(6, REMOTE[6], LOCAL[6], ICMPV6_P, body, exts=[FRAGMENT], frag_offset=0, more=True,
                      ident=IDENT)
    later = later_fragment(family, proto=ICMP_OF[family])
    expect(pdp, "xdp_ingress", first, R.PASS_RELATED if allowed else R.DROP_ICMP_UNRELATED)
    expect(pdp, "xdp_ingress", later, R.PASS_FRAGMENT if allowed else R.DROP_FRAG_DENIED)
    assert list(pdp.ct.items()) == []
