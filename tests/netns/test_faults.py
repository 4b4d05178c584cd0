"""Fault injection under traffic: the agent dies by SIGKILL at the worst
moments and the datapath must never judge by anything but a whole state.

1. Kill during a large apply. A `dataplane agent` enforces a small state A;
   its files are switched to a large state B (tens of thousands of ipcache
   and policy entries, tests/netns/fault_states.py) and the agent is
   killed part-way through applying it: at a random moment of the whole
   reconcile, shortly after the idle generation starts being written, or
   shortly after the flip. After each kill the live generation must be
   exactly A or exactly B (the model read from the maps against the models
   of the compiled entries), real connections from four clients must be
   judged as that state says, and a long-lived connection allowed by both
   must keep flowing. A restarted agent must converge to B in both
   generations and report B as applied.

2. Restarts during a flood. While allowed UDP (sequenced), new TCP
   connections and established TCP streams flow alongside a flood of
   denied datagrams and denied connection attempts, the agent is killed
   and restarted several times (each start re-attaches and re-applies:
   a flip and an epoch bump). Every allowed datagram, connection and
   record must arrive, nothing denied may arrive, the streams opened
   before the restarts must survive, and the kernel's drop counters must
   equal the denied packets sent, exactly.

Sizes: DATAPLANE_FAULT_KILLS (default 5) kills in the first test,
DATAPLANE_FAULT_RESTARTS (default 6) restarts in the second; the kill
delays are drawn from DATAPLANE_FAULT_SEED (default: from the clock, printed
with the figures).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from dataplane.agent import Workspace, compile_for, load_sources
from dataplane.lab import wait_for
from loader import abi, tables
from loader.model import Model
from tests.conftest import require_root
from tests.netns.fault_agent import (AGENT_START_TIMEOUT, APPLIED, ApplyWatcher, FaultRig, Sources, link_drops,
                                     quiet_topology)
from tests.netns.fault_states import (ALLOWED, CLIENTS, HOST, PORT, SERVER, Bulk, compile_states, difference,
                                      expected_view, generation_view, marker_keys, model_view, write_sources)
from tests.netns.helpers import START_TIMEOUT, TCP, Follower, cli, reasons, server_events, start_peer, start_server
from tests.reliability import record, size

HERE = os.path.dirname(os.path.abspath(__file__))
TRAFFIC = os.path.join(HERE, "fault_traffic.py")

KILLS = size("DATAPLANE_FAULT_KILLS", 5)
RESTARTS = size("DATAPLANE_FAULT_RESTARTS", 6)
SEED = size("DATAPLANE_FAULT_SEED", int(time.time()) % 1_000_000)
STREAM_PORT = 8100                 # allowed for `both` by A (8100-8199) and by B (7990-8110)
PROBE_TIMEOUT = 1.0                # a denied connect is given this long (local RTT is microseconds)
KILL_MODES = ("write", "flip", "any")


def traffic_cmd(*args) -> list[str]:
    return [sys.executable, "-u", TRAFFIC, *map(str, args)]


@pytest.fixture
def rig(tmp_path, request):
    require_root()
    r = FaultRig(tmp_path, request.node.name.split("[")[0][len("test_"):][:10])
    failed = True
    try:
        yield r
        failed = False
    finally:
        left = r.close()
        if not failed:
            assert not left, f"the instance left {left}"


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]


# --- 1. kill -9 during a large apply ----------------------------------------------------------

def _probe(rig: FaultRig, topo: dict) -> dict:
    out = rig.lab.run(topo["client_ns"], traffic_cmd("probe", *[a for c in CLIENTS.values() for a in ("--from", c)],
                                                     "--to", f"{SERVER}:{PORT}", "--timeout", PROBE_TIMEOUT),
                      timeout=60)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    assert lines, f"probe: no result (exit {out.returncode}): {out.stderr[-2000:]}"
    return json.loads(lines[-1])


def _check_probe(rig: FaultRig, topo: dict, server: Follower, live: Model, state: str) -> None:
    """Real connections from the four clients are judged as the live model says."""
    mark = server.mark()
    got = _probe(rig, topo)
    for name, addr in CLIENTS.items():
        want = live.judge(addr, SERVER, TCP, PORT, abi.Direction.INGRESS).verdict == abi.Verdict.ALLOW
        assert want == (name in ALLOWED[state]), f"{name}: the model of {state} says allow={want}"
        assert got[addr]["ok"] == want, f"state {state}: {name} ({addr}) expected ok={want}, got {got[addr]}"
        if not want:
            assert got[addr]["error"] == "timeout", got[addr]
    accepted = {f[3].rsplit(":", 1)[0] for f in server_events(server, "accept", "tcp", PORT, mark)}
    assert accepted == {CLIENTS[n] for n in ALLOWED[state]}, f"state {state}: the server accepted {accepted}"


def test_kill_during_large_apply(rig, tmp_path, measurement):
    assert KILLS >= 2, "DATAPLANE_FAULT_KILLS: at least 2 (one kill before the flip, one after)"
    rng = random.Random(SEED)
    bulk = Bulk()
    files = write_sources(tmp_path / "sources", bulk)
    texts = {n: (p.read_text(), i.read_text()) for n, (p, i) in files.items()}
    states = compile_states(files, rig.state_dir)
    views = {n: expected_view(st) for n, st in states.items()}
    a_size, b_size = views["A"].size(), views["B"].size()
    assert len(views["B"].policy) >= bulk.entries and len(views["B"].identities) >= bulk.prefixes, b_size
    assert a_size < 20, a_size
    for n in ("A", "B"):
        m = Model.from_entries(states[n].identities, states[n].entries, states[n].audit_default)
        for name, addr in CLIENTS.items():
            allowed = m.judge(addr, SERVER, TCP, PORT, abi.Direction.INGRESS).verdict == abi.Verdict.ALLOW
            assert allowed == (name in ALLOWED[n]), (n, name)
        assert m.judge(CLIENTS["both"], SERVER, TCP, STREAM_PORT, abi.Direction.INGRESS).verdict == abi.Verdict.ALLOW

    topo = quiet_topology(rig.lab, list(CLIENTS.values()), SERVER)
    server = start_server(rig.lab, topo["server_ns"], [f"tcp:{PORT}:echo", f"tcp:{STREAM_PORT}:sink"])
    rig.followers.append(server)
    sources = Sources(tmp_path / "live")
    sources.switch(*texts["A"])
    agent = rig.start_agent(sources, topo, HOST)
    agent.wait_applied(1, AGENT_START_TIMEOUT)
    dp = rig.datapath()
    for gen in (0, 1):
        assert generation_view(dp, gen) == views["A"], difference(generation_view(dp, gen), views["A"])

    # A connection allowed by both states, open through every kill and restart.
    stream = start_peer(rig.lab, topo["client_ns"], "tcp-stream", SERVER, STREAM_PORT, "--interval", "0.01")
    rig.followers.append(stream)
    line = stream.wait_line(lambda l: l.startswith(("connected", "error")), START_TIMEOUT)
    assert line and line.startswith("connected"), stream.describe()
    stream_peer = f"{CLIENTS['both']}:{line.split()[1]}"

    def stream_arrivals() -> int:
        return sum(1 for f in server_events(server, "recv", "tcp", STREAM_PORT) if f[3] == stream_peer)

    assert wait_for(lambda: stream_arrivals() > 0, timeout=10), f"no stream from {stream_peer}: {server.lines()[-5:]}"

    # One uninterrupted apply of B, watched, gives the time scale of the kills.
    markers = {"B": {g: marker_keys(dp, states["B"], states["A"], g) for g in (0, 1)}}

    def switch_and_watch(to: str, agent):
        live = tables.active_generation(dp)
        watcher = ApplyWatcher(dp, markers[to][1 - live], live, agent, agent.applied())
        rig.watchers.append(watcher)
        sources.switch(*texts[to])
        agent.hup()
        return watcher

    t_start = time.monotonic()
    watcher = switch_and_watch("B", agent)
    agent.wait_applied(2)
    assert watcher.wait("done", 30)
    watcher.stop()
    t_write, t_policy, t_flip, t_done = (getattr(watcher, k) - watcher.t0
                                         for k in ("written", "policy_written", "flipped", "done"))
    assert 0 < t_write <= t_policy <= t_flip <= t_done, (t_write, t_policy, t_flip, t_done)
    scale = {"written": t_write, "policy_written": t_policy, "flipped": t_flip, "after_flip": t_done - t_flip,
             "write_window": t_policy - t_write}
    for gen in (0, 1):
        assert generation_view(dp, gen) == views["B"], difference(generation_view(dp, gen), views["B"])
    sources.switch(*texts["A"])
    agent.hup()
    agent.wait_applied(3)
    measurement(f"apply of B ({b_size} entries) by the agent: idle generation's ipcache written at {t_write:.2f} s, "
                f"its policy at {t_policy:.2f} s, flip at {t_flip:.2f} s, applied at {t_done:.2f} s after SIGHUP")

    kills = []
    for i in range(KILLS):
        mode = KILL_MODES[i % len(KILL_MODES)]
        assert model_view(Model.from_datapath(dp)) == views["A"]
        live_before = tables.active_generation(dp)
        assert generation_view(dp, 1 - live_before) == views["A"], "the idle generation must start as A"
        watcher = switch_and_watch("B", agent)
        # The apply's pace drifts from run to run: delays follow the latest run watched.
        if mode == "any":
            delay = rng.uniform(0, scale["flipped"] + scale["after_flip"])
            time.sleep(max(0.0, watcher.t0 + delay - time.monotonic()))
        elif mode == "write":
            assert watcher.wait("written", 60) is not None, agent.text()[-2000:]
            # Before the policy batch: identities of B, policy of A in the idle generation. The
            # shortest such window seen so far bounds the delay: the pace varies with the load.
            time.sleep(rng.uniform(0, 0.5 * scale["write_window"]))
        else:
            assert watcher.wait("flipped", 60) is not None, agent.text()[-2000:]
            time.sleep(rng.uniform(0, scale["after_flip"]))
        status = agent.kill()
        killed_at = time.monotonic() - watcher.t0
        watcher.stop()
        if watcher.flipped is not None:
            scale.update({k: getattr(watcher, k) - watcher.t0 for k in ("written", "policy_written", "flipped")})
            scale["write_window"] = min(scale["write_window"], watcher.policy_written - watcher.written)
        assert status == -signal.SIGKILL, f"the agent exited by itself ({status}) before the kill"

        # The live generation is one whole state, never a mix.
        live_gen = tables.active_generation(dp)
        live_model = Model.from_datapath(dp)
        live = model_view(live_model)
        which = "A" if live == views["A"] else "B" if live == views["B"] else None
        assert which, f"kill {i} ({mode}, {killed_at:.2f} s): the live generation is neither A nor B: " \
                      f"vs A: {difference(live, views['A'])} | vs B: {difference(live, views['B'])}"
        assert (live_gen == live_before) == (which == "A"), (live_gen, live_before, which)
        idle = generation_view(dp, 1 - live_gen)
        idle_b = len(set(idle.identities.items()) & set(views["B"].identities.items())) + \
            len(set(idle.policy.items()) & set(views["B"].policy.items()))
        if which == "A":
            phase = "before" if idle == views["A"] else "written" if idle == views["B"] else "during"
        else:
            phase = "after"
        kills.append({"mode": mode, "at_s": round(killed_at, 3), "phase": phase, "live": which,
                      "idle_b_entries": idle_b, "idle_complete": idle == views["B"]})

        # Real connections are judged as the live state says.
        _check_probe(rig, topo, server, live_model, which)

        # A new agent adopts the datapath and converges to B, in both generations.
        agent = rig.start_agent(sources, topo, HOST)
        agent.wait_applied(1)
        assert "(adopted)" in agent.text(), agent.text()[-2000:]
        for gen in (0, 1):
            assert generation_view(dp, gen) == views["B"], difference(generation_view(dp, gen), views["B"])
        shown = json.loads(_cli_ok(rig, "policy", "show", "-o", "json", "--state-dir", rig.state_dir))
        assert shown["sources"]["digests"] == [_digest(files["B"][0]), _digest(files["B"][1])], shown["sources"]
        assert shown["counts"]["entries"] == len(states["B"].entries), shown["counts"]
        assert shown["counts"]["prefixes"] == len(states["B"].identities), shown["counts"]
        assert (shown["generation"], shown["epoch"]) == (tables.active_generation(dp), dp.read_config().epoch)

        # Back to A for the next kill.
        n = agent.applied()
        sources.switch(*texts["A"])
        agent.hup()
        agent.wait_applied(n + 1)

    seen = stream_arrivals()
    assert stream.proc.poll() is None, stream.describe()
    time.sleep(0.3)
    assert stream_arrivals() > seen, f"the long-lived connection stopped: {stream.describe()}"
    duration = time.monotonic() - t_start

    phases = collections.Counter(k["phase"] for k in kills)
    measurement(f"{KILLS} kills (seed {SEED}): " + ", ".join(f"{k['mode']}@{k['at_s']}s->{k['phase']}"
                                                             f"(idle B entries {k['idle_b_entries']})" for k in kills))
    record("fault_kill_apply", {
        "kills": KILLS, "seed": SEED, "kills_before_flip": phases["before"] + phases["during"] + phases["written"],
        "kills_before_writes": phases["before"], "kills_during_writes": phases["during"] + phases["written"],
        "kills_after_flip": phases["after"], "entries_a": a_size, "entries_b": b_size,
        "apply_s": round(t_done, 3), "apply_write_s": round(t_write, 3), "apply_policy_write_s": round(t_policy, 3),
        "apply_flip_s": round(t_flip, 3),
        "restarts": KILLS, "mixed_states": 0, "duration_s": round(duration, 1)})
    assert phases["during"] >= 1, f"no kill landed with the idle generation partly written: {kills}"
    assert phases["after"] >= 1, f"no kill landed after the flip: {kills}"


def _cli_ok(rig: FaultRig, *args) -> str:
    out = cli(*args, instance=rig.instance)
    assert out.returncode == 0, f"dataplane {' '.join(map(str, args))}: {out.stderr}"
    return out.stdout


# --- 2. restarts during a flood ------------------------------------------------------------------

FLOOD_SERVER = "10.230.0.1"
OK, FLOODER, QUIET, TCP_DENIED = "10.230.0.11", "10.230.0.21", "10.230.0.22", "10.230.0.23"
UDP_OK, UDP_FLOOD, UDP_QUIET, TCP_NEW, TCP_STREAMS = 7001, 7201, 7301, 7500, 7600
UDP_RATE = 500                     # datagrams per second on each allowed UDP flow (one long flow, one fresh)
FLOOD_RATE = 40_000                # denied datagrams per second
QUIET_RATE = 500                   # datagrams per second meeting the default deny
TCP_RATE = 150                     # new allowed connections per second
STREAMS = 4                        # established connections opened before the first restart
WARMUP, TAIL, SETTLE = 1.0, 1.0, 1.0

FLOOD_INVENTORY = f"""\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {{name: srv, address: 10.230.0.250}}
  - {{name: clients}}
endpoints:
  - {{name: svc, host: srv, address: {FLOOD_SERVER}, labels: {{app: svc}}}}
  - {{name: ok, host: clients, address: {OK}, labels: {{app: ok}}}}
  - {{name: flooder, host: clients, address: {FLOODER}, labels: {{app: flooder}}}}
  - {{name: quiet, host: clients, address: {QUIET}, labels: {{app: quiet}}}}
  - {{name: knocker, host: clients, address: {TCP_DENIED}, labels: {{app: knocker}}}}
"""
FLOOD_POLICY = f"""\
apiVersion: zt-dataplane/v1
kind: Policy
metadata: {{name: fault-flood}}
rules:
  - {{name: ok-udp, action: allow, from: [{{workload: {{app: ok}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [udp/{UDP_OK}]}}
  - {{name: ok-tcp, action: allow, from: [{{workload: {{app: ok}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [tcp/{TCP_NEW}, tcp/{TCP_STREAMS}-{TCP_STREAMS + 9}]}}
  - {{name: flood-deny, action: deny, from: [{{workload: {{app: flooder}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [udp/{UDP_FLOOD}]}}
  - {{name: knock-deny, action: deny, from: [{{workload: {{app: knocker}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [tcp/{TCP_NEW}]}}
"""


def _startup_phase(agent) -> str:
    """How far an agent had got, from its log: starting, loaded, attached or applied."""
    text = agent.text()
    if APPLIED in text:
        return "applied"
    if "INFO: attached to " in text:
        return "attached"
    if "INFO: datapath " in text:
        return "loaded"
    return "starting"


def _stop(proc: Follower, out) -> dict:
    proc.proc.stdin.write(b"stop\n")
    proc.proc.stdin.flush()
    assert proc.wait_line(lambda l: l == "done", 120), proc.describe()
    return json.loads(out.read_text())


def test_agent_restarts_during_flood(rig, tmp_path, measurement):
    rng = random.Random(SEED)
    sources = Sources(tmp_path / "live")
    sources.switch(FLOOD_POLICY, FLOOD_INVENTORY)
    ws = Workspace("unused", str(rig.state_dir))
    _, state = compile_for(*load_sources(str(sources.policy), str(sources.inventory)), "srv", ws)
    ws.save_numbers()   # the agent numbers identities and rules as this compile did
    want = expected_view(state)
    rule = state.rule_ids

    topo = quiet_topology(rig.lab, [OK, FLOODER, QUIET, TCP_DENIED], FLOOD_SERVER)
    agent = rig.start_agent(sources, topo, "srv")
    agent.wait_applied(1, AGENT_START_TIMEOUT)
    dp = rig.datapath()
    assert model_view(Model.from_datapath(dp)) == want, difference(model_view(Model.from_datapath(dp)), want)

    recv_out, send_out = tmp_path / "received.json", tmp_path / "sent.json"
    receiver = Follower(rig.lab.popen(topo["server_ns"], traffic_cmd(
        "receive", "--udp", UDP_OK, "--udp", UDP_FLOOD, "--udp", UDP_QUIET, "--tcp", TCP_NEW, "--tcp", TCP_STREAMS,
        "--out", recv_out), stdin=subprocess.PIPE))
    rig.followers.append(receiver)
    assert receiver.wait_line(lambda l: l == "listening", START_TIMEOUT), receiver.describe()

    reasons_before = reasons(dp)
    rules_before = {n: dp.rule_counter(i)[0] for n, i in rule.items()}
    links_before = {k: link_drops(topo[k.split("_")[0] + "_ns"], topo[k]) for k in ("client_if", "server_if")}
    epoch_before = dp.read_config().epoch

    sender = Follower(rig.lab.popen(topo["client_ns"], traffic_cmd(
        "send", "--udp", f"{OK}:{FLOOD_SERVER}:{UDP_OK}", "--udp", f"{OK}:{FLOOD_SERVER}:{UDP_OK}:fresh",
        "--udp-rate", UDP_RATE, "--flood", f"{FLOODER}:{FLOOD_SERVER}:{UDP_FLOOD}", "--flood-rate", FLOOD_RATE,
        "--tcp-new", f"{OK}:{FLOOD_SERVER}:{TCP_NEW}", "--tcp-rate", TCP_RATE,
        "--tcp-denied", f"{TCP_DENIED}:{FLOOD_SERVER}:{TCP_NEW}",
        "--stream", f"{OK}:{FLOOD_SERVER}:{TCP_STREAMS}", "--streams", STREAMS, "--out", send_out),
        stdin=subprocess.PIPE))
    rig.followers.append(sender)
    assert sender.wait_line(lambda l: l == "started", START_TIMEOUT), sender.describe()
    # The quiet flow meets the default deny: a second sender, so its rate does not depend on the others.
    quiet_out = tmp_path / "quiet.json"
    quiet = Follower(rig.lab.popen(topo["client_ns"], traffic_cmd(
        "send", "--udp", f"{QUIET}:{FLOOD_SERVER}:{UDP_QUIET}", "--udp-rate", QUIET_RATE, "--out", quiet_out),
        stdin=subprocess.PIPE))
    rig.followers.append(quiet)
    assert quiet.wait_line(lambda l: l == "started", START_TIMEOUT), quiet.describe()
    t_start = time.monotonic()
    time.sleep(WARMUP)

    # Kill -9 and start again; every other agent is killed while it is still
    # starting up or applying, the others some time after they applied.
    startup = None
    killed_in = []
    for i in range(RESTARTS):
        killed_in.append(_startup_phase(agent))
        assert agent.kill() == -signal.SIGKILL
        t0 = time.monotonic()
        agent = rig.start_agent(sources, topo, "srv")
        if i % 2 == 0 or startup is None:
            agent.wait_applied(1)
            startup = time.monotonic() - t0
            time.sleep(rng.uniform(0.2, 1.5))
        else:
            time.sleep(rng.uniform(0.0, startup))
    killed_in.append(_startup_phase(agent))
    assert agent.kill() == -signal.SIGKILL
    agent = rig.start_agent(sources, topo, "srv")
    agent.wait_applied(1)
    time.sleep(TAIL)

    sent = _stop(sender, send_out)
    quiet_sent = _stop(quiet, quiet_out)
    time.sleep(SETTLE)
    got = _stop(receiver, recv_out)
    duration = time.monotonic() - t_start
    reasons_delta = collections.Counter({r: n - reasons_before.get(r, 0) for r, n in reasons(dp).items()})
    rules_delta = {n: dp.rule_counter(i)[0] - rules_before[n] for n, i in rule.items()}
    links_after = {k: link_drops(topo[k.split("_")[0] + "_ns"], topo[k]) for k in ("client_if", "server_if")}
    for gen in (0, 1):
        assert generation_view(dp, gen) == want, difference(generation_view(dp, gen), want)
    epochs = dp.read_config().epoch - epoch_before

    # Accounting, first as figures (recorded even when a check below fails).
    flood_sent, quiet_n = sent["flood"]["sent"], quiet_sent["udp"][0]["sent"]
    req, knock = sent["requests"], sent["denied"]
    served = got["requests"][str(TCP_NEW)]
    streams = got["streams"][str(TCP_STREAMS)]
    udp_lost, udp_dups = {}, {}
    for f in sent["udp"]:
        counts = collections.Counter(got["udp"].get(f"{UDP_OK} {OK} {f['index']}", []))
        udp_lost[f["index"]] = sorted(set(range(f["sent"])) - set(counts))
        udp_dups[f["index"]] = sorted(q for q, c in counts.items() if c > 1 or q >= f["sent"])
    udp_ok_sent = sum(f["sent"] for f in sent["udp"])
    records_sent = sum(s["records"] for s in sent["streams"])
    allowed_sent = udp_ok_sent + req["attempted"] + records_sent
    allowed_delivered = sum(len(v) for k, v in got["udp"].items() if k.startswith(f"{UDP_OK} ")) + \
        sum(1 for a, _ in served if a == OK) + sum(r["records"] for r in streams.values())
    denied_sent = flood_sent + quiet_n + knock["attempts"]
    denied_arrived = sum(len(v) for k, v in got["udp"].items() if not k.startswith(f"{UDP_OK} ")) + \
        sum(1 for a, _ in served if a != OK) + knock["connected"]
    drops = sum(n for r, n in reasons_delta.items() if isinstance(r, abi.Reason) and r.is_drop)
    misjudged = (drops - denied_sent) + denied_arrived + (allowed_sent - allowed_delivered)
    phases = collections.Counter(killed_in)
    flood_pps = flood_sent / duration
    measurement(f"{len(killed_in)} kills (agent {dict(phases)}), {epochs} epoch bumps in {duration:.1f} s; allowed: "
                f"udp {udp_ok_sent}, tcp connections {req['attempted']} (slowest {req['slowest_s'] * 1000:.0f} ms), "
                f"stream records {records_sent}; denied: flood {flood_sent} ({flood_pps:.0f}/s), default {quiet_n}, "
                f"syn {knock['attempts']}; drops counted {drops}")
    record("fault_restart_flood", {
        "restarts": len(killed_in), "kills_before_apply": len(killed_in) - phases["applied"],
        "kills_by_agent_phase": dict(phases), "epoch_bumps": epochs, "udp_allowed_sent": udp_ok_sent,
        "tcp_connections_sent": req["attempted"], "tcp_connections_completed": req["completed"],
        "stream_records_sent": records_sent, "established_streams": STREAMS, "allowed_sent": allowed_sent,
        "allowed_delivered": allowed_delivered, "denied_sent": denied_sent, "denied_delivered": denied_arrived,
        "denied_counted_as_drops": drops, "misjudged": misjudged, "flood_pps": round(flood_pps),
        "duration_s": round(duration, 1)})

    # The senders sent what they meant to.
    assert not sent["stuck"] and not quiet_sent["stuck"], (sent["stuck"], quiet_sent["stuck"])
    for f in sent["udp"] + quiet_sent["udp"] + [sent["flood"]]:
        assert f["error_count"] == 0, f
    assert flood_sent >= FLOOD_RATE * duration * 0.3, f"the flood reached only {flood_sent} in {duration:.1f} s"
    assert req["attempted"] >= TCP_RATE * duration * 0.3, req

    # Allowed: every datagram once, every connection completed, every record in order.
    for f in sent["udp"]:
        lost = udp_lost[f["index"]]
        assert not lost, f"udp flow {f['index']} (fresh={f['fresh']}): {len(lost)} of {f['sent']} lost, {lost[:10]}"
        assert not udp_dups[f["index"]], f"udp flow {f['index']}: duplicated {udp_dups[f['index']][:10]}"
    assert req["failed_count"] == 0 and req["completed"] == req["attempted"], req
    assert sorted(n for a, n in served if a == OK) == list(range(req["attempted"])), "requests served != attempted"
    for s in sent["streams"]:
        r = streams.get(str(s["sid"]))
        assert s["error"] is None and s["closed_by_peer"], s
        assert r and r["src"] == OK and r["in_order"] and r["closed"] and r["error"] is None, (s, r)
        assert r["records"] == s["records"] > 0, (s, r)
    assert not got["bad"], got["bad"][:10]
    assert allowed_delivered == allowed_sent

    # Denied: nothing arrives, and the kernel counted every denied packet as a drop, and nothing else.
    assert denied_arrived == 0, f"{denied_arrived} denied packets or connections arrived"
    assert knock["attempts"] > 0 and not knock["other"], knock
    assert rules_delta["flood-deny"] == flood_sent, (rules_delta, flood_sent)
    assert rules_delta["knock-deny"] == knock["attempts"], (rules_delta, knock)
    assert reasons_delta[abi.Reason.DROP_POLICY_DENY] == flood_sent + knock["attempts"], reasons_delta
    assert reasons_delta[abi.Reason.DROP_POLICY_DEFAULT] == quiet_n, (reasons_delta, quiet_n)
    assert drops == denied_sent, f"drops beyond the denied packets: {reasons_delta}"
    for k in links_before:
        assert links_after[k] == links_before[k], f"{k} dropped packets itself: {links_before[k]} -> {links_after[k]}"
    assert misjudged == 0

    # The restarts were real: each completed start flipped and bumped the epoch; streams were judged again.
    starts_applied = sum(1 for a in rig.agents[1:] if a.applied() > 0)
    assert epochs >= starts_applied >= RESTARTS // 2 + 1, (epochs, starts_applied)
    assert all("(adopted)" in a.text() for a in rig.agents[1:] if a.applied() > 0)
    assert reasons_delta[abi.Reason.PASS_REJUDGED] > 0, reasons_delta
