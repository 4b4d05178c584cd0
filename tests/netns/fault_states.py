"""The two states of the kill-during-apply test and how to tell them apart in
the maps.

A is small: a server workload and four client addresses. B holds the same
four clients, relabelled, plus a generated bulk (remote workloads in teams,
named networks of /32 CIDRs, rules with many ports) that makes it tens of
thousands of ipcache and policy entries per generation, so that applying it
takes a while. The four clients probe the live state with real connections
to the server's TCP port PORT:

  both   allowed by A (exact port) and by B (a port range, another rule); its
         long-lived connection to port 8100 too (A and B: port ranges)
  aonly  allowed by A only
  bonly  allowed by B only
  never  denied by both (A: an explicit deny, B: no rule)

Every client address has a different identity in A and B, so a judgement
that mixed the two states (identities of one, policy of the other) would
deny even `both`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from dataplane.agent import Workspace, compile_for, load_sources
from dataplane.compiler import CompiledState
from loader import abi, tables
from loader.model import Model

HOST = "srv"
SERVER = "10.220.0.1"
CLIENTS = {"both": "10.220.0.11", "aonly": "10.220.0.12", "bonly": "10.220.0.13", "never": "10.220.0.14"}
PORT = 8000
ALLOWED = {"A": {"both", "aonly"}, "B": {"both", "bonly"}}

TEAM = 100                      # remote workloads per team: one rule's sources


@dataclasses.dataclass(frozen=True)
class Bulk:
    """B's generated part: entries = rules * TEAM * ports; prefixes =
    remotes + locals + networks * cidrs_per_network (+ the fixed ones)."""

    remotes: int = 2000
    locals: int = 40
    networks: int = 16
    cidrs_per_network: int = 1000
    rules: int = 10
    ports: int = 50

    @property
    def entries(self) -> int:
        return self.rules * TEAM * self.ports

    @property
    def prefixes(self) -> int:
        return self.remotes + self.locals + self.networks * self.cidrs_per_network


_FIXED_INVENTORY = """\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {{name: srv, address: 10.220.0.250}}
  - {{name: clients}}
endpoints:
  - {{name: svc, host: srv, address: 10.220.0.1, labels: {{app: svc}}}}
  - {{name: c-both, host: clients, address: 10.220.0.11, labels: {{app: both, state: {s}}}}}
  - {{name: c-aonly, host: clients, address: 10.220.0.12, labels: {{app: aonly, state: {s}}}}}
  - {{name: c-bonly, host: clients, address: 10.220.0.13, labels: {{app: bonly, state: {s}}}}}
  - {{name: c-never, host: clients, address: 10.220.0.14, labels: {{app: never, state: {s}}}}}
"""

POLICY_A = f"""\
apiVersion: zt-dataplane/v1
kind: Policy
metadata: {{name: fault-a}}
rules:
  - {{name: a-both, action: allow, from: [{{workload: {{app: both, state: a}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [tcp/{PORT}]}}
  - {{name: a-aonly, action: allow, from: [{{workload: {{app: aonly, state: a}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [tcp/{PORT}]}}
  - {{name: a-both-range, action: allow, from: [{{workload: {{app: both}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [tcp/8100-8199]}}
  - {{name: a-never, action: deny, from: [{{workload: {{app: never}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [tcp/{PORT}]}}
"""

_POLICY_B_HEAD = f"""\
apiVersion: zt-dataplane/v1
kind: Policy
metadata: {{name: fault-b}}
rules:
  - {{name: b-both, action: allow, from: [{{workload: {{app: both, state: b}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [tcp/{PORT - 10}-{PORT + 110}]}}
  - {{name: b-bonly, action: allow, from: [{{workload: {{app: bonly, state: b}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [tcp/{PORT}]}}
  - {{name: b-zones, action: allow, from: [{{network: {{zone: z1}}}}], to: [{{workload: {{app: svc}}}}],
     ports: [tcp/9000-9099, udp/53]}}
"""


def _addr(base: str, i: int) -> str:
    return str(ipaddress.IPv4Address(base) + i)


def inventory_a() -> str:
    return _FIXED_INVENTORY.format(s="a")


def inventory_b(bulk: Bulk) -> str:
    teams = bulk.remotes // TEAM
    lines = [_FIXED_INVENTORY.format(s="b").rstrip("\n")]
    lines += [f"  - {{name: l{k}, host: srv, address: {_addr('10.221.0.0', k)}, labels: {{app: loc{k}}}}}"
              for k in range(bulk.locals)]
    lines += [f"  - {{name: r{i}, host: clients, address: {_addr('10.222.0.0', i)}, "
              f"labels: {{app: r{i}, team: t{i % teams}}}}}" for i in range(bulk.remotes)]
    lines.append("networks:")
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    for n in range(bulk.networks):
        first = base + n * bulk.cidrs_per_network
        cidrs = ", ".join(f"{ipaddress.IPv4Address(first + j)}/32" for j in range(bulk.cidrs_per_network))
        lines.append(f"  - {{name: net-{n}, labels: {{zone: z{n}}}, cidrs: [{cidrs}]}}")
    return "\n".join(lines) + "\n"


def policy_b(bulk: Bulk) -> str:
    teams = bulk.remotes // TEAM
    lines = [_POLICY_B_HEAD.rstrip("\n")]
    for r in range(bulk.rules):
        ports = ", ".join(f"tcp/{20000 + r * bulk.ports + j}" for j in range(bulk.ports))
        lines.append(f"  - {{name: bulk-{r}, action: allow, from: [{{workload: {{team: t{r % teams}}}}}], "
                     f"to: [{{workload: {{app: loc{r % bulk.locals}}}}}], ports: [{ports}]}}")
    return "\n".join(lines) + "\n"


def write_sources(directory: Path, bulk: Bulk) -> dict[str, tuple[Path, Path]]:
    """A's and B's (policy, inventory) files under directory/a and directory/b."""
    out = {}
    for name, policy, inventory in (("A", POLICY_A, inventory_a()), ("B", policy_b(bulk), inventory_b(bulk))):
        d = directory / name.lower()
        d.mkdir(parents=True, exist_ok=True)
        (d / "policy.yaml").write_text(policy)
        (d / "inventory.yaml").write_text(inventory)
        out[name] = (d / "policy.yaml", d / "inventory.yaml")
    return out


def compile_states(sources: dict, state_dir: Path) -> dict[str, CompiledState]:
    """Compiles A then B in the agent's workspace and saves the numbers, so
    the agent, compiling the same files later, allocates nothing new and
    produces exactly these states."""
    ws = Workspace("unused", str(state_dir))
    states = {}
    for name in ("A", "B"):
        _, states[name] = compile_for(*load_sources(*map(str, sources[name])), HOST, ws)
        assert not states[name].warnings, (name, states[name].warnings)
    ws.save_numbers()
    return states


# --- what the maps hold -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class View:
    """One generation's content in comparable form."""

    identities: dict         # network -> identity
    policy: dict             # layout_policy's key -> (action, rule)
    range_sets: dict         # key -> ((lo, hi, rule, action), ...)
    audit_default: bool

    def size(self) -> int:
        return len(self.identities) + len(self.policy)


def expected_view(state: CompiledState) -> View:
    m = Model.from_entries(state.identities, state.entries, state.audit_default)
    return model_view(m)


def model_view(m: Model) -> View:
    # Model keeps its identities by prefix length for lookups; turned back into networks here.
    identities = {}
    for version, by_len in m._by_len.items():
        for plen, nets in by_len.items():
            for addr, ident in nets.items():
                identities[ipaddress.ip_network((addr, plen)) if version == 4
                           else ipaddress.IPv6Network((addr, plen))] = ident
    return View(identities, dict(m.policy), dict(m.range_sets), m.audit_default)


def generation_view(dp, gen: int) -> View:
    """Either generation as it is in the maps (the audit flag is the live one's)."""
    policy, cur = tables.read_policy(dp, gen)
    return View(tables.read_identities(dp, gen), policy, cur["sets"], tables.live_audit_default(dp))


def difference(got: View, want: View) -> str:
    """A short account of how two views differ ('' when equal)."""
    out = []
    for field in ("identities", "policy", "range_sets"):
        g, w = getattr(got, field), getattr(want, field)
        if g != w:
            missing = [k for k in w if k not in g]
            extra = [k for k in g if k not in w]
            changed = [k for k in w if k in g and g[k] != w[k]]
            out.append(f"{field}: {len(g)} vs {len(w)} wanted; missing {len(missing)} {missing[:3]}, "
                       f"extra {len(extra)} {extra[:3]}, changed {len(changed)} {changed[:3]}")
    if got.audit_default != want.audit_default:
        out.append(f"audit_default {got.audit_default} vs {want.audit_default}")
    return "; ".join(out)


def marker_keys(dp, state: CompiledState, other: CompiledState, gen: int) -> tuple:
    """An ipcache key and a policy key of `gen` that `state` has and `other`
    has not: present in that generation once the writer has put `state`'s
    identities, and then its policy, there."""
    lpm = dp.ipcache.map_type == 11   # BPF_MAP_TYPE_LPM_TRIE
    nets = [n for n in state.identities if n not in other.identities]
    keys = [k for k in tables.layout_policy(state.entries)[0] if k not in tables.layout_policy(other.entries)[0]]
    assert nets and keys, "the states must differ in both maps"
    net = min(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    local, remote, dport, proto, direction = min(keys)
    return (abi.ip_key(net, lpm, gen),
            abi.PolicyKey(local_id=local, remote_id=remote, dport=dport, proto=proto, dir=direction, gen=gen))
