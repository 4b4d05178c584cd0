"""A flood of denied packets that overruns the event ring: the datapath
keeps judging (nothing blocks, allowed traffic flows), every event is either
read by the agent or counted as lost, the agent's memory stays bounded, and
a flow client that stops reading neither stalls the others nor leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from dataplane.lab import wait_for
from tests.conftest import require_root
from tests.netns.obs_helpers import CLIENT, SERVER, ObsAgent, parse_scrape, send_udp, value
from tests.reliability import record

HISTORY = 8192          # flows the agent keeps (dataplane.telemetry default)


def _totals(agent: ObsAgent) -> dict:
    s = parse_scrape(agent.scrape_text())
    drops = sum(v for (n, _), v in s.items() if n == "dataplane_dropped_packets_total")
    return {"drops": drops, "received": value(s, "dataplane_flows_received_total"),
            "lost": value(s, "dataplane_events_lost_total"), "client_lost": value(s, "dataplane_flows_client_lost_total"),
            "clients": value(s, "dataplane_flow_clients")}


def _follower(agent: ObsAgent, *filters: str) -> subprocess.Popen:
    return subprocess.Popen([*agent.observe_cmd(), "-f", "-o", "json", *filters], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.timeout(600)
def test_flood_overruns_the_ring_counted_bounded_no_stall(tmp_path, measurement):
    require_root()
    agent = ObsAgent(tmp_path, "flood")
    fast = slow = None
    try:
        agent.wait_ready()
        server = agent.sink(agent.server_ns, [5000])
        fast = _follower(agent, "--to-port", "6190")         # follows one port only
        slow = _follower(agent)                               # follows everything ...
        assert wait_for(lambda: _totals(agent)["clients"] == 2, timeout=20, interval=0.2)
        os.killpg(slow.pid, signal.SIGSTOP)                   # ... and stops reading
        before = _totals(agent)
        rss_before = agent.rss_kb()

        # 1. The agent stops reading: the ring fills; the datapath goes on.
        agent.signal(signal.SIGSTOP)
        try:
            send_udp(agent.lab, agent.client_ns, CLIENT, SERVER, 8100, 30000, 16)
            send_udp(agent.lab, agent.client_ns, CLIENT, SERVER, 5000, 5, 16, sport=43000)
            assert wait_for(lambda: sum(1 for l in server.lines() if l.startswith("recv udp 5000 ")) == 5,
                            timeout=10), "allowed traffic did not pass while the event ring was full"
        finally:
            agent.signal(signal.SIGCONT)

        # Every event the datapath produced was read or counted lost.
        def balanced():
            t = _totals(agent)
            return t["drops"] - before["drops"] == (t["received"] - before["received"]) + (t["lost"] - before["lost"])
        assert wait_for(balanced, timeout=60, interval=0.5), (before, _totals(agent))
        mid = _totals(agent)
        assert mid["drops"] - before["drops"] >= 29000, (before, mid)   # veth may drop a few under the flood
        assert mid["lost"] - before["lost"] > 0, "the ring never overflowed"
        assert mid["received"] - before["received"] > 0

        # 2. A longer flood while the agent reads: history and queues stay bounded.
        send_udp(agent.lab, agent.client_ns, CLIENT, SERVER, 8101, 100000, 16, sport=43001)
        assert wait_for(balanced, timeout=120, interval=0.5), (before, _totals(agent))
        after = _totals(agent)
        kept = agent.flows()
        assert len(kept) == HISTORY, len(kept)
        assert after["client_lost"] > before["client_lost"], "the stopped client lost nothing?"
        rss_after = agent.rss_kb()
        measurement(f"flood: {int(after['drops'] - before['drops'])} denied packets, "
                    f"{int(after['received'] - before['received'])} events read, "
                    f"{int(after['lost'] - before['lost'])} lost in the kernel, "
                    f"{int(after['client_lost'] - before['client_lost'])} dropped for the stopped client; "
                    f"agent RSS {rss_before // 1024} -> {rss_after // 1024} MiB")
        assert rss_after - rss_before < 150 * 1024, (rss_before, rss_after)
        record("ring_overflow", {"denied_packets": int(after["drops"] - before["drops"]),
                                 "events_read": int(after["received"] - before["received"]),
                                 "events_lost_counted": int(after["lost"] - before["lost"]),
                                 "unaccounted_events": 0, "flows_dropped_for_stopped_client":
                                 int(after["client_lost"] - before["client_lost"]),
                                 "allowed_datagrams_during_full_ring": 5, "allowed_delivered": 5,
                                 "rss_mib_before": rss_before // 1024, "rss_mib_after": rss_after // 1024})

        # 3. The client that reads is not held up by the one that does not.
        send_udp(agent.lab, agent.client_ns, CLIENT, SERVER, 6190, 1, 16, sport=43002)
        line = fast.stdout.readline()
        flow = json.loads(line)
        assert flow["destination_port"] == 6190 and flow["verdict"] == "deny", flow

        # 4. Clients that go away are forgotten.
        _kill(slow)
        assert wait_for(lambda: _totals(agent)["clients"] == 1, timeout=30, interval=0.5), _totals(agent)
        _kill(fast)
        assert wait_for(lambda: _totals(agent)["clients"] == 0, timeout=30, interval=0.5), _totals(agent)
    finally:
        for p in (fast, slow):
            if p is not None:
                _kill(p)
        agent.close()
    assert "Traceback" not in agent.text()
