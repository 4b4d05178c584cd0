"""One controller, three hosts, an agent process on each, real TCP between
them: the policy pushed to the controller is enforced on every host;
revoking a user's session cuts her established connection within a
fraction of a second; agents keep enforcing while the controller is down
(stopped or killed) and resynchronise when it returns; a restarted agent
resumes in sync without applying anything."""

from __future__ import annotations

import itertools
import json
import re
import signal
import time
from pathlib import Path

from dataplane.lab import wait_for
from loader.abi import Direction, Reason
from tests.fleet.helpers import (ALICE_ADDR, ALICE_SESSION, APP_ADDR, APP_PORT, B_HOST_ADDR, DB_ADDR,
                                 DB_PORT, SYNC_TIMEOUT, Stream, datapath_snapshot, flows, reason_count,
                                 utc_now_text)
from tests.reliability import record

HOSTS = ("A", "B", "C")
FAILED_CONNECT = "enforcing the last state"    # the agent's log line for a failed (re)connect
IN_SYNC = "in sync with "


def base_flows(f, extra_db_port: int | None = None, alice: bool = True) -> list[tuple]:
    """The flows the base policy decides, as (namespace, src, dst, port, passes)."""
    a, b, c = f.ns["A"], f.ns["B"], f.ns["C"]
    out = [(b, APP_ADDR, DB_ADDR, DB_PORT, True),          # app -> db: allowed
           (a, ALICE_ADDR, DB_ADDR, DB_PORT, False),       # alice -> db: nothing allows it
           (b, B_HOST_ADDR, DB_ADDR, DB_PORT, False),      # host B is not the app
           (c, DB_ADDR, APP_ADDR, APP_PORT, False)]        # db -> app: the other way round
    if alice:
        out += [(a, ALICE_ADDR, APP_ADDR, APP_PORT, True),  # staff -> app
                (a, ALICE_ADDR, APP_ADDR, 9090, False)]     # ... on its port only
    if extra_db_port:
        out.append((b, APP_ADDR, DB_ADDR, extra_db_port, extra_db_port in f.db_ports))
    return out


def test_policy_enforced_by_real_tcp(fleet):
    fleet.ensure_alice()
    fleet.admin.wait_in_sync(HOSTS)
    flows(fleet.lab, base_flows(fleet))

    # Where the endpoints came from: app-1 from B's agent, db-1 from the inventory.
    eps = {e["name"]: e for e in fleet.admin.json("fleet", "endpoints")}
    assert eps["app-1"]["host"] == "B" and eps["app-1"]["source"] == "agent", eps
    assert eps["app-1"]["addresses"] == [APP_ADDR], eps
    assert eps["db-1"]["host"] == "C" and eps["db-1"]["source"] == "inventory", eps

    # alice's session is enforced on her device's host: A holds egress entries for her identity.
    sessions = {s["id"]: s for s in fleet.admin.sessions()}
    assert sessions[ALICE_SESSION]["addresses"] == [ALICE_ADDR]
    a = datapath_snapshot(fleet.agents["A"].instance)
    alice_id = dict(a["ipcache"])[f"{ALICE_ADDR}/32"][0]
    assert any(k[0] == alice_id and k[2] == APP_PORT and k[4] == Direction.EGRESS for k, _ in a["policy"]), \
        a["policy"]


def test_fleet_status_every_agent_connected_at_current_revision(fleet):
    status = fleet.admin.wait_in_sync(HOSTS)
    assert set(status["agents"]) == set(HOSTS), status
    for host, agent in fleet.agents.items():
        row = status["agents"][host]
        assert row["connected"] and row["lag"] == 0 and row["applied"] == status["revision"], row
        local = agent.local_status()
        assert local.connected and local.mode == "fleet" and local.host == host, local
        assert local.revision == status["revision"], (local, status["revision"])
        assert local.controller == fleet.controller.address


def test_revoke_cuts_established_connection(fleet, measurement):
    fleet.ensure_alice()
    fleet.admin.wait_in_sync(HOSTS)
    revoked_before = sum(reason_count(fleet.agents[h].instance, Reason.DROP_REVOKED) for h in ("A", "B"))

    stream = Stream(fleet.lab, fleet.ns["A"], ALICE_ADDR, APP_ADDR, APP_PORT)
    assert stream.wait(lambda: len(stream.echoes) >= 40, timeout=30), stream.describe()
    marks = {h: fleet.agents[h].proc.mark() for h in HOSTS}

    started = time.monotonic()
    out = fleet.admin.run("session", "revoke", ALICE_SESSION)
    returned = time.monotonic()
    assert out.returncode == 0, out.stderr
    revision = int(re.search(r"state revision (\d+)", out.stdout).group(1))

    assert stream.wait(lambda: stream.stalled is not None, timeout=30), \
        f"the revoked connection kept passing: {stream.describe()}"
    last_echo = stream.stalled
    assert last_echo == stream.echoes[-1]
    cut = last_echo - returned
    applied = {}
    for h in HOSTS:
        line = fleet.agents[h].proc.wait_line(lambda l: f"revision {revision} applied in" in l, SYNC_TIMEOUT,
                                              marks[h])
        assert line, fleet.agents[h].proc.describe()
        applied[h] = next(t for t, l in fleet.agents[h].proc.timed_lines(marks[h]) if l == line) - started
    measurement(f"revocation: last echo {cut * 1000:+.1f} ms after `session revoke` returned, "
                f"{(last_echo - started) * 1000:.1f} ms after it started (the command took "
                f"{(returned - started) * 1000:.0f} ms); agents logged the apply at "
                + ", ".join(f"{h} +{t * 1000:.0f} ms" for h, t in applied.items())
                + f"; {len(stream.echoes)} echoes before the cut")
    # The connection carried packets while the command ran, and stopped.
    assert any(t >= started for t in stream.echoes), f"not flowing when the revoke started: {stream.describe()}"
    assert cut < 1.0, f"the revoked connection passed packets {cut:.3f} s after the revoke returned"

    # Cut by the datapath (re-judged and dropped), not by anything else.
    revoked_after = sum(reason_count(fleet.agents[h].instance, Reason.DROP_REVOKED) for h in ("A", "B"))
    assert revoked_after > revoked_before

    # A new connection from her device is dropped; the rest of the policy holds.
    assert ALICE_SESSION not in {s["id"] for s in fleet.admin.sessions()}
    flows(fleet.lab, base_flows(fleet, alice=False) + [(fleet.ns["A"], ALICE_ADDR, APP_ADDR, APP_PORT, False)])
    fleet.admin.wait_in_sync(HOSTS)


def test_posture_change_cuts_established_connection(fleet, measurement):
    """Her device stops being managed: the entitlement needs a managed device,
    so her open connection is cut on every host, like a revocation."""
    fleet.ensure_alice()
    fleet.admin.wait_in_sync(HOSTS)
    stream = Stream(fleet.lab, fleet.ns["A"], ALICE_ADDR, APP_ADDR, APP_PORT)
    assert stream.wait(lambda: len(stream.echoes) >= 40, timeout=30), stream.describe()
    try:
        out = fleet.admin.run("session", "posture", ALICE_SESSION, "--posture", "managed=false")
        returned = time.monotonic()
        assert out.returncode == 0, out.stderr
        assert stream.wait(lambda: stream.stalled is not None, timeout=30), \
            f"the connection kept passing after the posture change: {stream.describe()}"
        cut = stream.stalled - returned
        measurement(f"posture change: last echo {cut * 1000:+.1f} ms after `session posture` returned")
        assert cut < 1.0
        flows(fleet.lab, [(fleet.ns["A"], ALICE_ADDR, APP_ADDR, APP_PORT, False)])
    finally:
        out = fleet.admin.run("session", "posture", ALICE_SESSION, "--posture", "managed=true")
        assert out.returncode == 0, out.stderr
    fleet.admin.wait_in_sync(HOSTS)
    flows(fleet.lab, [(fleet.ns["A"], ALICE_ADDR, APP_ADDR, APP_PORT, True)])


def _outage(fleet, sig: int, new_port: int, measurement) -> None:
    """Stops the controller with sig; agents keep enforcing; restarts it on
    the same store; agents reconnect, resynchronise without applying, and
    the next policy change is enforced."""
    admin, controller = fleet.admin, fleet.controller
    admin.wait_in_sync(HOSTS)
    revision = admin.status()["revision"]
    before = fleet.snapshots()
    marks = {h: a.proc.mark() for h, a in fleet.agents.items()}

    rc = controller.stop(sig)
    try:
        if sig == signal.SIGTERM:
            assert rc == 0, controller.proc.describe()
            assert "Traceback" not in controller.proc.text(), controller.proc.describe()
        else:
            assert rc == -signal.SIGKILL

        # Fail-static: every agent notices, keeps running and keeps enforcing.
        for host, agent in fleet.agents.items():
            assert wait_for(lambda a=agent: not a.local_status().connected, timeout=SYNC_TIMEOUT), host
        flows(fleet.lab, base_flows(fleet, extra_db_port=new_port, alice=False))
        for host, agent in fleet.agents.items():
            # Several attempts while the controller is away (with backoff between them).
            assert agent.proc.wait_count(FAILED_CONNECT, 3, timeout=SYNC_TIMEOUT, start=marks[host]), \
                agent.proc.describe()
            assert agent.proc.running(), agent.proc.describe()
            assert agent.local_status().revision == revision
        assert fleet.snapshots() == before, "a datapath changed while the controller was down"
        gaps = []
        for host, agent in fleet.agents.items():
            times = [t for t, l in agent.proc.timed_lines(marks[host]) if FAILED_CONNECT in l]
            gaps.append(f"{host}: " + ", ".join(f"{(b - a):.2f}" for a, b in itertools.pairwise(times)))
        measurement(f"reconnect attempts while the controller was down, seconds apart: {'; '.join(gaps)}")

        # Restart on the same store and port: agents reconnect and are in sync at once.
        restarted_at = utc_now_text()
        marks = {h: a.proc.mark() for h, a in fleet.agents.items()}
        controller.start()
    finally:
        if not controller.proc.running():
            controller.start()
    status = admin.wait_in_sync(HOSTS, since=restarted_at)
    assert status["revision"] == revision, status
    for host, agent in fleet.agents.items():
        assert agent.proc.wait_line(lambda l: IN_SYNC in l and l.endswith(f" at revision {revision}"),
                                    SYNC_TIMEOUT, marks[host]), agent.proc.describe()
        assert not fleet.applied_lines(host, marks[host]), agent.proc.describe()
        local = agent.local_status()
        assert local.connected and local.revision == revision, local
    assert fleet.snapshots() == before, "resynchronising changed a datapath although nothing had changed"

    # A change pushed after the restart reaches every host and is enforced.
    fleet.push_policy(db_ports=fleet.db_ports + (new_port,))
    status = admin.wait_in_sync(HOSTS)
    assert status["revision"] > revision
    flows(fleet.lab, base_flows(fleet, extra_db_port=new_port, alice=False)
          + [(fleet.ns["A"], ALICE_ADDR, DB_ADDR, new_port, False),
             (fleet.ns["B"], B_HOST_ADDR, DB_ADDR, new_port, False)])
    record("controller_killed" if sig == signal.SIGKILL else "controller_stopped",
           {"agents": len(fleet.agents), "datapaths_changed_while_down": 0, "agents_exited": 0,
            "resynced_at_revision": revision, "resync_changed_datapaths": 0,
            "change_after_restart_enforced": True})


def test_controller_stopped_agents_enforce_and_resync(fleet, measurement):
    _outage(fleet, signal.SIGTERM, 5433, measurement)


def test_controller_killed_agents_enforce_and_resync(fleet, measurement):
    _outage(fleet, signal.SIGKILL, 5434, measurement)


def test_status_after_controller_crash_shows_only_live_agents(fleet):
    """An agent that died with the controller is not reported connected by
    the restarted controller."""
    admin, controller = fleet.admin, fleet.controller
    admin.wait_in_sync(HOSTS)
    agent = fleet.agents["C"]
    assert controller.stop(signal.SIGKILL) == -signal.SIGKILL
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL

    restarted_at = utc_now_text()
    try:
        controller.start()
        status = admin.wait_in_sync(("A", "B"), since=restarted_at)
        row = status["agents"]["C"]
        assert not row["connected"], f"C's agent is not running, yet fleet status says: {row}"
    finally:
        if not controller.proc.running():
            controller.start()
        agent.start()
    assert agent.proc.wait_line(lambda l: IN_SYNC in l, SYNC_TIMEOUT), agent.proc.describe()
    status = admin.wait_in_sync(HOSTS, since=restarted_at)
    assert status["agents"]["C"]["connected"]
    flows(fleet.lab, base_flows(fleet, alice=False))


def test_agent_killed_and_restarted_resumes_in_sync(fleet):
    admin = fleet.admin
    status = admin.wait_in_sync(HOSTS)
    agent = fleet.agents["B"]
    before = datapath_snapshot(agent.instance)

    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    try:
        # Its datapath keeps enforcing without it.
        flows(fleet.lab, base_flows(fleet, alice=False))
        assert datapath_snapshot(agent.instance) == before
    finally:
        agent.start()
    line = agent.proc.wait_line(lambda l: IN_SYNC in l, SYNC_TIMEOUT)
    assert line and line.endswith(f" at revision {status['revision']}"), agent.proc.describe()
    assert agent.proc.count(f"datapath {agent.instance} (adopted)"), agent.proc.describe()
    assert not fleet.applied_lines("B"), agent.proc.describe()
    assert datapath_snapshot(agent.instance) == before, "the restarted agent changed its datapath"
    admin.wait_in_sync(HOSTS)
    local = agent.local_status()
    assert local.connected and local.revision == status["revision"], local
    flows(fleet.lab, base_flows(fleet, alice=False))


def test_agent_restarted_after_missing_a_revision_takes_the_next_delta(fleet):
    """C is down while a change that does not concern it is pushed: on
    restart it is in sync at the new revision (nothing to apply), and the
    next change that does concern it arrives as a delta it applies."""
    admin = fleet.admin
    admin.wait_in_sync(HOSTS)
    agent = fleet.agents["C"]
    before = datapath_snapshot(agent.instance)
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL

    fleet.push_policy(app_ports=(9090,))       # app -> app: B's state changes, C's does not
    status = admin.wait_in_sync(("A", "B"))
    revision = status["revision"]

    agent.start()
    line = agent.proc.wait_line(lambda l: IN_SYNC in l, SYNC_TIMEOUT)
    assert line and line.endswith(f" at revision {revision}"), agent.proc.describe()
    admin.wait_in_sync(HOSTS)
    assert datapath_snapshot(agent.instance) == before
    assert not fleet.applied_lines("C"), agent.proc.describe()
    problems = []
    local = agent.local_status()
    if local.revision != revision:
        problems.append(f"in sync at revision {revision}, the agent reports revision {local.revision}")

    mark = agent.proc.mark()
    fleet.push_policy(db_ports=fleet.db_ports + (5435,))
    status = admin.wait_in_sync(HOSTS)
    assert agent.proc.wait_line(lambda l: f"revision {status['revision']} applied in" in l, SYNC_TIMEOUT, mark), \
        agent.proc.describe()
    flows(fleet.lab, base_flows(fleet, extra_db_port=5435, alice=False))
    after = agent.proc.lines(mark)
    if any("resynchronising" in l for l in after):
        problems.append("the next delta did not fit and the agent resynchronised: "
                        + next(l for l in after if "resynchronising" in l))
    if len(fleet.applied_lines("C", mark)) != 1:
        problems.append(f"one change, {len(fleet.applied_lines('C', mark))} applies: {fleet.applied_lines('C', mark)}")
    assert not problems, "\n".join(problems)


def test_controller_aggregates_flows_and_serves_metrics(fleet):
    """The agents send their hosts' flows to the controller: one `observe
    --controller` shows denials judged on different hosts, each under the
    host that judged it. The controller's scrape shows the agents connected,
    in sync, and the API latency histogram."""
    fleet.ensure_alice()
    fleet.admin.wait_in_sync(HOSTS)
    flows(fleet.lab, base_flows(fleet))

    def observed(*args):
        out = fleet.admin.run("observe", "-o", "json", "--last", "0", *args)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def alice_to_db():
        return observed("--verdict", "deny", "--from-ip", ALICE_ADDR, "--to-ip", DB_ADDR, "--to-port", str(DB_PORT))

    def db_to_app():
        return observed("--verdict", "deny", "--from-ip", DB_ADDR, "--to-port", str(APP_PORT))

    assert wait_for(lambda: alice_to_db() and db_to_app(), timeout=15), observed()
    # Nothing allows alice -> db: her own host (A) drops it on the way out.
    f = alice_to_db()[0]
    assert f["host"] == "A" and f["direction"] == "egress" and f["reason"] == "policy_default", f
    assert f["source_identity"]["labels"].get("user") == "alice", f
    # db -> app leaves C and is dropped there.
    f = db_to_app()[0]
    assert f["host"] == "C" and f["direction"] == "egress", f
    assert f["source_identity"]["labels"].get("app") == "db", f
    assert {x["host"] for x in observed("--host", "C")} == {"C"}
    bad = fleet.admin.run("observe", "--filter", "colour=red")
    assert bad.returncode != 0 and "unknown filter field 'colour'" in bad.stderr, bad.stderr

    samples = fleet.controller.scrape()
    assert samples[("dataplane_controller_agents_connected", frozenset())] == len(HOSTS)
    for host in HOSTS:
        assert samples[("dataplane_controller_agent_revision_lag", frozenset({("host", host)}))] == 0
    assert samples[("dataplane_controller_sessions_active", frozenset())] >= 1
    assert samples[("dataplane_controller_leader", frozenset())] == 1
    assert samples[("dataplane_controller_flows_received_total", frozenset())] >= 2
    calls = {dict(labels)["method"] for name, labels in samples
             if name == "dataplane_controller_api_request_duration_seconds_count"}
    assert {"FleetStatus", "OpenSession"} & calls, calls
    # The controller serves exactly the families docs/metrics.md lists for it.
    text = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    section = text.split("## Controller metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(dataplane_[a-z_]+)` \|", section, re.M))
    served = {re.sub(r"_(bucket|sum|count|created)$", "", name) for name, _ in samples
              if name.startswith("dataplane_")}
    assert served == documented, (served ^ documented)
