"""A full conntrack table, the TCP opening timeout and the agent's collector.

The table is a plain hash (bpf/lib/maps.h): when it is full, an allowed new
flow passes its packet without an entry and DP_STAT_CT_INSERT_FAILED
(dataplane_conntrack_insert_failed_total) counts it; its replies are judged
as new flows of their own; flows admitted earlier are untouched. Expired
entries stay until loader.ctgc deletes them, after which new flows are
admitted again. Documented in docs/datapath.md ("A full table").
"""

from __future__ import annotations

import ipaddress

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dataplane.flows import Names
from dataplane.metrics import DatapathCollector
from loader import abi, ctgc, tables
from tests.bpf.packets import LOCAL, LOCAL_ID, REMOTE, REMOTE_ID, TCP_P, endpoint_identities, expect, tcp_frame
from tests.reliability import record

R = abi.Reason
IN = abi.Direction.INGRESS
RPORT = 40000
FILLER_NET = ipaddress.ip_network("10.200.0.0/16")


@pytest.fixture
def fdp(dp):
    tables.sync_identities(dp, endpoint_identities())
    tables.sync_policy(dp, [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, TCP_P, 80, 80, abi.Verdict.ALLOW, 5)])
    yield dp
    dp.ct.clear()


def syn(family, sport=RPORT, flags="S"):
    return tcp_frame(family, REMOTE[family], LOCAL[family], sport, 80, flags)


def syn_ack(family, sport=RPORT, flags="SA"):
    return tcp_frame(family, LOCAL[family], REMOTE[family], 80, sport, flags)


def fill(dp, count: int, last_seen_ns: int) -> int:
    """Writes `count` UDP entries between filler addresses (never matching a test flow)."""
    base = int(FILLER_NET.network_address)
    pairs = []
    for i in range(count):
        key = abi.CtKey()
        key.addr_a[0:4] = list((base + (i >> 16)).to_bytes(4, "big"))
        key.addr_b[0:4] = list((base + 0x8000 + (i & 0xFFFF)).to_bytes(4, "big"))
        key.port_a, key.port_b, key.proto, key.family = 1000, 2000, 17, 4
        val = abi.CtVal(last_seen_ns=last_seen_ns, verdict=abi.Verdict.ALLOW, rule_id=5, flags=abi.CT_INIT_IS_A)
        pairs.append((key, val))
    return dp.ct.update_batch(pairs)


def scrape(dp) -> str:
    reg = CollectorRegistry()
    reg.register(DatapathCollector(dp, lambda: Names(host="t"), lambda: {"mode": "standalone"}, "t"))
    return generate_latest(reg).decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the scrape")


@pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))
def test_full_table_refuses_new_flows_and_keeps_established(fdp, family):
    dp = fdp
    capacity = dp.ct.max_entries
    expect(dp, "xdp_ingress", syn(family), R.PASS_POLICY)                  # flow E, admitted
    expect(dp, "tc_egress", syn_ack(family), R.PASS_REPLY)
    now = ctgc.now_ns()
    filled = fill(dp, capacity - 1, now)
    assert dp.ct.count() == capacity == filled + 1
    before = dp.stat_counters()

    # A new flow allowed by policy: its SYN passes without an entry, and is counted.
    new_port = RPORT + 1
    expect(dp, "xdp_ingress", syn(family, new_port), R.PASS_POLICY)
    stats = dp.stat_counters()
    assert stats[abi.Stat.CT_INSERT_FAILED] - before[abi.Stat.CT_INSERT_FAILED] == 1
    assert stats[abi.Stat.CT_CREATED] == before[abi.Stat.CT_CREATED]
    assert dp.ct.count() == capacity
    # Its reply has no entry to match: judged as a new egress flow, which policy does not allow.
    expect(dp, "tc_egress", syn_ack(family, new_port), R.DROP_POLICY_DEFAULT)
    # The established flow is untouched, both ways, at every hook.
    for _ in range(3):
        expect(dp, "xdp_ingress", syn(family, flags="A"), R.PASS_ESTABLISHED)
        expect(dp, "tc_ingress", syn(family, flags="PA"), R.PASS_ESTABLISHED)
        expect(dp, "tc_egress", syn_ack(family, flags="A"), R.PASS_REPLY)
    # The metrics say so.
    text = scrape(dp)
    assert metric(text, "dataplane_conntrack_insert_failed_total") == stats[abi.Stat.CT_INSERT_FAILED]
    assert metric(text, "dataplane_conntrack_entries") == capacity

    # Once the fillers expire (UDP: 60 s + margin), the collector deletes them and
    # only them: the answered TCP flow lives 6 h.
    deleted = ctgc.collect(dp, now=now + 70 * ctgc.NS)
    assert deleted == filled
    assert dp.ct.count() == 1
    expect(dp, "xdp_ingress", syn(family, flags="A"), R.PASS_ESTABLISHED)
    # New flows are admitted again, replies pass.
    expect(dp, "xdp_ingress", syn(family, new_port), R.PASS_POLICY)
    expect(dp, "tc_egress", syn_ack(family, new_port), R.PASS_REPLY)
    assert dp.stat_counters()[abi.Stat.CT_CREATED] == before[abi.Stat.CT_CREATED] + 1
    record(f"conntrack_full_ipv{family}", {"capacity": capacity, "filled": filled + 1,
                                            "insert_failed_counted": 1, "established_packets_passed": 9,
                                            "collected": deleted})


def test_unanswered_tcp_flow_expires_after_the_opening_timeout(fdp):
    dp = fdp
    t = ctgc.Timeouts.of(dp.options)
    expect(dp, "xdp_ingress", syn(4), R.PASS_POLICY)
    key, val = next(iter(dp.ct.items()))
    assert not val.flags & abi.CT_SEEN_REPLY
    # Nothing answered within the opening timeout: the entry no longer vouches.
    val.last_seen_ns = ctgc.now_ns() - (t.opening + 2) * ctgc.NS
    dp.ct.update(key, val)
    before = dp.stat_counters()[abi.Stat.CT_EXPIRED]
    expect(dp, "xdp_ingress", syn(4, flags="A"), R.PASS_POLICY)      # judged as new again
    assert dp.stat_counters()[abi.Stat.CT_EXPIRED] == before + 1

    # Answered: the same age is well inside the TCP timeout.
    expect(dp, "tc_egress", syn_ack(4), R.PASS_REPLY)
    key, val = next(iter(dp.ct.items()))
    assert val.flags & abi.CT_SEEN_REPLY
    val.last_seen_ns = ctgc.now_ns() - (t.opening + 2) * ctgc.NS
    dp.ct.update(key, val)
    expect(dp, "xdp_ingress", syn(4, flags="A"), R.PASS_ESTABLISHED)
    # The collector agrees with the datapath: an answered flow is kept ...
    assert ctgc.collect(dp, margin_s=0) == 0
    # ... and an unanswered one past the opening timeout is deleted.
    val.flags &= ~abi.CT_SEEN_REPLY
    val.last_seen_ns = ctgc.now_ns() - (t.opening + 2) * ctgc.NS
    dp.ct.update(key, val)
    assert ctgc.collect(dp, margin_s=0) == 1
    assert dp.ct.count() == 0


def test_collector_keeps_entries_a_packet_revived(fdp):
    """An entry found expired in the walk but refreshed before its delete stays."""
    dp = fdp
    expect(dp, "xdp_ingress", syn(4), R.PASS_POLICY)
    key, val = next(iter(dp.ct.items()))
    future = ctgc.now_ns() + (ctgc.Timeouts().opening + 10) * ctgc.NS
    real_items = dp.ct.items

    def items_then_revive(*a, **kw):
        out = list(real_items(*a, **kw))
        fresh = dp.ct.lookup(key)
        fresh.last_seen_ns = future
        dp.ct.update(key, fresh)
        return iter(out)

    dp.ct.items = items_then_revive
    try:
        assert ctgc.collect(dp, now=future, margin_s=0) == 0
    finally:
        del dp.ct.items
    assert dp.ct.count() == 1
