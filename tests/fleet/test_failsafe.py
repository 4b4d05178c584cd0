"""The control channel failsafe with real agents and a real controller: the
controller runs in its own namespace, and each agent runs inside its host's
namespace and enforces on the interface its controller connection leaves
through. A policy that would drop that connection is refused by the agent:
its maps stay as they were, `fleet status` shows the refusal, the agent
stays connected and applies the next policy that keeps its channel. An
agent started with --allow-control-lockout applies the same policy and
loses its controller: its status turns disconnected on both ends.

The agents start from freshly loaded datapaths, which deny everything: they
reach the controller through the bootstrap state they apply before their
first connection. The hosts are declared only after that connection was
made (the controller refuses unknown hosts), so the maps are checked while
they hold the bootstrap state alone, before any state came from the
controller."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import subprocess
from pathlib import Path

import pytest

from dataplane.lab import wait_for
from loader import abi, tables
from loader.instance import Datapath
from loader.model import Model
from tests import reliability
from tests.fleet.helpers import (CLI, ROOT, START_TIMEOUT, SYNC_TIMEOUT, Admin, AgentProcess, LoggedProcess,
                                 datapath_snapshot, flows, instance_name, new_lab, reason_count, remove_instance,
                                 start_tcp_servers)

CTL_ADDR = "10.233.0.1"
HOST_ADDRS = {"guarded": "10.233.0.11", "override": "10.233.0.12"}
OVERRIDE = "override"
# The controller notices a silent agent by its keepalive (10 s, 5 s to answer), the agent
# its controller's (5 s, 3 s): generous bounds, not performance claims.
CUT_OFF_TIMEOUT = 90.0
REFUSED = "refused: it would cut this agent off from controller"
BOOTSTRAPPED = "no state in the datapath yet: bootstrap state applied, allowing only"
PEERS_PORT = 9000

INVENTORY = f"""\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {{name: guarded, address: {HOST_ADDRS["guarded"]}}}
  - {{name: override, address: {HOST_ADDRS["override"]}}}
"""


def policy(port: int, allow_control: bool = True, block_control: bool = False, peers_port: int = PEERS_PORT) -> str:
    """Hosts reach each other on peers_port; the agents their controller when allow_control;
    block_control denies it whatever allows it."""
    text = f"""\
apiVersion: zt-dataplane/v1
kind: Policy
metadata: {{name: failsafe}}
rules:
  - name: peers
    action: allow
    from: [{{host: {{}}}}]
    to: [{{host: {{}}}}]
    ports: [tcp/{peers_port}]
"""
    if allow_control:
        text += f"""\
  - name: agents-to-controller
    action: allow
    from: [{{entity: host}}]
    to: [{{cidr: {CTL_ADDR}/32}}]
    ports: [tcp/{port}]
"""
    if block_control:
        text += f"""\
  - name: block-control
    action: deny
    from: [{{entity: host}}]
    to: [{{cidr: {CTL_ADDR}/32}}]
    ports: [tcp/{port}]
"""
    return text


def in_netns(ns: str, argv: list) -> list[str]:
    """argv run in namespace ns's network only: unlike `ip netns exec`, /sys
    (and the bpffs under it) stays the host's, so the pins are shared."""
    return ["nsenter", f"--net=/run/netns/{ns}", *map(str, argv)]


@dataclasses.dataclass
class NsAdmin(Admin):
    """Admin commands from inside the controller's namespace."""

    netns: str = ""

    def run(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = in_netns(self.netns, [CLI, *args, "--controller", self.address, "--tls-dir", self.tls_dir,
                                     "--as", self.name])
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class NsAgent(AgentProcess):
    """`dataplane agent` running inside its host's namespace, enforcing on its interface there."""

    def __init__(self, registry, workdir, host, controller, tls_dir, interface, netns, instance, extra=()):
        super().__init__(registry, workdir, host, controller, tls_dir, interface, netns, instance)
        i = self.argv.index("--netns")
        del self.argv[i:i + 2]
        self.argv = in_netns(netns, [*self.argv, *extra])


@dataclasses.dataclass
class Bootstrap:
    """What one agent's datapath held after its first connection, before any state came from the controller."""

    line: str                   # the agent's log line saying it applied the bootstrap state
    live: dict                  # the live generation: network -> identity, policy entries, audit mode
    other_generation: dict
    model: Model
    rule_id: int                # the bootstrap rule: the datapath's last rule counter


def generation(dp, gen: int) -> dict:
    policy, layout = tables.read_policy(dp, gen)
    return {"ipcache": tables.read_ipcache(dp, gen), "policy": policy, "ranges": layout["sets"],
            "audit": tables.live_audit_default(dp) if gen == tables.active_generation(dp) else None}


def read_bootstrap(instance: str, line: str) -> Bootstrap:
    dp = Datapath(instance).adopt()
    try:
        live = tables.active_generation(dp)
        return Bootstrap(line, generation(dp, live), generation(dp, 1 - live), Model.from_datapath(dp),
                         dp.rules.max_entries - 1)
    finally:
        dp.close()


@dataclasses.dataclass
class Setup:
    admin: NsAdmin
    controller: LoggedProcess
    port: int
    agents: dict
    workdir: Path
    bootstrap: dict = dataclasses.field(default_factory=dict)     # host -> Bootstrap
    denied_before_first_state: int = 0    # default-deny drops the probes below caused on guarded
    pushes: int = 0

    def push(self, text: str) -> int:
        self.pushes += 1
        path = self.workdir / f"failsafe-policy-{self.pushes}.yaml"
        path.write_text(text)
        return self.admin.push_policy(path)


@pytest.fixture(scope="module")
def setup(registry, workdir):
    pki = workdir / "pki"
    out = subprocess.run([str(CLI), "certs", "init", "--dir", str(pki), "--controller", CTL_ADDR,
                          "--agent", ",".join(HOST_ADDRS), "--admin", "ops"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lab = new_lab(registry)
    agents: dict[str, NsAgent] = {}
    controller = None
    try:
        fabric = lab.switch("fabric")
        ctl_ns = lab.ns("ctl")
        lab.plug(fabric, ctl_ns, [f"{CTL_ADDR}/24"])
        controller = LoggedProcess(in_netns(ctl_ns, [CLI, "controller", "--listen", f"{CTL_ADDR}:0", "--store",
                                                     f"sqlite://{workdir / 'failsafe.db'}", "--tls-dir", pki,
                                                     "--name", "ctl"]),
                                   workdir / "failsafe-controller.log", registry)
        line = controller.wait_line(lambda l: " listening on " in l, 60)
        assert line, f"controller did not start: {controller.describe()}"
        port = int(re.search(r"listening on \S+:(\d+) ", line).group(1))
        admin = NsAdmin(f"{CTL_ADDR}:{port}", pki, netns=ctl_ns)
        s = Setup(admin, controller, port, agents, workdir)
        start_tcp_servers(lab, ctl_ns, CTL_ADDR, [PEERS_PORT])

        # Fresh datapaths, hosts not yet declared: the agents bootstrap, connect, and are turned away.
        namespaces = {}
        for host, addr in HOST_ADDRS.items():
            ns = namespaces[host] = lab.ns(host[:4])
            ifname = lab.plug(fabric, ns, [f"{addr}/24"])
            start_tcp_servers(lab, ns, addr, [PEERS_PORT])
            instance = instance_name(f"fs{host[:4]}")
            registry.instances.add(instance)
            remove_instance(instance)
            agents[host] = NsAgent(registry, workdir, host, f"{CTL_ADDR}:{port}", pki, ifname, ns, instance,
                                   extra=["--allow-control-lockout"] if host == OVERRIDE else [])
            agents[host].start()
        for host, agent in agents.items():
            agent.wait_started(START_TIMEOUT)
            turned_away = agent.proc.wait_line(lambda l: "NOT_FOUND" in l and "unknown host" in l, SYNC_TIMEOUT)
            assert turned_away, f"agent {host} never reached its controller: {agent.proc.describe()}"
            line = next((l for l in agent.proc.lines() if BOOTSTRAPPED in l), "")
            s.bootstrap[host] = read_bootstrap(agent.instance, line)
        # Other traffic from the host: to the controller's address on another port, and to the other host.
        guarded = agents["guarded"].instance
        dropped = reason_count(guarded, abi.Reason.DROP_POLICY_DEFAULT)
        flows(lab, [(namespaces["guarded"], HOST_ADDRS["guarded"], CTL_ADDR, PEERS_PORT, False),
                    (namespaces["guarded"], HOST_ADDRS["guarded"], HOST_ADDRS[OVERRIDE], PEERS_PORT, False)])
        s.denied_before_first_state = reason_count(guarded, abi.Reason.DROP_POLICY_DEFAULT) - dropped

        # The first state: the policy, then the hosts (an empty state first would cut off the override agent).
        s.push(policy(port))
        (workdir / "failsafe-inventory.yaml").write_text(INVENTORY)
        admin.ok("inventory", "push", workdir / "failsafe-inventory.yaml")
        admin.wait_in_sync(HOST_ADDRS)
        # The same probe between the hosts now passes: the drop above was the bootstrap state's.
        flows(lab, [(namespaces["guarded"], HOST_ADDRS["guarded"], HOST_ADDRS[OVERRIDE], PEERS_PORT, True)])
        yield s
    finally:
        for agent in agents.values():
            if agent.proc:
                agent.stop()
        for host in HOST_ADDRS:
            remove_instance(instance_name(f"fs{host[:4]}"))
        if controller is not None:
            controller.stop()
        lab.close()


def test_fresh_datapath_reaches_its_controller_through_the_bootstrap_state(setup):
    port = setup.port
    for host, addr in HOST_ADDRS.items():
        boot = setup.bootstrap[host]
        assert f"{addr} -> {CTL_ADDR}:{port}/tcp" in boot.line, (host, boot.line)
        wanted = {"ipcache": {ipaddress.ip_network(f"{addr}/32"): (abi.ReservedIdentity.HOST, 0),
                              ipaddress.ip_network(f"{CTL_ADDR}/32"): (abi.ReservedIdentity.CONTROLLER, 0)},
                  "policy": {(abi.ReservedIdentity.HOST, abi.ReservedIdentity.CONTROLLER, port, socket.IPPROTO_TCP,
                              abi.Direction.EGRESS): (abi.Verdict.ALLOW, boot.rule_id)},
                  "ranges": {}}
        assert boot.live == {**wanted, "audit": False}, host
        assert boot.other_generation == {**wanted, "audit": None}, host
        model = boot.model
        assert (model.policy, model.range_sets, model.audit_default) == (wanted["policy"], {}, False)
        tcp = socket.IPPROTO_TCP
        assert model.judge(addr, CTL_ADDR, tcp, port, abi.Direction.EGRESS).verdict == abi.Verdict.ALLOW
        for other in [(addr, CTL_ADDR, tcp, PEERS_PORT, abi.Direction.EGRESS),
                      (addr, CTL_ADDR, socket.IPPROTO_UDP, port, abi.Direction.EGRESS),
                      (CTL_ADDR, addr, tcp, port, abi.Direction.INGRESS)]:
            assert model.judge(*other).reason == abi.Reason.DROP_POLICY_DEFAULT, (host, other)
    assert setup.denied_before_first_state >= 2, "the guarded host's other traffic was not dropped by default"
    # The bootstrap state was replaced by the controller's first state, as any state is.
    live = datapath_snapshot(setup.agents["guarded"].instance)
    assert all(ident != abi.ReservedIdentity.CONTROLLER for _, (ident, _) in live["ipcache"]), live
    assert not any(setup.agents[h].proc.count(REFUSED) for h in HOST_ADDRS)


def refusal_line(agent: AgentProcess, revision: int, mark: int) -> str | None:
    return agent.proc.wait_line(lambda l: f"revision {revision} not applied" in l and REFUSED in l, SYNC_TIMEOUT,
                                mark)


def test_lockout_refused_then_next_good_state_applied(setup):
    admin, port = setup.admin, setup.port
    guarded, override = setup.agents["guarded"], setup.agents[OVERRIDE]
    start = admin.wait_in_sync(HOST_ADDRS)
    good_revision = start["revision"]
    before = datapath_snapshot(guarded.instance)
    override_before = datapath_snapshot(override.instance)
    mark, ctl_mark = guarded.proc.mark(), setup.controller.mark()
    flow = f"{HOST_ADDRS['guarded']} -> {CTL_ADDR}:{port}/tcp"

    # 1. An explicit deny of the agents' egress to the controller port.
    setup.push(policy(port, block_control=True))
    blocked = admin.status()["revision"]
    line = refusal_line(guarded, blocked, mark)
    assert line, guarded.proc.describe()
    assert flow in line and "denied at egress by rule block-control" in line, line

    # The refusal is reported: fleet status shows it, the agent still at the good revision, connected.
    def refusal_reported():
        a = admin.status()["agents"]["guarded"]
        return a if a["error"] and a["connected"] and a["applied"] == good_revision else None

    reported = wait_for(refusal_reported, timeout=SYNC_TIMEOUT, interval=0.2)
    assert reported, admin.status()
    assert REFUSED in reported["error"] and "rule block-control" in reported["error"], reported
    assert datapath_snapshot(guarded.instance) == before, "a refused state reached the maps"
    local = guarded.local_status()
    assert local.connected and local.revision == good_revision, local

    # The agent with the override applied it, and it is cut off from its controller.
    assert override.proc.wait_line(lambda l: f"revision {blocked} applied in" in l, SYNC_TIMEOUT), \
        override.proc.describe()
    assert override.proc.count("applied anyway (--allow-control-lockout)"), override.proc.describe()
    cut = datapath_snapshot(override.instance)
    assert cut["epoch"] != override_before["epoch"] and cut["policy"] != override_before["policy"]
    assert wait_for(lambda: not admin.status()["agents"][OVERRIDE]["connected"], timeout=CUT_OFF_TIMEOUT,
                    interval=0.5), admin.status()
    assert wait_for(lambda: not override.local_status().connected, timeout=CUT_OFF_TIMEOUT, interval=0.5), \
        override.local_status()
    assert admin.status()["agents"][OVERRIDE]["applied"] < blocked, "the override agent could not report back"

    # 2. The allow rule dropped: the default deny would cut it. The delta
    # comes from the refused state; the agent takes it without resynchronising.
    mark2 = guarded.proc.mark()
    setup.push(policy(port, allow_control=False))
    defaulted = admin.status()["revision"]
    line = refusal_line(guarded, defaulted, mark2)
    assert line, guarded.proc.describe()
    assert flow in line and "the default deny" in line, line
    assert datapath_snapshot(guarded.instance) == before, "a refused state reached the maps"

    # 3. A good state (one more port between hosts) is applied.
    mark3 = guarded.proc.mark()
    setup.push(policy(port, peers_port=9001))
    good = admin.status()["revision"]
    assert guarded.proc.wait_line(lambda l: f"revision {good} applied in" in l, SYNC_TIMEOUT, mark3), \
        guarded.proc.describe()
    status = admin.wait_in_sync(["guarded"])
    assert not status["agents"]["guarded"]["error"], status
    after = datapath_snapshot(guarded.instance)
    assert after["epoch"] != before["epoch"] and after["policy"] != before["policy"]

    # One connection throughout: no reconnect, no resynchronisation.
    problems = []
    connects = setup.controller.count("agent guarded connected", ctl_mark)
    if connects:
        problems.append(f"the controller saw guarded connect {connects} more time(s)")
    for needle in ("resynchronising", "enforcing the last state", "stream ended"):
        if guarded.proc.count(needle, mark):
            problems.append(f"guarded logged {needle!r}: {guarded.proc.lines(mark)}")
    assert not problems, "\n".join(problems)
    local = guarded.local_status()
    assert local.connected and local.revision == good, local

    refused = sum(REFUSED in l for l in guarded.proc.lines(mark))
    overridden = override.proc.count("applied anyway (--allow-control-lockout)")
    assert refused == 2 and overridden == 1, (refused, overridden)
    reliability.record("control_failsafe", {"pushes_refused": refused, "pushes_applied_with_override": overridden,
                                            "agent_stayed_connected": not problems,
                                            "override_agent_disconnected": True})
