"""Traffic through a hundred policy swaps.

Two compiled states, P1 with inventory I1 and P2 with inventory I2 (tests/
netns/swap_helpers.py describes them), are applied alternately with
loader.tables.apply_state while a client namespace sends steady sequenced
UDP on four flows and one long-lived TCP connection to a server namespace
whose veth has the datapath attached (XDP ingress, TC egress):

  A  allowed by both states through different rules, while its address
     moves between identities: no datagram may be lost, the TCP connection
     must stay up and deliver everything, and the kernel must count no drop
     for it;
  B  denied by both: nothing may arrive, and every datagram must be counted
     as a drop;
  C  allowed by P1 only, D by P2 only: each must pass in some phases and be
     dropped in others, and never pass when both its sending and its arrival
     fall inside a phase whose state denies it.
"""

from __future__ import annotations

import collections
import datetime as dt
import ipaddress
import json
import subprocess
import time

from dataplane.compiler import Compiler
from dataplane.explain import Explainer
from dataplane.identity import Allocator
from dataplane.lab import Lab
from loader import abi, tables
from loader.instance import Datapath
from tests.conftest import require_root
from tests.netns.helpers import (START_TIMEOUT, Follower, assert_nothing_attached, instance_name, leftovers,
                                 reasons, unload_if_present)
from tests.netns.swap_helpers import (CLIENTS, RULES_A_TCP, RULES_A_UDP, SERVER, SERVER_HOST, TCP_PORT_A,
                                      UDP_FLOWS, UDP_PORTS, EventCollector, build_topology, load_sources,
                                      neighbours_settled, receiver_cmd, sender_cmd)

NOW = dt.datetime(2030, 6, 1, tzinfo=dt.timezone.utc)
SWAPS = 120                    # P2, P1, P2, ... after P1 is first applied
PAUSE = 0.03                   # between swaps: each phase lasts at least this long
RATE = 800                     # datagrams per second per flow
TCP_INTERVAL = 0.005           # one 10-byte record every 5 ms on the TCP connection
WARMUP = 1.0                   # traffic before the first swap
TAIL = 0.5                     # traffic after the last swap
SETTLE = 1.0                   # after the sender stops, before the receiver reports
SEND_MARGIN_NS = 5_000_000     # a datagram sent this long before a swap began counts for the phase
PROCESS_TIMEOUT = 60.0

# What each flow's first packet is, per state: (verdict, deciding rule).
EXPECTED = {
    ("A", 1): ("allow", "p1-alpha-udp"), ("A", 2): ("allow", "p2-alpha-udp-range"),
    ("B", 1): ("deny", "p1-bravo-deny"), ("B", 2): ("deny", "default"),
    ("C", 1): ("allow", "p1-charlie"), ("C", 2): ("deny", "default"),
    ("D", 1): ("deny", "p1-delta-deny"), ("D", 2): ("allow", "p2-delta-range"),
}
ALLOWED_IN = {"A": {1, 2}, "B": set(), "C": {1}, "D": {2}}


def _compile_both():
    ids, rules = Allocator(None), Allocator(None, first=1)
    compilers = {k: Compiler(*load_sources(k), ids, rules, NOW) for k in (1, 2)}
    states = {k: c.compile(SERVER_HOST) for k, c in compilers.items()}
    return compilers, states


def _judgement(compiler, flow: str, proto: int, port: int):
    exp = Explainer(compiler).explain(CLIENTS[flow], SERVER, proto, port)
    (j,) = [j for j in exp.judgements if j.host == SERVER_HOST and j.direction == "ingress"]
    return j.verdict, j.rule


def _percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _phases(swaps: list[dict], first_end: int) -> list[tuple[int, int, float]]:
    """(state, interior start, interior end) per phase: from the end of the
    apply that made the state live to the start of the next apply."""
    out, start, state = [], first_end, 1
    for s in swaps:
        out.append((state, start, s["start"]))
        state, start = s["state"], s["end"]
    out.append((state, start, float("inf")))
    return out


def _phase_of(phases, t: int) -> int | None:
    lo, hi = 0, len(phases) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        _, start, end = phases[mid]
        if t < start:
            hi = mid - 1
        elif t > end:
            lo = mid + 1
        else:
            return mid
    return None


def test_traffic_through_policy_swaps(tmp_path, measurement):
    require_root()
    compilers, states = _compile_both()
    s1, s2 = states[1], states[2]
    for k, st in states.items():
        assert not st.warnings, f"state {k}: {st.warnings}"
    a_net = ipaddress.ip_network(f"{CLIENTS['A']}/32")
    assert s1.identities[a_net] != s2.identities[a_net], "flow A's address must change identity between states"
    # The policies say what the flows are designed to be, per explain.
    for (flow, k), want in EXPECTED.items():
        assert _judgement(compilers[k], flow, 17, UDP_PORTS[flow]) == want, (flow, k)
    assert _judgement(compilers[1], "A", 6, TCP_PORT_A) == ("allow", "p1-alpha-tcp")
    assert _judgement(compilers[2], "A", 6, TCP_PORT_A) == ("allow", "p2-alpha-tcp-range")
    rule_id = {**s1.rule_ids, **s2.rule_ids}
    assert len(set(rule_id.values())) == len(rule_id), "rule numbers are shared and distinct"
    a_rules = {rule_id[n] for n in RULES_A_UDP + RULES_A_TCP}

    instance = instance_name("swaps")
    lab = Lab()
    dp = Datapath(instance)
    collector = None
    topo = None
    try:
        topo = build_topology(lab)
        client_ns, server_ns = topo["client_ns"], topo["server_ns"]
        assert neighbours_settled(client_ns, topo["client_if"], [SERVER])
        assert neighbours_settled(server_ns, topo["server_if"], CLIENTS.values())

        assert dp.load() == "loaded"
        att = dp.attach(topo["server_if"], netns=server_ns, ingress="xdp")
        assert att["ingress"] == "xdp", att
        first = tables.apply_state(dp, s1.identities, s1.entries, audit_default=s1.audit_default)
        first_end = time.monotonic_ns()

        recv_out, send_out = tmp_path / "received.json", tmp_path / "sent.json"
        receiver = Follower(lab.popen(server_ns, receiver_cmd(recv_out), stdin=subprocess.PIPE))
        assert receiver.wait_line(lambda l: l == "listening", START_TIMEOUT), receiver.describe()

        reasons_before = reasons(dp)
        rules_before = {r: dp.rule_counter(r)[0] for r in list(rule_id.values()) + [0]}
        lost_before = dp.stat_counters()[abi.Stat.EVENTS_LOST]
        collector = EventCollector(dp)

        sender = Follower(lab.popen(client_ns, sender_cmd(send_out, RATE, TCP_INTERVAL), stdin=subprocess.PIPE))
        assert sender.wait_line(lambda l: l == "started", START_TIMEOUT), sender.describe()
        time.sleep(WARMUP)

        swaps = []
        for i in range(SWAPS):
            k = 2 if i % 2 == 0 else 1
            st = states[k]
            t0 = time.monotonic_ns()
            result = tables.apply_state(dp, st.identities, st.entries, audit_default=st.audit_default)
            t1 = time.monotonic_ns()
            swaps.append({"state": k, "start": t0, "end": t1, "switch_s": result.seconds,
                          "generation": result.generation, "epoch": result.epoch})
            time.sleep(PAUSE)
        time.sleep(TAIL)

        for proc, out in ((sender, send_out), (receiver, recv_out)):
            if proc is receiver:
                time.sleep(SETTLE)
            proc.proc.stdin.write(b"stop\n")
            proc.proc.stdin.flush()
            assert proc.wait_line(lambda l: l == "done", PROCESS_TIMEOUT), proc.describe()
        events = collector.stop()
        collector = None
        reasons_delta = collections.Counter({r: n - reasons_before.get(r, 0) for r, n in reasons(dp).items()})
        rules_delta = {r: dp.rule_counter(r)[0] - n for r, n in rules_before.items()}
        lost = dp.stat_counters()[abi.Stat.EVENTS_LOST] - lost_before
        live_ids = tables.read_identities(dp)
        sent = json.loads(send_out.read_text())
        got = json.loads(recv_out.read_text())

        dp.detach(topo["server_if"], server_ns)
        assert_nothing_attached(server_ns, topo["server_if"])
    finally:
        if collector is not None:
            collector.close()
        if topo is not None:
            try:
                dp.detach(topo["server_if"], topo["server_ns"])
            except Exception:
                pass  # already detached, or the failure being reported is elsewhere
        try:
            unload_if_present(instance)
        finally:
            lab.close()
    assert not leftovers(instance)

    # --- the swaps were real ---------------------------------------------------------
    assert len(swaps) >= 100
    gens = [first.generation] + [s["generation"] for s in swaps]
    assert all(a != b for a, b in zip(gens, gens[1:])), f"generations did not alternate: {gens}"
    epochs = [first.epoch] + [s["epoch"] for s in swaps]
    assert epochs == list(range(first.epoch, first.epoch + len(epochs))), "each apply bumps the epoch once"
    assert live_ids[a_net] == states[swaps[-1]["state"]].identities[a_net]
    durations_ms = [(s["end"] - s["start"]) / 1e6 for s in swaps]
    switch_ms = [s["switch_s"] * 1e3 for s in swaps]

    flows = {name: f for (name, _, _), f in zip(UDP_FLOWS, sent["flows"])}
    received = {}
    for index, (name, client, _) in enumerate(UDP_FLOWS):
        f = flows[name]
        assert (f["src"], f["port"]) == (CLIENTS[client], UDP_PORTS[client])
        assert not f["errors"], f"flow {name}: the sender could not send: {f['errors'][:5]}"
        rows = got["udp"][str(UDP_PORTS[client])]
        assert all(r[0] == CLIENTS[client] for r in rows), f"flow {name}: datagrams from elsewhere"
        received[name] = [r for r in rows if r[1] == index]
    phases = _phases(swaps, first_end)
    swap_window = (swaps[0]["start"], swaps[-1]["end"])
    window_s = (swap_window[1] - swap_window[0]) / 1e9

    # --- A: every datagram, every TCP record, no drop --------------------------------
    a_flows = ("A-new", "A-est")
    a_sent = {n: len(flows[n]["sent"]) for n in a_flows}
    missing, dups = {}, {}
    for n in a_flows:
        seqs = collections.Counter(r[2] for r in received[n])
        missing[n] = sorted(set(range(a_sent[n])) - set(seqs))
        dups[n] = sorted(s for s, c in seqs.items() if c > 1)
    a_in_window = {n: sum(1 for t in flows[n]["sent"] if swap_window[0] <= t <= swap_window[1]) for n in a_flows}
    drops = [e for e in events if isinstance(e.reason, abi.Reason) and e.reason.is_drop]
    a_addr = ipaddress.ip_address(CLIENTS["A"])
    a_drops = [e for e in drops if a_addr in (e.src, e.dst) or e.rule_id in a_rules]
    tcp_s, tcp_r = sent["tcp"], got["tcp"]

    measurement(f"{len(swaps)} swaps P1<->P2 in {window_s:.2f} s; apply_state p50 {_percentile(durations_ms, .5):.2f} "
                f"p90 {_percentile(durations_ms, .9):.2f} p99 {_percentile(durations_ms, .99):.2f} "
                f"max {max(durations_ms):.2f} ms (to the switch: p50 {_percentile(switch_ms, .5):.2f}, "
                f"max {max(switch_ms):.2f} ms)")
    measurement("udp sent/received per flow: " + ", ".join(
        f"{n} {len(flows[n]['sent'])}/{len(received[n])}" for n, _, _ in UDP_FLOWS)
        + "; " + ", ".join(f"{n} sent during swaps {a_in_window[n]}, lost {len(missing[n])}, duplicated "
                           f"{len(dups[n])}" for n in a_flows))
    measurement(f"tcp A: {tcp_s['records']} records sent, {tcp_r['records']} received in order={tcp_r['in_order']}, "
                f"total_retrans {tcp_s['total_retrans']}; drop events {len(drops)}, events lost {lost}")

    assert lost == 0, f"{lost} events lost: the drop accounting below would be incomplete"
    for n in a_flows:
        assert a_in_window[n] >= RATE * window_s * 0.5, f"{n}: only {a_in_window[n]} sent in {window_s:.1f} s of swaps"
        assert not missing[n], f"{n}: lost {len(missing[n])} of {a_sent[n]} datagrams, first {missing[n][:20]}"
        assert not dups[n], f"{n}: duplicated datagrams {dups[n][:20]}"
    assert not a_drops, f"the kernel dropped {len(a_drops)} of flow A's packets: {a_drops[:10]}"
    assert sum(rules_delta[rule_id[n]] for n in RULES_A_UDP) == sum(a_sent.values()), \
        f"A's datagrams counted under its rules: { {n: rules_delta[rule_id[n]] for n in RULES_A_UDP} }, sent {a_sent}"
    for n in RULES_A_UDP + RULES_A_TCP:
        assert rules_delta[rule_id[n]] > 0, f"rule {n} never decided flow A: {rules_delta}"
    assert tcp_s["error"] is None and tcp_r["error"] is None, (tcp_s, tcp_r)
    assert tcp_r["accepted"] == 1 and tcp_s["closed_by_peer"] and tcp_r["closed"], (tcp_s, tcp_r)
    assert tcp_s["records"] >= window_s / TCP_INTERVAL * 0.3, tcp_s
    assert tcp_r["in_order"] and tcp_r["records"] == tcp_s["records"], (tcp_s, tcp_r)
    assert tcp_r["bytes"] == tcp_s["records"] * 10, (tcp_s, tcp_r)

    # --- B: nothing arrives, every datagram is a counted drop -------------------------
    b_sent = len(flows["B"]["sent"])
    b_addr = ipaddress.ip_address(CLIENTS["B"])
    b_drops = [e for e in drops if e.src == b_addr and e.dport == UDP_PORTS["B"]]
    assert not received["B"], f"flow B: {len(received['B'])} datagrams arrived"
    assert len(b_drops) == b_sent, f"flow B: {b_sent} sent, {len(b_drops)} counted as dropped"
    b_reasons = collections.Counter(e.reason for e in b_drops)
    assert b_reasons[abi.Reason.DROP_POLICY_DENY] > 0 and b_reasons[abi.Reason.DROP_POLICY_DEFAULT] > 0, b_reasons
    assert all(e.rule_id in (0, rule_id["p1-bravo-deny"]) for e in b_drops), b_reasons
    # Counters and events tell the same story: every counted drop was reported.
    drop_counted = sum(n for r, n in reasons_delta.items() if isinstance(r, abi.Reason) and r.is_drop)
    assert drop_counted == len(drops), f"drop reasons counted {drop_counted}, drop events {len(drops)}"
    assert reasons_delta[abi.Reason.PASS_REJUDGED] >= len(swaps), reasons_delta

    # --- C and D: passing and dropping phases, never passing when denied ------------------
    for name in "CD":
        allowed = ALLOWED_IN[name]
        violations = []
        for _, _, seq, sent_ns, recv_ns in received[name]:
            p = _phase_of(phases, sent_ns)
            if p is not None and recv_ns <= phases[p][2] and phases[p][0] not in allowed:
                violations.append((seq, phases[p][0], p))
        assert not violations, f"flow {name} passed inside phases that deny it: {violations[:10]}"
        got_seqs = {r[2] for r in received[name]}
        sent_by_phase = collections.defaultdict(list)
        for seq, t in enumerate(flows[name]["sent"]):
            p = _phase_of(phases, t)
            if p is not None and t <= phases[p][2] - SEND_MARGIN_NS:
                sent_by_phase[p].append(seq)
        passing = [p for p, seqs in sent_by_phase.items() if phases[p][0] in allowed and got_seqs & set(seqs)]
        dropping = [p for p, seqs in sent_by_phase.items() if phases[p][0] not in allowed and not got_seqs & set(seqs)]
        n_allowed = sum(1 for st, _, _ in phases if st in allowed)
        n_denied = len(phases) - n_allowed
        measurement(f"flow {name}: passed in {len(passing)} of {n_allowed} allowing phases, dropped throughout "
                    f"{len(dropping)} of {n_denied} denying phases")
        assert len(passing) >= n_allowed // 2, f"flow {name}: passed in only {len(passing)} of {n_allowed} phases"
        assert len(dropping) >= n_denied // 2, f"flow {name}: dropped in only {len(dropping)} of {n_denied} phases"
        addr = ipaddress.ip_address(CLIENTS[name])
        mine = collections.Counter(e.reason for e in drops if e.src == addr)
        assert sum(mine.values()) == len(flows[name]["sent"]) - len(received[name]), \
            f"flow {name}: {len(flows[name]['sent'])} sent, {len(received[name])} received, drops {mine}"
    assert rules_delta[rule_id["p1-charlie"]] > 0 and rules_delta[rule_id["p2-delta-range"]] > 0, rules_delta
    assert rules_delta[rule_id["p1-delta-deny"]] > 0, rules_delta
