"""Enforcement outlives the process that set it up: an agent process loads,
attaches and configures the datapath, then dies by SIGKILL while traffic
flows. Allowed traffic keeps passing, denied traffic keeps being dropped,
and the next load adopts the pinned programs and maps as they are."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest

from dataplane.lab import Lab, wait_for
from loader import tables
from loader.abi import Reason
from loader.instance import Datapath
from tests.conftest import require_root
from tests.netns.helpers import (AGENT, ALLOW, CLIENT_ID, DENIED_WAIT, INGRESS, ROOT, SERVER_ID, START_TIMEOUT,
                                 TCP, Follower, cli, cli_json, ct_rows_for, endpoint, entry, instance_name,
                                 leftovers, make_topology, reasons, request, server_events, start_peer,
                                 start_server, unload_if_present)

PORT_ALLOWED, PORT_NO_ENTRY, PORT_STREAM = 8080, 8081, 8090
RULE_ALLOWED, RULE_STREAM = 10, 12
POLICY = [
    entry(SERVER_ID, CLIENT_ID, INGRESS, TCP, PORT_ALLOWED, ALLOW, RULE_ALLOWED),
    entry(SERVER_ID, CLIENT_ID, INGRESS, TCP, PORT_STREAM, ALLOW, RULE_STREAM),
]
AGENT_READY_TIMEOUT = 300.0   # compiling three programs; slow machines take a while


def counters_via_cli(instance: str) -> dict[int, int]:
    """Packets per reason code, read by a separate `dataplane` process."""
    return {r["code"]: r["packets"] for r in cli_json("bpf", "counters", instance=instance)["reasons"]}


@pytest.mark.parametrize("ingress", ["xdp", "tc"])
def test_enforcement_survives_agent_kill_and_is_adopted(ingress):
    require_root()
    instance = instance_name(f"restart_{ingress}")
    lab = Lab()
    agent = None
    try:
        t = make_topology(lab)
        server = start_server(lab, t.server_ns, [f"tcp:{PORT_ALLOWED}:echo", f"tcp:{PORT_NO_ENTRY}:echo",
                                                 f"tcp:{PORT_STREAM}:sink"])
        identities = {str(k): v for k, v in t.identities().items()}
        policy = [list(dataclasses.astuple(e)) for e in POLICY]
        agent = Follower(subprocess.Popen(
            [sys.executable, str(AGENT), "--instance", instance, "--interface", t.server_if, "--netns",
             t.server_ns, "--ingress", ingress, "--identities", json.dumps(identities),
             "--policy", json.dumps(policy)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
        line = agent.wait_line(lambda l: l.startswith("ready "), AGENT_READY_TIMEOUT)
        assert line, f"agent did not come up: {agent.describe()}"
        ready = json.loads(line[len("ready "):])
        assert ready["outcome"] == "loaded"

        status = cli_json("bpf", "status", instance=instance)
        prog_ids = {h: p["id"] for h, p in status["programs"].items()}
        assert prog_ids == ready["programs"]
        (att,) = status["attachments"]
        assert att["ingress"] == ingress and all(att["present"].values()), att

        # Traffic through the allowed flow.
        stream = start_peer(lab, t.client_ns, "tcp-stream", t.server_v4, PORT_STREAM, "--interval", "0.01")
        line = stream.wait_line(lambda l: l.startswith(("connected", "error")), START_TIMEOUT)
        assert line and line.startswith("connected"), stream.describe()
        client_end = endpoint(t.client_v4, int(line.split()[1]))
        server_end = endpoint(t.server_v4, PORT_STREAM)

        def arrivals() -> int:
            return sum(1 for f in server_events(server, "recv", "tcp", PORT_STREAM) if f[3] == client_end)

        assert wait_for(lambda: arrivals() >= 20, timeout=30), f"stream did not flow: {stream.describe()}"

        # SIGKILL while the stream runs: no cleanup code of the agent runs.
        os.killpg(agent.proc.pid, signal.SIGKILL)
        assert agent.proc.wait(timeout=30) == -signal.SIGKILL

        # Allowed traffic still passes: the running stream and a new connection.
        seen = arrivals()
        assert wait_for(lambda: arrivals() >= seen + 20, timeout=30), \
            f"stream stopped after the agent died: {stream.describe()}"
        res = request(lab, t.client_ns, "tcp-request", t.server_v4, PORT_ALLOWED, "after the kill")
        assert res == {"ok": True, "reply": "after the kill", "error": ""}

        # A denied port is still dropped.
        before = counters_via_cli(instance)
        mark = server.mark()
        res = request(lab, t.client_ns, "tcp-request", t.server_v4, PORT_NO_ENTRY, "x", DENIED_WAIT)
        assert res == {"ok": False, "reply": "", "error": "timeout"}
        assert not server_events(server, "accept", "tcp", PORT_NO_ENTRY, mark)
        after = counters_via_cli(instance)
        assert after.get(Reason.DROP_POLICY_DEFAULT, 0) > before.get(Reason.DROP_POLICY_DEFAULT, 0)

        # A new process adopts: nothing is compiled, programs keep their ids.
        out = cli("bpf", "load", instance=instance)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"adopted instance {instance}:"), out.stdout
        for hook, prog_id in prog_ids.items():
            assert f"{hook} id {prog_id} " in out.stdout, out.stdout

        # So does a Datapath in this process.
        dp = Datapath(instance)
        try:
            assert dp.load() == "adopted"
            st = dp.status()
            assert {h: p["id"] for h, p in st["programs"].items()} == prog_ids
            (att,) = st["attachments"]
            assert att["prog_ids"] == ready["attached"] and all(att["present"].values()), att

            # Maps as the agent left them.
            assert tables.read_identities(dp) == t.identities()
            assert tables.read_policy(dp)[0] == tables.layout_policy(POLICY)[0]
            rows = ct_rows_for(cli_json("bpf", "map", "dump", "ct", instance=instance), client_end, server_end)
            assert len(rows) == 1, rows
            assert (rows[0]["initiator"], rows[0]["verdict"], rows[0]["rule"]) == (client_end, "allow", RULE_STREAM)
            assert rows[0]["epoch"] == dp.read_config().epoch

            # Counters kept their history and keep counting.
            established = reasons(dp)[Reason.PASS_ESTABLISHED]
            stream_rule = dp.rule_counter(RULE_STREAM)[0]
            assert established > 0 and stream_rule > 0
            assert wait_for(lambda: reasons(dp)[Reason.PASS_ESTABLISHED] > established, timeout=30)
            assert wait_for(lambda: dp.rule_counter(RULE_STREAM)[0] > stream_rule, timeout=30)
            assert stream.proc.poll() is None, stream.describe()
        finally:
            dp.close()
    finally:
        if agent is not None:
            agent.stop()
        try:
            unload_if_present(instance)
        finally:
            lab.close()
    assert not leftovers(instance)
