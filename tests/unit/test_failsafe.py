"""The control channel failsafe, without a kernel: before applying a state
the fleet agent judges its own connection to each controller address (a new
egress TCP flow from this host, which is how the datapath judges it again
after every apply) with the datapath's decision procedure, and refuses a
state that would drop it. States come from the real compiler, so the
identities of the host and of the controller are the ones an agent gets.

Also the bootstrap state an agent applies to a datapath that never held a
state, so its first connection passes: exactly the control flows allowed,
written through loader.tables into maps kept in dicts, and never written
over a state something else applied (the kernel side is in
tests/fleet/test_failsafe.py)."""

from __future__ import annotations

import datetime as dt
import socket
from ipaddress import ip_network

import pytest

from dataplane.compiler import Compiler
from dataplane.fleet import HostView
from dataplane.fleet_agent import (ControlFlow, FleetAgent, FleetOptions, bootstrap_view, check_control_channel,
                                   control_flows, enforced_route, local_address_to, split_target, view_model)
from dataplane.identity import Allocator
from dataplane.inventory import parse_inventory
from dataplane.policy import parse_policy
from dataplane.source import loads
from loader import tables
from loader.abi import Direction, Reason, ReservedIdentity, Verdict
from loader.model import Model
from loader.tables import PolicyEntry

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
HOST_V4, HOST_V6 = "10.9.0.11", "fd00:9::11"
CTL_V4, CTL_V6 = "10.9.0.1", "fd00:9::1"
PORT = 7443

INVENTORY = f"""\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {{name: edge, addresses: [{HOST_V4}, {HOST_V6}]}}
endpoints:
  - {{name: web-1, host: edge, address: 10.9.0.21, labels: {{app: web}}}}
"""

ALLOW_CONTROL = f"""\
  - name: agent-to-controller
    action: allow
    from: [{{entity: host}}]
    to: [{{cidr: {CTL_V4}/32}}, {{cidr: {CTL_V6}/128}}]
    ports: [tcp/{PORT}]
"""
ALLOW_CONTROL_V4_ONLY = f"""\
  - name: agent-to-controller
    action: allow
    from: [{{entity: host}}]
    to: [{{cidr: {CTL_V4}/32}}]
    ports: [tcp/{PORT}]
"""
DENY_CONTROL = f"""\
  - name: block-control
    action: deny
    from: [{{entity: any}}]
    to: [{{cidr: 10.9.0.0/29}}]
"""
WEB = """\
  - name: web-from-anywhere
    action: allow
    from: [{entity: any}]
    to: [{workload: {app: web}}]
    ports: [tcp/443]
"""


def view_of(rules: str, mode: str = "enforce", revision: int = 7) -> HostView:
    """host edge's state for a policy made of rules, as the controller sends it."""
    text = f"apiVersion: zt-dataplane/v1\nkind: Policy\nmode: {mode}\nrules:\n{rules}"
    policy = parse_policy(*loads(text, "policy.yaml"))
    inventory = parse_inventory(*loads(INVENTORY, "inventory.yaml"))
    st = Compiler(policy, inventory, Allocator(None), Allocator(None, first=1), now=NOW).compile("edge")
    return HostView.of(st, revision)


V4 = ControlFlow(f"{CTL_V4}:{PORT}", HOST_V4, CTL_V4, PORT)
V6 = ControlFlow(f"[{CTL_V6}]:{PORT}", HOST_V6, CTL_V6, PORT)


# --- the decision ---------------------------------------------------------------------------

def test_allowed_channel_passes():
    assert check_control_channel(view_of(WEB + ALLOW_CONTROL), [V4, V6], NOW) is None


def test_channel_denied_by_rule_names_rule_and_flow():
    lock = check_control_channel(view_of(WEB + ALLOW_CONTROL + DENY_CONTROL), [V4], NOW)
    assert lock is not None
    assert lock.decision.reason == Reason.DROP_POLICY_DENY
    assert lock.rule == "block-control"
    assert lock.decision.local_id == ReservedIdentity.HOST
    assert f"{HOST_V4} -> {CTL_V4}:{PORT}/tcp" in lock.text()
    assert "rule block-control" in lock.text() and f"controller {CTL_V4}:{PORT}" in lock.text()


def test_channel_not_allowed_is_default_deny():
    lock = check_control_channel(view_of(WEB), [V4], NOW)
    assert lock is not None
    assert lock.decision.reason == Reason.DROP_POLICY_DEFAULT
    assert lock.rule == ""
    assert "default deny" in lock.text()


def test_audit_mode_passes_even_a_deny_rule():
    assert check_control_channel(view_of(WEB, mode="audit"), [V4, V6], NOW) is None
    view = view_of(WEB + DENY_CONTROL, mode="audit")
    assert check_control_channel(view, [V4], NOW) is None
    # The same rule in enforce mode would have cut it.
    assert check_control_channel(view_of(WEB + DENY_CONTROL), [V4], NOW).rule == "block-control"


def test_ipv6_controller_address():
    assert check_control_channel(view_of(WEB + ALLOW_CONTROL), [V6], NOW) is None
    lock = check_control_channel(view_of(WEB + ALLOW_CONTROL_V4_ONLY), [V6], NOW)
    assert lock is not None and lock.decision.reason == Reason.DROP_POLICY_DEFAULT
    assert f"{HOST_V6} -> [{CTL_V6}]:{PORT}/tcp" in lock.text()


def test_every_resolved_address_is_checked():
    """A name resolving to two addresses: one allowed is not enough, the
    agent may reach the controller at either."""
    flows, problems = control_flows(
        [f"ctl.example:{PORT}"], crosses=lambda remote: True,
        resolve=lambda host, port: [CTL_V4, CTL_V6] if host == "ctl.example" else [],
        local_of=lambda remote, port: HOST_V6 if ":" in remote else HOST_V4)
    assert problems == []
    assert flows == [ControlFlow(f"ctl.example:{PORT}", HOST_V4, CTL_V4, PORT),
                     ControlFlow(f"ctl.example:{PORT}", HOST_V6, CTL_V6, PORT)]
    assert check_control_channel(view_of(WEB + ALLOW_CONTROL), flows, NOW) is None
    lock = check_control_channel(view_of(WEB + ALLOW_CONTROL_V4_ONLY), flows, NOW)
    assert lock is not None and lock.flow.remote == CTL_V6 and lock.flow.controller == f"ctl.example:{PORT}"


def test_every_controller_is_checked():
    flows, _ = control_flows([f"{CTL_V4}:{PORT}", f"10.9.0.2:{PORT}"], crosses=lambda remote: True,
                             resolve=lambda host, port: [host], local_of=lambda remote, port: HOST_V4)
    lock = check_control_channel(view_of(WEB + ALLOW_CONTROL), flows, NOW)
    assert lock is not None and lock.flow.remote == "10.9.0.2", "the second controller is unreachable"


def test_host_address_unknown_to_the_state_is_the_world():
    """The source address the connection leaves from must be one the state
    knows as this host; otherwise the datapath sees the world leaving."""
    flow = ControlFlow(f"{CTL_V4}:{PORT}", "10.9.0.99", CTL_V4, PORT)
    lock = check_control_channel(view_of(WEB + ALLOW_CONTROL), [flow], NOW)
    assert lock is not None and lock.decision.local_id == ReservedIdentity.WORLD
    assert lock.decision.verdict == Verdict.DENY


def test_expired_ipcache_entry_does_not_count():
    view = view_of(WEB + ALLOW_CONTROL)
    prefix = f"{HOST_V4}/32"
    ident, _ = view.ipcache[prefix]
    expired = HostView(view.revision, view.host, {**view.ipcache, prefix: (ident, "2026-12-01T11:00:00+00:00")},
                       view.entries, view.audit_default, view.rule_names, view.identity_labels, view.locals)
    assert check_control_channel(view, [V4], NOW) is None
    assert check_control_channel(expired, [V4], NOW).decision.local_id == ReservedIdentity.WORLD


def test_no_flows_no_check():
    assert check_control_channel(view_of(WEB), [], NOW) is None


# --- finding the flows ------------------------------------------------------------------------

@pytest.mark.parametrize("target, expected", [
    ("ctl.example:7443", ("ctl.example", 7443)),
    ("10.0.0.2:7443", ("10.0.0.2", 7443)),
    ("[fd00::2]:7443", ("fd00::2", 7443)),
])
def test_split_target(target, expected):
    assert split_target(target) == expected


@pytest.mark.parametrize("target", ["ctl.example", "fd00::2:7443", ":7443", "ctl:port"])
def test_split_target_refuses(target):
    with pytest.raises(ValueError):
        split_target(target)


def test_unresolvable_names_and_routes_are_problems_not_flows():
    def resolve(host, port):
        if host == "gone.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [host]

    def local_of(remote, port):
        if remote == "10.9.0.3":
            raise OSError(101, "Network is unreachable")
        return HOST_V4

    flows, problems = control_flows([f"gone.example:{PORT}", f"10.9.0.3:{PORT}", "bad", f"{CTL_V4}:{PORT}"],
                                    crosses=lambda remote: True, resolve=resolve, local_of=local_of)
    assert flows == [V4]
    assert len(problems) == 3 and problems[0].startswith("gone.example") and "unreachable" in problems[1]


def test_routes_outside_the_enforced_interfaces_are_not_checked():
    flows, _ = control_flows([f"{CTL_V4}:{PORT}", f"10.9.0.2:{PORT}"], crosses=lambda remote: remote == CTL_V4,
                             resolve=lambda host, port: [host], local_of=lambda remote, port: HOST_V4)
    assert flows == [V4]
    assert control_flows([f"{CTL_V4}:{PORT}"], crosses=None) == ([], [])


def test_interfaces_in_another_namespace_are_never_crossed():
    assert enforced_route(["eth0"], "no-such-namespace-here") is None
    assert enforced_route([], None) is None


def test_loopback_route_and_local_address():
    """Real routing lookups, no traffic: the loopback controller is reached
    through lo, not through another interface."""
    assert local_address_to("127.0.0.1", PORT) == "127.0.0.1"
    assert enforced_route(["lo"], None)("127.0.0.1") is True
    assert enforced_route(["dpnosuchif0"], None)("127.0.0.1") is False


# --- the agent's apply path -------------------------------------------------------------------

class Untouched(Exception):
    pass


class UntouchableDatapath:
    """Stands for the maps: any use of them raises Untouched."""

    instance = "failsafe-unit"

    def __getattr__(self, name):
        raise Untouched(name)


def loopback_agent(tmp_path, **kw) -> FleetAgent:
    """An agent enforcing on lo whose controller is on loopback: its channel crosses its hook."""
    return FleetAgent(UntouchableDatapath(), FleetOptions(controllers=[f"127.0.0.1:{PORT}"], host="edge",
                                                          interfaces=["lo"], state_dir=str(tmp_path), **kw))


def test_agent_refuses_without_touching_the_maps(tmp_path, caplog):
    agent = loopback_agent(tmp_path)
    view = view_of(WEB + ALLOW_CONTROL)         # 127.0.0.1 is not this host in the state: world -> default deny
    with caplog.at_level("ERROR", logger="dataplane.agent"):
        error, _ = agent.apply(view)
    assert error.startswith("refused: it would cut this agent off from controller 127.0.0.1:7443: "
                            f"127.0.0.1 -> 127.0.0.1:{PORT}/tcp denied at egress by the default deny"), error
    assert "--allow-control-lockout" in error
    assert agent.view is None and agent.applied_at == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "revision 7 not applied" in lines[0] and "127.0.0.1 -> 127.0.0.1" in lines[0]


def test_agent_audit_state_goes_on_to_the_maps(tmp_path):
    with pytest.raises(Untouched):
        loopback_agent(tmp_path).apply(view_of(WEB, mode="audit"))


def test_agent_with_override_goes_on_to_the_maps(tmp_path, caplog):
    agent = loopback_agent(tmp_path, allow_control_lockout=True)
    with caplog.at_level("WARNING", logger="dataplane.agent"), pytest.raises(Untouched):
        agent.apply(view_of(WEB))
    assert any("applied anyway (--allow-control-lockout)" in r.getMessage() for r in caplog.records)


# --- the bootstrap state ------------------------------------------------------------------------

BOOT_RULE = 4095
CTL2_V4 = "10.9.0.2"
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
HOST, CONTROLLER = ReservedIdentity.HOST, ReservedIdentity.CONTROLLER


def allow_control(remote_id: int, port: int = PORT) -> PolicyEntry:
    return PolicyEntry(HOST, remote_id, Direction.EGRESS, TCP, port, port, Verdict.ALLOW, BOOT_RULE)


def verdict(view: HostView, src: str, dst: str, port: int, proto: int = TCP, direction=Direction.EGRESS) -> Verdict:
    return view_model(view, NOW).judge(src, dst, proto, port, direction).verdict


def test_bootstrap_ipv4_allows_the_channel_and_nothing_else():
    view = bootstrap_view("edge", [V4], BOOT_RULE)
    assert view.ipcache == {f"{HOST_V4}/32": (HOST, ""), f"{CTL_V4}/32": (CONTROLLER, "")}
    assert view.entries == {allow_control(CONTROLLER)}
    assert not view.audit_default and view.rule_names == {BOOT_RULE: "bootstrap-control-channel"}
    assert check_control_channel(view, [V4], NOW) is None
    assert verdict(view, HOST_V4, CTL_V4, PORT) == Verdict.ALLOW
    denied = [(HOST_V4, CTL_V4, PORT + 1, TCP, Direction.EGRESS),      # another port of the controller
              (HOST_V4, CTL_V4, PORT, UDP, Direction.EGRESS),          # another protocol
              (HOST_V4, CTL2_V4, PORT, TCP, Direction.EGRESS),         # another address
              (CTL_V4, HOST_V4, PORT, TCP, Direction.INGRESS),         # the controller opening a connection
              ("10.9.0.99", CTL_V4, PORT, TCP, Direction.EGRESS)]      # not this host's source address
    assert [verdict(view, *flow) for flow in denied] == [Verdict.DENY] * len(denied)


def test_bootstrap_ipv6_uses_128_prefixes():
    view = bootstrap_view("edge", [V6], BOOT_RULE)
    assert view.ipcache == {f"{HOST_V6}/128": (HOST, ""), f"{CTL_V6}/128": (CONTROLLER, "")}
    assert view.entries == {allow_control(CONTROLLER)}
    assert check_control_channel(view, [V6], NOW) is None
    assert verdict(view, HOST_V6, CTL_V6, PORT + 1) == Verdict.DENY
    assert check_control_channel(view, [V4], NOW) is not None, "an IPv6 bootstrap opens nothing in IPv4"


def test_bootstrap_two_controllers_each_on_its_own_port():
    flows, problems = control_flows([f"{CTL_V4}:{PORT}", f"{CTL2_V4}:{PORT + 1}"], crosses=lambda remote: True,
                                    resolve=lambda host, port: [host], local_of=lambda remote, port: HOST_V4)
    assert problems == [] and len(flows) == 2
    view = bootstrap_view("edge", flows, BOOT_RULE)
    assert view.ipcache == {f"{HOST_V4}/32": (HOST, ""), f"{CTL_V4}/32": (CONTROLLER, ""),
                            f"{CTL2_V4}/32": (CONTROLLER, "")}
    assert view.entries == {allow_control(CONTROLLER, PORT), allow_control(CONTROLLER, PORT + 1)}
    assert check_control_channel(view, flows, NOW) is None
    # One identity for both controllers: each port opens to both, nothing more.
    assert verdict(view, HOST_V4, CTL_V4, PORT + 2) == Verdict.DENY


def test_bootstrap_leaves_out_a_controller_not_crossing_an_enforced_interface():
    flows, _ = control_flows([f"{CTL_V4}:{PORT}", f"{CTL2_V4}:{PORT + 1}"], crosses=lambda remote: remote == CTL_V4,
                             resolve=lambda host, port: [host], local_of=lambda remote, port: HOST_V4)
    view = bootstrap_view("edge", flows, BOOT_RULE)
    assert view.ipcache == {f"{HOST_V4}/32": (HOST, ""), f"{CTL_V4}/32": (CONTROLLER, "")}
    assert view.entries == {allow_control(CONTROLLER)}


def test_bootstrap_controller_on_this_host_stays_the_host():
    flow = ControlFlow(f"127.0.0.1:{PORT}", "127.0.0.1", "127.0.0.1", PORT)
    view = bootstrap_view("edge", [flow], BOOT_RULE)
    assert view.ipcache == {"127.0.0.1/32": (HOST, "")}
    assert view.entries == {allow_control(HOST)}
    assert check_control_channel(view, [flow], NOW) is None


class DictMap:
    """A BPF map as a dict: what loader.tables reads and writes."""

    def __init__(self, max_entries: int, map_type: int = 1):
        self.max_entries, self.map_type, self.d = max_entries, map_type, {}

    def items(self):
        return list(self.d.items())

    def lookup(self, key):
        return self.d.get(key)

    def update(self, key, value):
        self.d[key] = value

    def update_batch(self, pairs):
        self.d.update(pairs)

    def delete_batch(self, keys):
        for k in keys:
            del self.d[k]


class DictDatapath:
    """A freshly loaded datapath's maps, without a kernel (hash identities)."""

    instance = "failsafe-unit"

    def __init__(self):
        self.ipcache, self.plens, self.policy = DictMap(1024), DictMap(4), DictMap(1024)
        self.ranges, self.rules, self.gen = DictMap(64, map_type=2), DictMap(BOOT_RULE + 1, 2), DictMap(1, 2)
        self.epoch = 0

    def bump_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def maps_content(self) -> tuple:
        maps = (self.ipcache, self.policy, self.gen)
        return tuple(sorted((bytes(k), bytes(v)) for k, v in m.d.items()) for m in maps)


def agent_on(dp, tmp_path, **kw) -> FleetAgent:
    return FleetAgent(dp, FleetOptions(controllers=[f"{CTL_V4}:{PORT}"], host="edge", state_dir=str(tmp_path), **kw))


def test_agent_bootstraps_a_blank_datapath_then_the_first_state_replaces_it(tmp_path, caplog):
    dp = DictDatapath()
    agent = agent_on(dp, tmp_path / "ws")
    with caplog.at_level("INFO", logger="dataplane.agent"):
        applied = agent.bootstrap([V4])
    assert applied == bootstrap_view("edge", [V4], BOOT_RULE), "the rule id is the last counter's"
    assert [r.getMessage() for r in caplog.records] == [
        f"no state in the datapath yet: bootstrap state applied, allowing only {HOST_V4} -> {CTL_V4}:{PORT}/tcp "
        "until the controller's first state"]
    # Written through the generation switch: both generations hold it, the live one flipped.
    assert tables.active_generation(dp) == 1 and dp.epoch == 1
    for gen in (0, 1):
        assert tables.read_identities(dp, gen) == {ip_network(f"{HOST_V4}/32"): HOST, ip_network(f"{CTL_V4}/32"):
                                                   CONTROLLER}
        assert tables.read_policy(dp, gen)[0] == {(HOST, CONTROLLER, PORT, TCP, Direction.EGRESS):
                                                  (Verdict.ALLOW, BOOT_RULE)}
    model = Model.from_datapath(dp)
    assert model.judge(HOST_V4, CTL_V4, TCP, PORT, Direction.EGRESS).verdict == Verdict.ALLOW
    assert model.judge(HOST_V4, CTL_V4, TCP, 22, Direction.EGRESS).reason == Reason.DROP_POLICY_DEFAULT
    # Nothing recorded as applied: the controller is told revision 0 and sends a snapshot.
    assert agent.view is None and agent.ws.read_applied() is None and agent.hello().hello.revision == 0
    assert agent.names.rule(BOOT_RULE) == "bootstrap-control-channel"

    first = view_of(WEB + ALLOW_CONTROL)
    error, _ = agent.apply(first)
    assert error == ""
    live = Model.from_datapath(dp)
    assert tables.read_identities(dp) == {ip_network(p): i for p, (i, _) in first.ipcache.items()}
    assert CONTROLLER not in tables.read_identities(dp).values()
    assert live.judge(HOST_V4, CTL_V4, TCP, PORT, Direction.EGRESS).verdict == Verdict.ALLOW


def test_agent_restart_after_a_state_does_not_bootstrap(tmp_path):
    """Fail-static: a restarted agent leaves the state in force, whether its
    workspace remembers it or not."""
    dp = DictDatapath()
    assert agent_on(dp, tmp_path / "ws").apply(view_of(WEB + ALLOW_CONTROL))[0] == ""
    before = dp.maps_content()
    assert agent_on(dp, tmp_path / "ws").bootstrap([V4]) is None
    assert agent_on(dp, tmp_path / "other-ws").bootstrap([V4]) is None
    assert dp.maps_content() == before and dp.epoch == 1


def test_agent_restart_after_a_bootstrap_keeps_it(tmp_path):
    dp = DictDatapath()
    assert agent_on(dp, tmp_path / "ws").bootstrap([V4]) is not None
    before = dp.maps_content()
    assert agent_on(dp, tmp_path / "ws").bootstrap([V4, V6]) is None
    assert dp.maps_content() == before and dp.epoch == 1


def test_no_bootstrap_over_audit_mode_or_a_recorded_state(tmp_path):
    audit = DictDatapath()
    tables.set_active_generation(audit, 0, audit_default=True)
    assert agent_on(audit, tmp_path / "a").bootstrap([V4]) is None
    assert tables.live_audit_default(audit) and not tables.read_identities(audit)

    recorded = DictDatapath()
    agent = agent_on(recorded, tmp_path / "b")
    agent.ws.write_applied({"host": "edge", "revision": 3, "entries": 0})
    assert agent.bootstrap([V4]) is None
    assert recorded.maps_content() == DictDatapath().maps_content()


def test_no_bootstrap_when_no_controller_crosses_an_enforced_interface(tmp_path):
    agent = FleetAgent(UntouchableDatapath(), FleetOptions(controllers=[f"127.0.0.1:{PORT}"], host="edge",
                                                           interfaces=["dpnosuchif0"], state_dir=str(tmp_path)))
    assert agent.bootstrap() is None       # the maps were not even read
    assert loopback_agent(tmp_path, netns="no-such-namespace-here").bootstrap() is None


def test_loopback_controller_on_an_enforced_lo_is_bootstrapped(tmp_path):
    """Real routing: the controller on loopback, lo enforced."""
    dp = DictDatapath()
    agent = FleetAgent(dp, FleetOptions(controllers=[f"127.0.0.1:{PORT}"], host="edge", interfaces=["lo"],
                                        state_dir=str(tmp_path)))
    assert agent.bootstrap() is not None
    assert tables.read_identities(dp) == {ip_network("127.0.0.1/32"): HOST}
    assert Model.from_datapath(dp).judge("127.0.0.1", "127.0.0.1", TCP, PORT, Direction.EGRESS).verdict == \
        Verdict.ALLOW
