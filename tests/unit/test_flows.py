"""Flow records, filters, names and the flow hub (no kernel)."""

import dataclasses
import datetime as dt
import ipaddress
import threading
import time

import pytest

from dataplane import flows
from dataplane.flows import FIELDS, FilterError, FlowHub, FlowRecord, Names, compile_filters, parse_since
from dataplane.v1 import flow_pb2
from loader import abi
from loader.events import FlowEvent
from loader.tables import PolicyEntry

IN, OUT = abi.Direction.INGRESS, abi.Direction.EGRESS
ALLOW, AUDIT, DENY = abi.Verdict.ALLOW, abi.Verdict.AUDIT, abi.Verdict.DENY
ip = ipaddress.ip_address

NOW = 1_700_000_000_000_000_000
SEC = 10**9


BASE = FlowRecord(time_ns=NOW, host="node-a", src=ip("10.0.0.1"), dst=ip("10.0.1.2"), sport=40000, dport=443,
                  proto=6, src_id=300, dst_id=400, src_labels={"app": "web", "env": "prod"},
                  dst_labels={"app": "db"}, direction="ingress", verdict="deny", rule="deny-db", rule_id=7,
                  reason="policy_deny", hook="tc_ingress", ifindex=3, length=60)


def rec(**kw) -> FlowRecord:
    """BASE with some fields changed (and label dicts of its own)."""
    kw.setdefault("src_labels", dict(BASE.src_labels))
    kw.setdefault("dst_labels", dict(BASE.dst_labels))
    return dataclasses.replace(BASE, **kw)


def matches(exprs, record) -> bool:
    return compile_filters(exprs)(record)


# --- compile_filters: every field ------------------------------------------------------

FIELD_CASES = {
    # field: (expression, matching record kwargs, non-matching record kwargs)
    "verdict": ("verdict=deny", {"verdict": "deny"}, {"verdict": "allow"}),
    "reason": ("reason=revoked", {"reason": "revoked"}, {"reason": "policy"}),
    "rule": ("rule=allow-web", {"rule": "allow-web"}, {"rule": "default"}),
    "direction": ("direction=egress", {"direction": "egress"}, {"direction": "ingress"}),
    "protocol": ("protocol=udp", {"proto": 17}, {"proto": 6}),
    "host": ("host=node-b", {"host": "node-b"}, {"host": "node-a"}),
    "ip": ("ip=192.0.2.7", {"dst": ip("192.0.2.7")}, {}),
    "source-ip": ("source-ip=10.0.0.0/24", {"src": ip("10.0.0.200")}, {"src": ip("10.0.9.1")}),
    "destination-ip": ("destination-ip=10.0.1.0/24", {"dst": ip("10.0.1.99")}, {"dst": ip("10.0.2.1")}),
    "port": ("port=8080", {"sport": 8080}, {}),
    "source-port": ("source-port=40000", {"sport": 40000}, {"sport": 443, "dport": 40000}),
    "destination-port": ("destination-port=443", {"dport": 443}, {"sport": 443, "dport": 80}),
    "label": ("label=app=db", {}, {"dst_labels": {"app": "cache"}}),
    "source-label": ("source-label=env=prod", {}, {"src_labels": {"env": "dev"}, "dst_labels": {"env": "prod"}}),
    "destination-label": ("destination-label=app=db", {},
                          {"dst_labels": {"app": "web"}, "src_labels": {"app": "db"}}),
    "identity": ("identity=400", {}, {"dst_id": 401}),
    "source-identity": ("source-identity=300", {}, {"src_id": 400, "dst_id": 300}),
    "destination-identity": ("destination-identity=400", {}, {"dst_id": 300, "src_id": 400}),
}


def test_every_field_has_a_case():
    assert set(FIELD_CASES) == set(FIELDS)


@pytest.mark.parametrize("field", sorted(FIELD_CASES))
def test_each_field_matches_and_refuses(field):
    expr, yes, no = FIELD_CASES[field]
    match = compile_filters([expr])
    assert match(rec(**yes)) is True
    assert match(rec(**no)) is False


def test_ip_and_port_fields_match_either_end():
    assert matches(["ip=10.0.0.1"], rec())            # source
    assert matches(["ip=10.0.1.2"], rec())            # destination
    assert not matches(["ip=10.9.9.9"], rec())
    assert matches(["port=40000"], rec())             # source port
    assert matches(["port=443"], rec())               # destination port
    assert not matches(["port=22"], rec())


def test_identity_field_matches_either_end():
    assert matches(["identity=300"], rec())
    assert matches(["identity=400"], rec())
    assert not matches(["identity=500"], rec())


def test_protocol_by_name_and_by_number():
    assert matches(["protocol=tcp"], rec(proto=6))
    assert matches(["protocol=6"], rec(proto=6))
    assert matches(["protocol=icmpv6"], rec(proto=58))
    assert matches(["protocol=132"], rec(proto=132))
    assert not matches(["protocol=icmp"], rec(proto=58))


def test_comma_separates_alternatives():
    match = compile_filters(["verdict=deny,audit"])
    assert match(rec(verdict="deny"))
    assert match(rec(verdict="audit"))
    assert not match(rec(verdict="allow"))


def test_alternatives_tolerate_spaces():
    match = compile_filters(["port= 22 , 443 "])
    assert match(rec(dport=443))
    assert match(rec(sport=22, dport=1))
    assert not match(rec(sport=1, dport=2))


def test_several_expressions_must_all_hold():
    match = compile_filters(["verdict=deny", "protocol=tcp", "destination-port=443"])
    assert match(rec())
    assert not match(rec(verdict="allow"))
    assert not match(rec(proto=17))
    assert not match(rec(dport=80))


def test_no_expressions_match_everything():
    assert compile_filters([])(rec()) is True


def test_ipv4_prefix():
    match = compile_filters(["source-ip=10.0.0.0/8"])
    assert match(rec(src=ip("10.255.1.1")))
    assert not match(rec(src=ip("11.0.0.1")))


def test_prefix_with_host_bits_is_accepted_as_its_network():
    match = compile_filters(["source-ip=10.0.0.77/24"])
    assert match(rec(src=ip("10.0.0.1")))
    assert not match(rec(src=ip("10.0.1.1")))


def test_ipv6_prefix_and_address():
    match = compile_filters(["ip=2001:db8::/32"])
    assert match(rec(src=ip("2001:db8:1::5"), dst=ip("2001:db9::1")))
    assert not match(rec(src=ip("2001:db9::5"), dst=ip("fd00::1")))
    assert matches(["destination-ip=fd00::1"], rec(dst=ip("fd00::1")))
    assert not matches(["destination-ip=fd00::1"], rec(dst=ip("fd00::2")))


def test_ipv6_prefix_never_matches_an_ipv4_address():
    # ::/0 holds every IPv6 address, and ::ffff:0:0/96 the IPv4-mapped ones;
    # neither is an IPv4 address.
    v4 = rec(src=ip("10.0.0.1"), dst=ip("192.0.2.1"))
    assert not matches(["ip=::/0"], v4)
    assert not matches(["ip=::ffff:0:0/96"], v4)
    assert not matches(["source-ip=::/0"], v4)
    assert matches(["ip=0.0.0.0/0"], v4)


def test_ipv4_prefix_never_matches_an_ipv6_address():
    v6 = rec(src=ip("::ffff:10.0.0.1"), dst=ip("fd00::1"))
    assert not matches(["ip=0.0.0.0/0"], v6)
    assert matches(["ip=::/0"], v6)


def test_ip_filters_never_match_a_flow_without_addresses():
    non_ip = rec(src=None, dst=None)
    assert not matches(["ip=0.0.0.0/0"], non_ip)
    assert not matches(["source-ip=::/0"], non_ip)
    assert not matches(["destination-ip=::/0"], non_ip)


def test_label_key_value():
    match = compile_filters(["label=env=prod"])
    assert match(rec(src_labels={"env": "prod"}, dst_labels={}))
    assert match(rec(src_labels={}, dst_labels={"env": "prod"}))
    assert not match(rec(src_labels={"env": "dev"}, dst_labels={"env": "test"}))
    assert not match(rec(src_labels={"stage": "prod"}, dst_labels={}))


def test_bare_label_key_matches_any_value():
    match = compile_filters(["label=team"])
    assert match(rec(src_labels={"team": "payments"}, dst_labels={}))
    assert match(rec(src_labels={}, dst_labels={"team": ""}))
    assert not match(rec(src_labels={"app": "web"}, dst_labels={"app": "db"}))


def test_list_valued_label_matches_each_of_its_values():
    # group labels are stored as "a,b"
    both = rec(src_labels={"group": "a,b"}, dst_labels={})
    assert matches(["label=group=a"], both)
    assert matches(["label=group=b"], both)
    assert matches(["source-label=group=a"], both)
    assert not matches(["label=group=c"], both)
    assert not matches(["destination-label=group=a"], both)
    assert not matches(["label=group=a"], rec(src_labels={"group": "ab"}, dst_labels={}))


def test_label_value_is_not_split_into_alternatives():
    # label fields take one KEY=VALUE whose value may itself be a list
    # (_split_values), so label=group=a,b is one wanted (group, "a,b").
    # BUG (dataplane/flows.py): _has() looks for the whole wanted value
    # "a,b" among the record's split values ["a", "b"], so this filter
    # matches nothing, not even a flow whose group label is exactly "a,b".
    match = compile_filters(["label=group=a,b"])
    assert match(rec(src_labels={"group": "a,b"}, dst_labels={}))
    assert not match(rec(src_labels={"group": "c"}, dst_labels={}))


def test_label_on_reserved_identity():
    match = compile_filters(["source-label=reserved=world"])
    assert match(rec(src_labels={"reserved": "world"}))
    assert not match(rec(src_labels={"reserved": "host"}))


# --- compile_filters: errors --------------------------------------------------------

def _error(exprs) -> str:
    with pytest.raises(FilterError) as exc:
        compile_filters(exprs)
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def test_filter_error_is_a_value_error():
    assert issubclass(FilterError, ValueError)


def test_unknown_field_names_it_and_lists_the_known_ones():
    msg = _error(["colour=red"])
    assert "colour" in msg
    for field in FIELDS:
        assert field in msg


def test_missing_equals_sign():
    msg = _error(["verdict"])
    assert "verdict" in msg and "VALUE" in msg


def test_bare_word_is_an_unknown_field():
    assert "deny" in _error(["deny"])


@pytest.mark.parametrize("expr", ["verdict=", "port=  ", "label=", "ip="])
def test_empty_value(expr):
    assert expr.split("=")[0] in _error([expr])


def test_value_of_only_commas_is_refused():
    # BUG (dataplane/flows.py): "verdict=," passes the empty-value check
    # (", " strips to something) but splits into no alternatives, so it
    # compiles to a filter that silently matches nothing.
    _error(["verdict=,"])


def test_bad_verdict_lists_the_verdicts():
    msg = _error(["verdict=drop"])
    assert "'drop'" in msg
    for v in ("allow", "audit", "deny"):
        assert v in msg


def test_bad_alternative_among_good_ones_is_named():
    assert "'nope'" in _error(["verdict=deny,nope"])


def test_bad_reason_and_direction():
    assert "'because'" in _error(["reason=because"])
    assert "'sideways'" in _error(["direction=sideways"])


@pytest.mark.parametrize("value", ["70000", "x", "-1", "65536", "1.5"])
def test_bad_port(value):
    msg = _error([f"port={value}"])
    assert repr(value) in msg and "65535" in msg


@pytest.mark.parametrize("field", ["source-port", "destination-port"])
def test_bad_directed_port(field):
    assert field in _error([f"{field}=70000"])


def test_port_bounds_are_accepted():
    assert matches(["port=0,65535"], rec(sport=0, dport=1))
    assert matches(["port=65535"], rec(sport=1, dport=65535))


@pytest.mark.parametrize("expr", ["port=²", "identity=²", "protocol=²"])
def test_unicode_digits_are_a_filter_error(expr):
    # BUG (dataplane/flows.py): _ints and _protocols check str.isdigit(),
    # which is true for "²", then int("²") raises a plain ValueError, not
    # FilterError; the GetFlows servicers catch only FilterError.
    _error([expr])


@pytest.mark.parametrize("value", ["10.0.0.300", "web", "10.0.0.0/33", "fd00::/129"])
def test_bad_ip(value):
    msg = _error([f"ip={value}"])
    assert repr(value) in msg and "address" in msg


def test_bad_identity():
    assert "'4294967296'" in _error(["identity=4294967296"])
    assert matches(["identity=4294967295"], rec(src_id=4294967295))


@pytest.mark.parametrize("value", ["sctp", "256", "-6"])
def test_bad_protocol(value):
    msg = _error([f"protocol={value}"])
    assert repr(value) in msg and "tcp" in msg


@pytest.mark.parametrize("value", ["=web", "bad key=x", "a:b"])
def test_bad_label(value):
    assert "KEY=VALUE" in _error([f"label={value}"])


# --- parse_since ---------------------------------------------------------------------

@pytest.mark.parametrize("text, ago_ns", [
    ("250ms", 250 * 10**6),
    ("90s", 90 * SEC),
    ("1.5s", 1500 * 10**6),
    ("5m", 300 * SEC),
    ("2h", 7200 * SEC),
    ("1d", 86400 * SEC),
    ("0s", 0),
])
def test_since_duration_is_relative_to_now(text, ago_ns):
    assert parse_since(text, now_ns=NOW) == NOW - ago_ns


def test_since_duration_is_exact_to_the_nanosecond():
    # BUG (dataplane/flows.py): durations go through float arithmetic
    # (1025 * 0.001 * 1e9), which comes out 1 ns short for e.g. 1025ms.
    for n in (1025, 1027, 1999):
        assert parse_since(f"{n}ms", now_ns=NOW) == NOW - n * 10**6, n


def test_since_duration_defaults_to_the_clock():
    before = time.time_ns()
    got = parse_since("10s")
    after = time.time_ns()
    assert before - 10 * SEC <= got <= after - 10 * SEC


def test_since_rfc3339_utc():
    want = int(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC).timestamp()) * SEC
    assert parse_since("2024-01-02T03:04:05Z", now_ns=NOW) == want
    assert parse_since("2024-01-02T03:04:05+00:00") == want


def test_since_rfc3339_with_offset():
    utc = parse_since("2024-01-02T03:04:05Z")
    assert parse_since("2024-01-02T05:04:05+02:00") == utc
    assert parse_since("2024-01-01T22:04:05-05:00") == utc


def test_since_rfc3339_fraction_is_exact_to_the_nanosecond():
    # BUG (dataplane/flows.py): the time is converted with
    # int(t.timestamp() * 1e9), a float of ~1.7e18 that cannot hold every
    # ns: "...05.000001Z" gives ...000001024 instead of ...000001000, so a
    # flow at exactly that instant falls outside since=.
    base = parse_since("2024-01-02T03:04:05Z")
    assert parse_since("2024-01-02T03:04:05.000001Z") == base + 1000
    assert parse_since("2024-01-02T03:04:05.999999Z") == base + 999_999_000


def test_since_naive_time_is_refused():
    with pytest.raises(FilterError, match="time zone"):
        parse_since("2024-01-02T03:04:05")


@pytest.mark.parametrize("text", ["yesterday", "5 minutes", "-5m", "5M", "10x", "2024-13-01T00:00:00Z"])
def test_since_garbage_is_refused(text):
    with pytest.raises(FilterError) as exc:
        parse_since(text, now_ns=NOW)
    assert repr(text) in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("text", ["", "   ", None])
def test_since_empty_is_no_bound(text):
    assert parse_since(text, now_ns=NOW) == 0


# --- reasons -------------------------------------------------------------------------

@pytest.mark.parametrize("reason, name", [
    (abi.Reason.PASS_POLICY, "policy"),
    (abi.Reason.DROP_REVOKED, "revoked"),
    (abi.Reason.DROP_POLICY_DENY, "policy_deny"),
    (abi.Reason.DROP_POLICY_DEFAULT, "policy_default"),
    (abi.Reason.PASS_ESTABLISHED, "established"),
    (abi.Reason.NONE, "none"),
    (int(abi.Reason.DROP_NON_IP), "non_ip"),
])
def test_reason_name(reason, name):
    assert flows.reason_name(reason) == name


def test_unknown_reason_number():
    assert flows.reason_name(99) == "reason-99"


def test_reason_names_cover_every_reason():
    assert flows.REASON_NAMES == {flows.reason_name(r) for r in abi.Reason}
    assert {"policy", "revoked", "established", "reply", "none"} <= flows.REASON_NAMES
    assert not any(n.startswith(("pass_", "drop_")) for n in flows.REASON_NAMES)
    for name in sorted(flows.REASON_NAMES):
        assert matches([f"reason={name}"], rec(reason=name))


# --- names ---------------------------------------------------------------------------

def test_names_build_takes_the_strongest_action_per_rule():
    entries = [
        PolicyEntry(300, 400, IN, 6, 443, 443, ALLOW, 1),
        PolicyEntry(300, 401, IN, 6, 443, 443, ALLOW, 1),
        PolicyEntry(300, 400, IN, 6, 22, 22, DENY, 2),
        PolicyEntry(300, 400, OUT, 17, 53, 53, AUDIT, 3),
        PolicyEntry(300, 402, OUT, 17, 53, 53, ALLOW, 3),
        PolicyEntry(300, 402, OUT, 17, 53, 53, abi.Verdict.NONE, 4),
    ]
    names = Names.build("node-a", 12, False, {"1": "allow-web", 2: "no-ssh", 3: "watch-dns"},
                        {"300": "app=web env=prod", 400: {"app": "db"}}, entries)
    assert names.host == "node-a" and names.revision == 12 and names.audit_default is False
    assert names.actions == {1: "allow", 2: "deny", 3: "audit", 4: ""}
    assert names.rules == {1: "allow-web", 2: "no-ssh", 3: "watch-dns"}
    assert names.labels == {300: {"app": "web", "env": "prod"}, 400: {"app": "db"}}
    assert names.rule(1) == "allow-web" and names.action(2) == "deny"
    assert names.rule(9) == "rule-9" and names.action(9) == ""
    assert names.actions_record() == {"1": "allow", "2": "deny", "3": "audit", "4": ""}


def test_rule_zero_is_default_deny_or_audit():
    deny = Names.build("h", 1, False, {}, {}, [])
    audit = Names.build("h", 1, True, {}, {}, [])
    assert deny.rule(0) == "default" and audit.rule(0) == "default"
    assert deny.action(0) == "deny"
    assert audit.action(0) == "audit"


def test_names_from_record():
    record = {"revision": 5, "mode": "audit", "rules": {"1": "allow-web", "2": "no-ssh"},
              "actions": {"1": "allow", "2": "deny"}, "identities": {"300": "app=web", "400": "app=db group=a,b"}}
    names = Names.from_record(record, host="node-b", revision=1)
    assert names.host == "node-b" and names.revision == 5 and names.audit_default is True
    assert names.rules == {1: "allow-web", 2: "no-ssh"}
    assert names.actions == {1: "allow", 2: "deny"}
    assert names.labels == {300: {"app": "web"}, 400: {"app": "db", "group": "a,b"}}
    assert names.action(0) == "audit"
    # actions_record() is what the workspace writes back into applied.json
    assert Names.from_record({"actions": names.actions_record()}, "x").actions == names.actions


def test_names_from_empty_record():
    names = Names.from_record({}, host="node-c", revision=3)
    assert names.revision == 3 and names.audit_default is False
    assert names.rules == {} and names.actions == {} and names.labels == {}
    assert names.action(0) == "deny"


def test_reserved_identities_have_fixed_labels():
    names = Names(labels={300: {"app": "web"}})
    assert names.identity(1) == {"reserved": "host"}
    assert names.identity(2) == {"reserved": "world"}
    assert names.identity(abi.ReservedIdentity.WORLD) == {"reserved": "world"}
    assert names.identity(300) == {"app": "web"}
    assert names.identity(301) == {}
    assert names.identity(0) == {}


def test_parse_labels():
    assert flows.parse_labels("app=web env=prod") == {"app": "web", "env": "prod"}
    assert flows.parse_labels("group=a,b  flag") == {"group": "a,b", "flag": ""}
    assert flows.parse_labels("k=v=w") == {"k": "v=w"}
    assert flows.parse_labels("") == {}
    assert flows.parse_labels(None) == {}
    given = {"app": "web"}
    got = flows.parse_labels(given)
    assert got == given and got is not given


# --- protobuf ------------------------------------------------------------------------

def test_to_pb_fields():
    pb = rec(proto=17, src_labels={"app": "web"}).to_pb()
    assert isinstance(pb, flow_pb2.Flow)
    assert pb.time_unix_ns == NOW and pb.host == "node-a"
    assert pb.source == "10.0.0.1" and pb.destination == "10.0.1.2"
    assert pb.source_port == 40000 and pb.destination_port == 443
    assert pb.protocol == "udp"
    assert pb.source_identity.id == 300 and dict(pb.source_identity.labels) == {"app": "web"}
    assert pb.destination_identity.id == 400 and dict(pb.destination_identity.labels) == {"app": "db"}
    assert (pb.direction, pb.verdict, pb.rule, pb.rule_id, pb.reason, pb.hook, pb.ifindex, pb.length) == \
        ("ingress", "deny", "deny-db", 7, "policy_deny", "tc_ingress", 3, 60)


@pytest.mark.parametrize("record", [
    rec(),
    rec(src=ip("2001:db8::1"), dst=ip("fd00::2"), proto=58, sport=0, dport=0, hook="xdp_ingress"),
    rec(proto=132),                                  # no name: carried as its number
    rec(proto=1, src_labels={"reserved": "world"}, dst_labels={}, src_id=2),
    rec(src=None, dst=None, proto=0, sport=0, dport=0, reason="non_ip"),
    rec(src=ip("0.0.0.0"), dst=ip("::")),
], ids=["ipv4", "ipv6", "proto-number", "icmp-world", "non-ip", "unspecified"])
def test_pb_round_trip(record):
    pb = record.to_pb()
    back = FlowRecord.from_pb(flow_pb2.Flow.FromString(pb.SerializeToString()))
    assert back == record


def test_pb_round_trip_ipv6_keeps_address_objects():
    record = rec(src=ip("2001:db8::1"), dst=ip("fd00::2"))
    back = FlowRecord.from_pb(record.to_pb())
    assert back.src == ipaddress.IPv6Address("2001:db8::1") and back.src.version == 6
    assert back.to_pb().source == "2001:db8::1"


def test_from_pb_host_override():
    pb = rec(host="node-a").to_pb()
    assert FlowRecord.from_pb(pb).host == "node-a"
    assert FlowRecord.from_pb(pb, host="node-z").host == "node-z"
    assert FlowRecord.from_pb(pb, host="").host == ""
    assert dataclasses.replace(FlowRecord.from_pb(pb, host="node-z"), host="node-a") == rec()


def test_from_pb_unknown_protocol_text_is_zero():
    assert FlowRecord.from_pb(flow_pb2.Flow(protocol="sctp")).proto == 0
    assert FlowRecord.from_pb(flow_pb2.Flow(protocol="")).proto == 0
    assert FlowRecord.from_pb(flow_pb2.Flow(protocol="icmpv6")).proto == 58


def test_from_pb_unicode_digit_protocol_is_zero():
    # BUG (dataplane/flows.py): "²".isdigit() is true, so int("²") raises
    # ValueError; a controller receiving such a flow from an agent fails.
    assert FlowRecord.from_pb(flow_pb2.Flow(protocol="²")).proto == 0


def test_from_pb_bad_address_is_none():
    back = FlowRecord.from_pb(flow_pb2.Flow(source="nonsense", destination=""))
    assert back.src is None and back.dst is None


# --- from_event ----------------------------------------------------------------------

BASE_EVENT = FlowEvent(ts_ns=5 * SEC, src=ip("10.0.0.1"), dst=ip("10.0.1.2"), sport=40000, dport=443, proto=6,
                       direction=IN, verdict=DENY, reason=abi.Reason.DROP_POLICY_DENY, hook=abi.Hook.TC_INGRESS,
                       rule_id=7, local_id=300, remote_id=400, ifindex=3, pkt_len=60)


def event(hook, **kw) -> FlowEvent:
    return dataclasses.replace(BASE_EVENT, hook=hook, **kw)


NAMES = Names(host="node-a", rules={7: "deny-db"}, labels={300: {"app": "web"}, 400: {"app": "db"}})


def test_from_event_at_egress_comes_from_the_local_identity():
    r = FlowRecord.from_event(event(abi.Hook.TC_EGRESS, direction=OUT), NAMES, 1000)
    assert (r.src_id, r.dst_id) == (300, 400)
    assert r.src_labels == {"app": "web"} and r.dst_labels == {"app": "db"}
    assert r.hook == "tc_egress" and r.direction == "egress"


@pytest.mark.parametrize("hook", [abi.Hook.XDP_INGRESS, abi.Hook.TC_INGRESS])
def test_from_event_at_ingress_comes_from_the_remote_identity(hook):
    r = FlowRecord.from_event(event(hook), NAMES, 1000)
    assert (r.src_id, r.dst_id) == (400, 300)
    assert r.src_labels == {"app": "db"} and r.dst_labels == {"app": "web"}
    assert r.hook == hook.name.lower() and r.direction == "ingress"


def test_from_event_fields():
    ev = event(abi.Hook.TC_INGRESS, src=ip("2001:db8::1"), dst=ip("fd00::2"), proto=58, sport=9, dport=0,
               verdict=AUDIT, reason=abi.Reason.PASS_AUDIT, rule_id=0, remote_id=2, ifindex=11, pkt_len=1280)
    offset = 1_600_000_000 * SEC
    r = FlowRecord.from_event(ev, NAMES, offset)
    assert r.time_ns == 5 * SEC + offset
    assert r.host == "node-a"
    assert (r.src, r.dst, r.sport, r.dport, r.proto) == (ip("2001:db8::1"), ip("fd00::2"), 9, 0, 58)
    assert r.src_id == 2 and r.src_labels == {"reserved": "world"}
    assert (r.verdict, r.rule, r.rule_id, r.reason) == ("audit", "default", 0, "audit")
    assert (r.ifindex, r.length) == (11, 1280)


def test_from_event_names_rule_verdict_and_reason():
    r = FlowRecord.from_event(event(abi.Hook.TC_INGRESS), NAMES, 0)
    assert (r.verdict, r.rule, r.rule_id, r.reason) == ("deny", "deny-db", 7, "policy_deny")
    allow = FlowRecord.from_event(event(abi.Hook.TC_INGRESS, verdict=ALLOW, reason=abi.Reason.PASS_POLICY,
                                        rule_id=8), NAMES, 0)
    assert (allow.verdict, allow.rule, allow.reason) == ("allow", "rule-8", "policy")
    revoked = FlowRecord.from_event(event(abi.Hook.TC_INGRESS, reason=abi.Reason.DROP_REVOKED), NAMES, 0)
    assert revoked.reason == "revoked"
    unknown = FlowRecord.from_event(event(abi.Hook.TC_INGRESS, reason=99), NAMES, 0)
    assert unknown.reason == "reason-99"


def test_from_event_non_ip_has_no_addresses():
    r = FlowRecord.from_event(event(abi.Hook.XDP_INGRESS, src=None, dst=None, proto=0,
                                    reason=abi.Reason.DROP_NON_IP), NAMES, 0)
    assert r.src is None and r.dst is None and r.reason == "non_ip"
    assert r.to_pb().source == ""


# --- the hub -------------------------------------------------------------------------

def seq(n, start=0, **kw):
    """Records numbered by time_ns (start .. start+n-1)."""
    return [rec(time_ns=i, **kw) for i in range(start, start + n)]


def everything(_r):
    return True


def test_history_keeps_the_last_n():
    hub = FlowHub(history=5)
    records = seq(12)
    hub.publish_many(records)
    assert len(hub) == 5 and hub.published == 12
    assert list(hub.stream(everything)) == records[-5:]


def test_stream_number_gives_the_last_matching():
    hub = FlowHub()
    records = [rec(time_ns=i, verdict="deny" if i % 2 else "allow") for i in range(20)]
    hub.publish_many(records)
    denies = compile_filters(["verdict=deny"])
    got = list(hub.stream(denies, number=3))
    assert [r.time_ns for r in got] == [15, 17, 19]
    assert len(list(hub.stream(denies))) == 10
    assert len(list(hub.stream(denies, number=100))) == 10


def test_stream_since_bound():
    hub = FlowHub()
    hub.publish_many(seq(10))
    assert [r.time_ns for r in hub.stream(everything, since_ns=7)] == [7, 8, 9]
    assert [r.time_ns for r in hub.stream(everything, since_ns=4, number=2)] == [8, 9]
    assert list(hub.stream(everything, since_ns=100)) == []


def test_stream_without_follow_ends_and_registers_nobody():
    hub = FlowHub()
    hub.publish_many(seq(3))
    gen = hub.stream(everything)
    assert next(gen).time_ns == 0
    assert hub.clients == 0
    assert len(list(gen)) == 2


def _wait_for(cond, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_follow_delivers_flows_published_after_subscribing():
    hub = FlowHub()
    records = seq(20)

    def publisher():
        if _wait_for(lambda: hub.clients == 1):
            for r in records:
                hub.publish(r)

    t = threading.Thread(target=publisher, daemon=True)
    deadline = time.monotonic() + 3
    gen = hub.stream(everything, follow=True, wait_s=0.05, active=lambda: time.monotonic() < deadline)
    t.start()
    got = []
    for item in gen:
        got.append(item)
        if len(got) == len(records):
            break
    gen.close()
    t.join(timeout=2)
    assert got == records
    assert hub.clients == 0


def test_follow_has_no_gap_or_duplicate_between_history_and_live():
    # The client subscribes while the publisher is running: whatever the
    # split between the history it reads and the live flows, it gets each
    # flow once, in order.
    hub = FlowHub(history=10_000)
    records = seq(3000)
    started = threading.Event()
    publisher_thread = []
    live = []

    def publisher():
        publisher_thread.append(threading.current_thread())
        for r in records[:1000]:
            hub.publish(r)
            if r.time_ns == 200:
                started.set()
            if r.time_ns % 10 == 0:
                time.sleep(0)          # let the subscriber in mid-burst
        _wait_for(lambda: hub.clients == 1)
        hub.publish_many(records[1000:])

    def match(r):
        if threading.current_thread() in publisher_thread:
            live.append(r)             # delivered to the subscriber's queue
        return True

    t = threading.Thread(target=publisher, daemon=True)
    t.start()
    assert started.wait(2)
    deadline = time.monotonic() + 3
    gen = hub.stream(match, follow=True, wait_s=0.05, active=lambda: time.monotonic() < deadline)
    got = []
    for item in gen:
        assert not isinstance(item, int), f"lost {item}"
        got.append(item)
        if len(got) == len(records):
            break
    gen.close()
    t.join(timeout=2)
    assert [r.time_ns for r in got] == [r.time_ns for r in records]
    assert 0 < len(live) < len(records)    # both history and live flows were read
    assert live == records[-len(live):]


def test_follow_applies_the_filter_and_since_to_live_flows():
    hub = FlowHub()
    hub.publish_many(seq(5))
    gen = hub.stream(compile_filters(["verdict=audit"]), since_ns=100, follow=True, wait_s=0.05)
    hub.publish(rec(time_ns=50, verdict="audit"))     # too old
    hub.publish(rec(time_ns=150, verdict="deny"))     # filtered out
    hub.publish(rec(time_ns=160, verdict="audit"))
    # the generator has not started: it subscribes at the first next(),
    # after the three above are in the history
    assert [r.time_ns for r in [next(gen)]] == [160]
    hub.publish(rec(time_ns=90, verdict="audit"))
    hub.publish(rec(time_ns=170, verdict="deny"))
    hub.publish(rec(time_ns=180, verdict="audit"))
    assert next(gen).time_ns == 180
    gen.close()


def test_slow_client_loses_the_oldest_and_is_told_how_many():
    hub = FlowHub(client_queue=4096)
    hub.publish(rec(time_ns=0))
    slow = hub.stream(everything, follow=True, wait_s=0.05, client_queue=10)
    fast = hub.stream(everything, follow=True, wait_s=0.05, client_queue=10)
    assert next(slow).time_ns == 0     # both subscribed now
    assert next(fast).time_ns == 0
    assert hub.clients == 2

    live = seq(25, start=1)
    for r in live:
        hub.publish(r)
        assert next(fast) is r         # the fast client reads each as it comes

    lost = next(slow)
    assert type(lost) is int and lost == 15
    assert [next(slow) for _ in range(10)] == live[-10:]
    assert hub.client_lost == 15
    slow.close()
    fast.close()
    assert hub.clients == 0


def test_lost_count_is_reported_once():
    hub = FlowHub(client_queue=3)
    hub.publish(rec(time_ns=0))
    gen = hub.stream(everything, follow=True, wait_s=0.05, idle=True)
    next(gen)
    hub.publish_many(seq(5, start=1))
    assert next(gen) == 2
    assert [next(gen).time_ns for _ in range(3)] == [3, 4, 5]
    assert next(gen) is None           # nothing more lost, nothing new
    hub.publish(rec(time_ns=6))
    assert next(gen).time_ns == 6
    gen.close()
    assert hub.client_lost == 2


def test_closing_the_generator_unsubscribes():
    hub = FlowHub()
    hub.publish(rec(time_ns=0))
    gen = hub.stream(everything, follow=True, wait_s=0.05)
    assert hub.clients == 0            # not started yet
    next(gen)
    assert hub.clients == 1
    gen.close()
    assert hub.clients == 0
    hub.publish(rec(time_ns=1))        # publishing to nobody is fine
    assert hub.client_lost == 0


def test_inactive_client_is_unsubscribed():
    hub = FlowHub()
    hub.publish(rec(time_ns=0))
    active = threading.Event()
    active.set()
    gen = hub.stream(everything, follow=True, wait_s=0.05, active=active.is_set)
    next(gen)
    assert hub.clients == 1
    active.clear()
    t0 = time.monotonic()
    with pytest.raises(StopIteration):
        next(gen)
    assert time.monotonic() - t0 < 0.5
    assert hub.clients == 0


def test_inactive_client_blocked_waiting_is_unsubscribed():
    hub = FlowHub()
    active = threading.Event()
    active.set()
    done = threading.Event()
    got = []

    def consume():
        got.extend(hub.stream(everything, follow=True, wait_s=0.05, active=active.is_set))
        done.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert _wait_for(lambda: hub.clients == 1)
    active.clear()
    assert done.wait(1)
    t.join(timeout=1)
    assert got == [] and hub.clients == 0


def test_idle_yields_none_when_nothing_comes():
    hub = FlowHub()
    gen = hub.stream(everything, follow=True, wait_s=0.05, idle=True)
    t0 = time.monotonic()
    assert next(gen) is None
    assert next(gen) is None
    elapsed = time.monotonic() - t0
    assert 0.05 <= elapsed < 0.5
    hub.publish(rec(time_ns=1))
    assert next(gen).time_ns == 1
    gen.close()
    assert hub.clients == 0


def test_without_idle_nothing_is_yielded_while_waiting():
    hub = FlowHub()
    deadline = time.monotonic() + 0.2
    got = list(hub.stream(everything, follow=True, wait_s=0.05, active=lambda: time.monotonic() < deadline))
    assert got == []


# --- stream_flows --------------------------------------------------------------------

class FakeContext:
    def __init__(self, active=True):
        self.active = active

    def is_active(self):
        return self.active


def test_stream_flows_returns_responses():
    hub = FlowHub()
    hub.publish_many([rec(time_ns=i, verdict="deny" if i % 2 else "audit") for i in range(10)])
    req = flow_pb2.GetFlowsRequest(filter=["verdict=deny"], number=2)
    out = list(flows.stream_flows(hub, req, FakeContext()))
    assert all(isinstance(r, flow_pb2.GetFlowsResponse) for r in out)
    assert [r.WhichOneof("item") for r in out] == ["flow", "flow"]
    assert [r.flow.time_unix_ns for r in out] == [7, 9]
    assert out[0].flow == rec(time_ns=7, verdict="deny").to_pb()


def test_stream_flows_since():
    hub = FlowHub()
    now = time.time_ns()
    hub.publish(rec(time_ns=now - 3600 * SEC))
    hub.publish(rec(time_ns=now))
    out = list(flows.stream_flows(hub, flow_pb2.GetFlowsRequest(since="5m"), FakeContext()))
    assert [r.flow.time_unix_ns for r in out] == [now]


def test_stream_flows_follow_reports_lost_and_stops_when_inactive():
    hub = FlowHub(client_queue=2)
    hub.publish(rec(time_ns=0))
    ctx = FakeContext()
    gen = flows.stream_flows(hub, flow_pb2.GetFlowsRequest(follow=True), ctx)
    assert next(gen).flow.time_unix_ns == 0
    hub.publish_many(seq(5, start=1))
    first = next(gen)
    assert first.WhichOneof("item") == "lost" and first.lost == 3
    assert [next(gen).flow.time_unix_ns for _ in range(2)] == [4, 5]
    ctx.active = False
    with pytest.raises(StopIteration):
        next(gen)
    assert hub.clients == 0


@pytest.mark.parametrize("req", [
    flow_pb2.GetFlowsRequest(filter=["colour=red"]),
    flow_pb2.GetFlowsRequest(filter=["port=70000"]),
    flow_pb2.GetFlowsRequest(since="yesterday"),
], ids=["field", "value", "since"])
def test_stream_flows_bad_request_raises_before_iteration(req):
    hub = FlowHub()
    with pytest.raises(FilterError):
        flows.stream_flows(hub, req, FakeContext())
    assert hub.clients == 0
