"""What controllers and agents share: the controller's state model (policy
revisions, inventory, registrations, sessions, numbering) and the host
state they exchange, with its digest and deltas.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json

from dataplane.compiler import EXPIRES_MAX, CompiledState, Compiler
from dataplane.identity import Allocator
from dataplane.inventory import Endpoint, Host, Inventory, Session, parse_inventory
from dataplane.policy import Policy, parse_policy
from dataplane.source import loads
from dataplane.v1 import state_pb2
from loader.errors import DataplaneError
from loader.tables import PolicyEntry

EMPTY_POLICY = "apiVersion: zt-dataplane/v1\nkind: Policy\nrules: []\n"
EMPTY_INVENTORY = "apiVersion: zt-dataplane/v1\nkind: Inventory\n"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class FrozenAllocator(Allocator):
    """The numbers a state has; asking for a new one is a bug (the leader
    allocates numbers when it commits, followers only read them)."""

    def __init__(self, numbers: dict, what: str):
        super().__init__(None, what=what)
        self.numbers = dict(numbers)

    def number(self, key: str) -> int:
        try:
            return self.numbers[key]
        except KeyError:
            raise DataplaneError(f"no {self.what} number for {key}: the state was committed without it") from None


@dataclasses.dataclass
class State:
    """The controller's records at one revision, as stored (JSON values)."""

    revision: int = 0
    active_policy: int = 0
    policies: dict = dataclasses.field(default_factory=dict)       # number -> record
    inventory_text: str = EMPTY_INVENTORY
    agents: dict = dataclasses.field(default_factory=dict)         # host -> registration
    sessions: dict = dataclasses.field(default_factory=dict)       # id -> record
    identities: dict = dataclasses.field(default_factory=dict)     # canonical -> number
    rules: dict = dataclasses.field(default_factory=dict)          # name -> number

    @classmethod
    def from_rows(cls, rows: dict) -> "State":
        s = cls()
        meta = json.loads(rows.get("meta", "{}"))
        s.revision = meta.get("revision", 0)
        s.active_policy = meta.get("active_policy", 0)
        for key, value in rows.items():
            kind, _, name = key.partition("/")
            if kind == "policy":
                s.policies[int(name)] = json.loads(value)
            elif kind == "inventory":
                s.inventory_text = json.loads(value)["text"]
            elif kind == "agent":
                s.agents[name] = json.loads(value)
            elif kind == "session":
                s.sessions[name] = json.loads(value)
            elif kind == "identity":
                s.identities[value] = int(name)
            elif kind == "rule":
                s.rules[name] = int(value)
        return s

    def policy_text(self) -> str:
        return self.policies[self.active_policy]["text"] if self.active_policy else EMPTY_POLICY

    def policy(self) -> Policy:
        data, where = loads(self.policy_text(), f"policy revision {self.active_policy}")
        return parse_policy(data, where)

    def declared(self) -> Inventory:
        """The inventory as declared (parsed once per text: a fleet's
        inventory is large, and every agent's hello asks)."""
        cached = self.__dict__.get("_declared")
        if cached is None or cached[0] is not self.inventory_text:
            cached = (self.inventory_text, parse_inventory(*loads(self.inventory_text, "inventory")))
            cached = cached + (frozenset(h.name for h in cached[1].hosts),)
            self.__dict__["_declared"] = cached
        return cached[1]

    def declared_hosts(self) -> set[str]:
        self.declared()
        return set(self.__dict__["_declared"][2])

    def inventory(self) -> Inventory:
        """The declared inventory, plus what declared hosts' agents registered
        (their addresses and endpoints), plus the open sessions."""
        declared = self.declared()
        hosts = list(declared.hosts)
        endpoints = list(declared.endpoints)
        known_hosts = {h.name for h in hosts}
        known_eps = {e.name for e in endpoints}
        for host, reg in sorted(self.agents.items()):
            if host not in known_hosts:
                continue
            addrs = tuple(ipaddress.ip_address(a) for a in reg.get("addresses", []))
            for i, h in enumerate(hosts):
                if h.name == host and not h.addresses and addrs:
                    hosts[i] = Host(h.name, addrs, h.labels, h.where)
            for ep in reg.get("endpoints", []):
                if ep["name"] in known_eps:
                    continue
                endpoints.append(Endpoint(ep["name"], host, tuple(ipaddress.ip_address(a) for a in ep["addresses"]),
                                          dict(ep.get("labels", {})), f"agent {host}"))
        sessions = [session_from_record(r) for _, r in sorted(self.sessions.items())]
        return Inventory(tuple(hosts), tuple(endpoints), tuple(sessions), declared.networks, "inventory")

    def compile_inputs(self) -> str:
        """A fingerprint of everything host states are compiled from. Two
        states with the same fingerprint compile to the same host states
        (at the same time): an agent registering only its interfaces, say."""
        active = self.policies.get(self.active_policy, {})
        data = [active.get("text"), self.inventory_text,
                {h: [r.get("addresses"), r.get("endpoints")] for h, r in self.agents.items()},
                self.sessions, self.identities, self.rules]
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

    def compiler(self, now: dt.datetime | None = None, allocate: bool = False) -> Compiler:
        """A compiler over this state. allocate=True (the leader, before a
        commit) hands out numbers for new label sets and rule names."""
        if allocate:
            ids = Allocator(None)
            ids.numbers = dict(self.identities)
            ids._next = max([ids.first - 1, *ids.numbers.values()]) + 1
            rules = Allocator(None, first=1, what="rule")
            rules.numbers = dict(self.rules)
            rules._next = max([0, *rules.numbers.values()]) + 1
        else:
            ids, rules = FrozenAllocator(self.identities, "identity"), FrozenAllocator(self.rules, "rule")
        return Compiler(self.policy(), self.inventory(), ids, rules, now)


def session_from_record(r: dict) -> Session:
    expires = dt.datetime.fromisoformat(r["expires"]) if r.get("expires") else None
    return Session(r["id"], r["user"], tuple(sorted(r.get("groups", []))), dict(r.get("device", {})),
                   tuple(ipaddress.ip_address(a) for a in r["addresses"]), expires, f"session {r['id']}",
                   r.get("host") or None)


# --- host states on the wire ---------------------------------------------------

def _entry_msg(e: PolicyEntry) -> state_pb2.PolicyEntry:
    return state_pb2.PolicyEntry(local_id=e.local_id, remote_id=e.remote_id, direction=e.direction, proto=e.proto,
                                 port_lo=e.port_lo, port_hi=e.port_hi, action=e.action, rule_id=e.rule_id)


def _entry_of(m) -> PolicyEntry:
    return PolicyEntry(m.local_id, m.remote_id, m.direction, m.proto, m.port_lo, m.port_hi, m.action, m.rule_id)


@dataclasses.dataclass
class HostView:
    """One host's state in plain Python: what both ends diff and apply."""

    revision: int
    host: str
    ipcache: dict           # prefix text -> (identity, expires text or "")
    entries: frozenset      # PolicyEntry
    audit_default: bool
    rule_names: dict
    identity_labels: dict
    locals: list
    next_change: str = ""

    @classmethod
    def of(cls, st: CompiledState, revision: int) -> "HostView":
        from dataplane.identity import render

        if st.ipcache_text is not None:
            exp = st.expiry_text or {}
            ipcache = {t: (i, exp.get(t, "")) for t, i in st.ipcache_text.items()}
        else:
            ipcache = {str(n): (i, st.expiries[n].astimezone(dt.timezone.utc).isoformat() if n in st.expiries
                                else "") for n, i in st.identities.items()}
        rendered = st.rendered if st.rendered is not None else {n: render(lab) for n, lab in st.labels.items()}
        return cls(revision, st.host, ipcache, frozenset(st.entries), st.audit_default,
                   {i: n for n, i in st.rule_ids.items()}, dict(rendered),
                   list(st.locals), st.next_change.isoformat() if st.next_change else "")

    def digest(self) -> str:
        """Of what the datapath enforces (ipcache, entries, mode); computed once per view."""
        cached = self.__dict__.get("_digest")
        if cached is not None:
            return cached
        h = hashlib.sha256()
        h.update("\n".join(f"{p}\t{i}\t{e}" for p, (i, e) in sorted(self.ipcache.items())).encode())
        h.update(b"\0")
        h.update("\n".join(f"{e.local_id},{e.remote_id},{e.direction},{e.proto},{e.port_lo},{e.port_hi},"
                           f"{e.action},{e.rule_id}" for e in sorted(self.entries)).encode())
        h.update(b"audit" if self.audit_default else b"enforce")
        self.__dict__["_digest"] = h.hexdigest()[:32]
        return self.__dict__["_digest"]

    def to_msg(self) -> state_pb2.HostState:
        return state_pb2.HostState(
            revision=self.revision, host=self.host,
            ipcache=[state_pb2.IpEntry(prefix=p, identity=i, expires=e) for p, (i, e) in sorted(self.ipcache.items())],
            entries=[_entry_msg(e) for e in sorted(self.entries)], audit_default=self.audit_default,
            rule_names=self.rule_names, identity_labels=self.identity_labels, locals=self.locals,
            digest=self.digest(), next_change=self.next_change)

    @classmethod
    def from_msg(cls, m) -> "HostView":
        return cls(m.revision, m.host, {e.prefix: (e.identity, e.expires) for e in m.ipcache},
                   frozenset(_entry_of(e) for e in m.entries), m.audit_default, dict(m.rule_names),
                   dict(m.identity_labels), list(m.locals), m.next_change)

    def delta_to(self, new: "HostView") -> state_pb2.HostDelta:
        put = [state_pb2.IpEntry(prefix=p, identity=v[0], expires=v[1]) for p, v in sorted(new.ipcache.items())
               if self.ipcache.get(p) != v]
        gone = sorted(p for p in self.ipcache if p not in new.ipcache)
        return state_pb2.HostDelta(
            from_revision=self.revision, revision=new.revision, ipcache_put=put, ipcache_delete=gone,
            entries_add=[_entry_msg(e) for e in sorted(new.entries - self.entries)],
            entries_delete=[_entry_msg(e) for e in sorted(self.entries - new.entries)],
            audit_default=new.audit_default, rule_names=new.rule_names, identity_labels=new.identity_labels,
            locals=new.locals, digest=new.digest(), next_change=new.next_change)

    def apply_delta(self, d) -> "HostView":
        ipcache = dict(self.ipcache)
        for p in d.ipcache_delete:
            ipcache.pop(p, None)
        for e in d.ipcache_put:
            ipcache[e.prefix] = (e.identity, e.expires)
        entries = (self.entries - {_entry_of(e) for e in d.entries_delete}) | {_entry_of(e) for e in d.entries_add}
        return HostView(d.revision, self.host, ipcache, frozenset(entries), d.audit_default, dict(d.rule_names),
                        dict(d.identity_labels), list(d.locals), d.next_change)

    def loader_ipcache(self, wall_now: dt.datetime | None = None, mono_now: int | None = None) -> dict:
        """For loader.tables.apply_state: expiries in CLOCK_MONOTONIC seconds."""
        import math

        from loader.tables import monotonic_seconds

        wall_now = wall_now or utcnow()
        mono_now = monotonic_seconds() if mono_now is None else mono_now
        out = {}
        for p, (ident, expires) in self.ipcache.items():
            if expires:
                left = (dt.datetime.fromisoformat(expires) - wall_now).total_seconds()
                out[ipaddress.ip_network(p)] = (ident, min(EXPIRES_MAX, max(1, mono_now + math.ceil(left))))
            else:
                out[ipaddress.ip_network(p)] = ident
        return out
