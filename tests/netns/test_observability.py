"""Observability end to end: a standalone agent enforcing for a server
namespace, real datagrams from a client namespace, and what the agent tells:
per-rule counters in the Prometheus scrape (exactly), the flow stream and
its filters (`dataplane observe`), audit mode in both."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from dataplane.lab import wait_for
from tests.conftest import require_root
from tests.netns.obs_helpers import CLIENT, CLIENT_PORT, SERVER, ObsAgent, frame_bytes, send_udp, value, wait_value


@pytest.fixture(scope="module")
def obs(tmp_path_factory):
    require_root()
    agent = ObsAgent(tmp_path_factory.mktemp("obs"), "obs")
    try:
        agent.wait_ready()
        agent.server = agent.sink(agent.server_ns, [5000, 6000, 7000, 5500, 6100, 6150, 8000, 80])
        agent.client = agent.sink(agent.client_ns, [9000])
        yield agent
    finally:
        agent.close()
    assert "Traceback" not in agent.text(), agent.text()


def received(server, port: int) -> int:
    return sum(1 for line in server.lines() if line.startswith(f"recv udp {port} "))


def test_per_rule_counters_in_the_scrape_are_exact(obs):
    """Known numbers of datagrams per rule: the scrape shows exactly them,
    packets and bytes, by rule, action and direction."""
    sends = {  # rule -> (ns, src, dst, port, count, payload)
        "udp-5000": (obs.client_ns, CLIENT, SERVER, 5000, 7, 100),
        "deny-6000": (obs.client_ns, CLIENT, SERVER, 6000, 3, 60),
        "app-to-cli-9000": (obs.server_ns, SERVER, CLIENT, 9000, 5, 200),
    }
    for ns, src, dst, port, count, size in sends.values():
        send_udp(obs.lab, ns, src, dst, port, count, size, sport=CLIENT_PORT if ns == obs.client_ns else 41000)
    want = {  # (rule, action, direction) -> (packets, bytes)
        ("udp-5000", "allow", "ingress"): (7, 7 * frame_bytes(100)),
        ("deny-6000", "deny", "ingress"): (3, 3 * frame_bytes(60)),
        ("app-to-cli-9000", "allow", "egress"): (5, 5 * frame_bytes(200)),
    }
    for (rule, action, direction), (packets, _) in want.items():
        wait_value(obs, "dataplane_rule_packets_total", packets, rule=rule, action=action, direction=direction)
    time.sleep(0.5)   # anything extra would have arrived by now
    samples = obs.scrape()
    for (rule, action, direction), (packets, octets) in want.items():
        assert value(samples, "dataplane_rule_packets_total", rule=rule, action=action, direction=direction) \
            == packets, (rule, direction)
        assert value(samples, "dataplane_rule_bytes_total", rule=rule, action=action, direction=direction) \
            == octets, (rule, direction)
        other = "egress" if direction == "ingress" else "ingress"
        assert value(samples, "dataplane_rule_packets_total", rule=rule, action=action, direction=other) == 0
    # What the counters say happened did happen.
    assert received(obs.server, 5000) == 7 and received(obs.server, 6000) == 0
    assert wait_for(lambda: received(obs.client, 9000) == 5, timeout=10)
    assert value(samples, "dataplane_dropped_packets_total", reason="policy_deny") >= 3
    # Rules without traffic are there, at zero, with their actions.
    assert value(samples, "dataplane_rule_packets_total", rule="allow-tcp-80", action="allow",
                 direction="ingress") == 0
    assert value(samples, "dataplane_rule_packets_total", rule="default", action="deny", direction="ingress") >= 0
    # No label carries an address or a port (values may contain any digits: only labels are looked at).
    labels = " ".join(line[line.index("{"):line.rindex("}") + 1] for line in obs.scrape_text().splitlines()
                      if not line.startswith("#") and "{" in line)
    assert labels, "no labelled sample in the scrape"
    for needle in (CLIENT, SERVER, str(CLIENT_PORT)):
        assert needle not in labels, f"{needle} appears in a label of the scrape"


def test_scrape_has_the_documented_families(obs):
    samples = obs.scrape()
    names = {n for n, _ in samples}
    for want in ("dataplane_map_entries", "dataplane_map_capacity", "dataplane_conntrack_entries",
                 "dataplane_events_lost_total", "dataplane_policy_revision", "dataplane_agent_info",
                 "dataplane_passed_packets_total", "dataplane_flows_received_total", "dataplane_flow_clients"):
        assert want in names, want
    assert value(samples, "dataplane_map_capacity", map="conntrack") == 262144
    assert value(samples, "dataplane_map_entries", map="policy") > 0
    assert value(samples, "dataplane_policy_revision") >= 1
    info = [dict(l) for n, l in samples if n == "dataplane_agent_info"]
    assert info and info[0]["host"] == "obs-host" and info[0]["mode"] == "standalone"


def test_audit_rule_passes_and_reports_would_deny(obs):
    """An audit rule: the datagrams arrive; the scrape counts them under the
    audit rule (would-deny) and the stream shows the flow as AUDIT."""
    send_udp(obs.lab, obs.client_ns, CLIENT, SERVER, 7000, 4, 80)
    assert wait_for(lambda: received(obs.server, 7000) == 4, timeout=10), obs.server.lines()[-5:]
    got = wait_value(obs, "dataplane_rule_packets_total", 4, rule="audit-7000", action="audit", direction="ingress")
    assert got == 4
    samples = obs.scrape()
    assert value(samples, "dataplane_rule_bytes_total", rule="audit-7000", action="audit",
                 direction="ingress") == 4 * frame_bytes(80)
    assert value(samples, "dataplane_passed_packets_total", reason="audit") >= 1
    assert wait_for(lambda: obs.flows("--rule", "audit-7000"), timeout=10)
    flows = obs.flows("--rule", "audit-7000")
    assert len(flows) == 1, flows          # one flow: judged once, then tracked
    f = flows[0]
    assert f["verdict"] == "audit" and f["reason"] == "audit" and f["destination_port"] == 7000
    assert f["source"] == CLIENT and f["destination"] == SERVER and f["direction"] == "ingress"
    assert f["source_identity"]["labels"]["app"] == "cli" and f["destination_identity"]["labels"]["app"] == "app"
    assert obs.flows("--verdict", "audit", "--to-port", "7000") == flows


def test_flow_stream_filters(obs):
    send_udp(obs.lab, obs.client_ns, CLIENT, SERVER, 6100, 3, 10, sport=42001)
    send_udp(obs.lab, obs.client_ns, CLIENT, SERVER, 6150, 2, 10, sport=42002)
    send_udp(obs.lab, obs.client_ns, CLIENT, SERVER, 8000, 2, 10, sport=42003)   # no rule: default deny
    assert wait_for(lambda: len(obs.flows("--from-port", "42001,42002,42003")) == 7,
                    timeout=10), obs.flows("--from-port", "42001,42002,42003")

    by_rule = obs.flows("--rule", "deny-61xx")
    assert len(by_rule) == 5 and {f["destination_port"] for f in by_rule} == {6100, 6150}
    assert all(f["verdict"] == "deny" and f["reason"] == "policy_deny" for f in by_rule)
    default = obs.flows("--rule", "default", "--from-port", "42003")
    assert len(default) == 2 and all(f["reason"] == "policy_default" for f in default)
    assert len(obs.flows("--to-port", "6150")) == 2
    assert len(obs.flows("--port", "6150,8000", "--from-port", "42002,42003")) == 4
    assert len(obs.flows("--filter", "reason=policy_default", "--from-port", "42003")) == 2
    assert len(obs.flows("--verdict", "allow,audit", "--from-port", "42001")) == 0
    assert len(obs.flows("--from-ip", f"{CLIENT}", "--from-port", "42001")) == 3
    assert len(obs.flows("--to-ip", "10.207.0.0/24", "--from-port", "42001")) == 3
    assert len(obs.flows("--to-ip", "10.99.0.0/16")) == 0
    assert len(obs.flows("--ip", "fd00::/8")) == 0
    assert len(obs.flows("--from-label", "app=cli", "--to-label", "tier=web", "--from-port", "42002")) == 2
    assert len(obs.flows("--label", "zone", "--from-port", "42002")) == 2        # key only
    assert len(obs.flows("--from-label", "app=app", "--from-port", "42002")) == 0  # wrong side
    assert len(obs.flows("--protocol", "tcp", "--from-port", "42001")) == 0
    assert len(obs.flows("--direction", "ingress", "--from-port", "42001")) == 3
    assert len(obs.flows("--host", "obs-host", "--from-port", "42001")) == 3
    assert len(obs.flows("--host", "elsewhere")) == 0
    # --last N: the newest N; --since bounds by time.
    last = obs.flows("--last", "2", "--from-port", "42001,42002,42003")
    assert [f["source_port"] for f in last] == [42003, 42003]
    assert len(obs.flows("--since", "10m", "--from-port", "42001")) == 3
    future = "2999-01-01T00:00:00Z"
    assert obs.flows("--since", future) == []

    # The table form names both ends.
    table = obs.observe("--rule", "deny-61xx", "--last", "1")
    assert table.returncode == 0 and "DENY" in table.stdout and "deny-61xx" in table.stdout
    assert f"{CLIENT}:42002" in table.stdout, table.stdout

    # Unknown fields and bad values: a clear one-line error, non-zero exit.
    for args, needle in ((["--filter", "colour=red"], "unknown filter field 'colour'"),
                         (["--verdict", "maybe"], "verdict='maybe'"),
                         (["--to-port", "70000"], "destination-port='70000'"),
                         (["--since", "yesterday"], "since='yesterday'")):
        out = obs.observe(*args)
        assert out.returncode != 0 and needle in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_follow_streams_new_flows(obs):
    follower = subprocess.Popen([*obs.observe_cmd(), "-f", "-o", "json", "--to-port", "6120"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: value(obs.scrape(), "dataplane_flow_clients") >= 1, timeout=10, interval=0.2)
        send_udp(obs.lab, obs.client_ns, CLIENT, SERVER, 6120, 3, 10, sport=42010)
        lines = [follower.stdout.readline() for _ in range(3)]
        flows = [json.loads(line) for line in lines]
        assert [f["destination_port"] for f in flows] == [6120] * 3 and all(f["verdict"] == "deny" for f in flows)
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait()
    # The server forgets a client that went away.
    assert wait_for(lambda: value(obs.scrape(), "dataplane_flow_clients") == 0, timeout=10, interval=0.2)


def _documented(section: str) -> set[str]:
    """Metric names in the tables of one section of docs/metrics.md."""
    from tests.netns.obs_helpers import ROOT

    text = (ROOT / "docs" / "metrics.md").read_text()
    part = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    import re

    return set(re.findall(r"^\| `(dataplane_[a-z_]+)` \|", part, re.M))


def test_scrape_and_docs_name_the_same_metrics(obs):
    """Every family the agent serves is documented, and every documented
    agent family is served (fleet-only ones aside)."""
    scraped = set()
    for name, _ in obs.scrape():
        if name.startswith("dataplane_"):
            scraped.add(name.removesuffix("_created"))
    fleet_only = {"dataplane_agent_controller_connected", "dataplane_flows_upload_lost_total"}
    assert scraped == _documented("Agent metrics") - fleet_only


def _total(samples: dict, name: str, **labels) -> float:
    """Sum over the series of name whose labels include these."""
    return sum(v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items())


def test_policy_in_audit_mode_passes_what_it_would_deny(obs):
    """`mode: audit` for the whole policy: a deny rule and the default both
    pass their traffic, which is counted under them with action audit and
    streamed as AUDIT. Back to enforce, they drop again. (Runs last: it
    changes the policy of the module's agent, and puts it back.)"""
    from tests.netns.obs_helpers import POLICY

    applies = obs.text().count("INFO: applied:")
    policy = obs.tmp / "policy.yaml"
    before = obs.scrape()
    try:
        policy.write_text(POLICY.replace("kind: Policy\n", "kind: Policy\nmode: audit\n"))
        assert wait_for(lambda: obs.text().count("INFO: applied:") > applies, timeout=30), obs.text()[-2000:]
        assert value(obs.scrape(), "dataplane_policy_audit_mode") == 1
        got_6000, got_8000 = received(obs.server, 6000), sum(
            1 for line in obs.server.lines() if line.startswith("recv udp 8000 "))
        send_udp(obs.lab, obs.client_ns, CLIENT, SERVER, 6000, 3, 30, sport=42100)
        send_udp(obs.lab, obs.client_ns, CLIENT, SERVER, 8000, 2, 30, sport=42101)
        assert wait_for(lambda: received(obs.server, 6000) == got_6000 + 3, timeout=10)
        assert wait_for(lambda: sum(1 for line in obs.server.lines() if line.startswith("recv udp 8000 "))
                        == got_8000 + 2, timeout=10)
        wait_value(obs, "dataplane_rule_packets_total", 1, rule="deny-6000", action="audit", direction="ingress")
        time.sleep(0.5)
        after = obs.scrape()
        assert value(after, "dataplane_rule_packets_total", rule="deny-6000", action="audit", direction="ingress") \
            - _total(before, "dataplane_rule_packets_total", rule="deny-6000", direction="ingress") == 3
        assert value(after, "dataplane_rule_packets_total", rule="default", action="audit", direction="ingress") \
            - _total(before, "dataplane_rule_packets_total", rule="default", direction="ingress") == 2
        flows = obs.flows("--from-port", "42100,42101")
        assert [(f["rule"], f["verdict"], f["reason"]) for f in flows] == \
            [("deny-6000", "audit", "audit"), ("default", "audit", "audit")], flows
    finally:
        policy.write_text(POLICY)
        assert wait_for(lambda: obs.text().count("INFO: applied:") > applies + 1, timeout=30), obs.text()[-2000:]
    assert value(obs.scrape(), "dataplane_policy_audit_mode") == 0
    send_udp(obs.lab, obs.client_ns, CLIENT, SERVER, 6000, 1, 30, sport=42102)
    assert wait_for(lambda: obs.flows("--from-port", "42102"), timeout=10)
    assert obs.flows("--from-port", "42102")[0]["verdict"] == "deny"
