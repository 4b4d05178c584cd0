"""Policy + inventory -> exactly the map content one host needs.

For host H:
- every address the inventory knows (all hosts' endpoints, hosts, live
  sessions, networks) and every CIDR the policy names goes into the ipcache
  with the identity of its label set; H's own addresses get the reserved
  host identity (1);
- for each rule in force now, for each identity local to H (H itself and
  H's endpoints): if it is a destination of the rule, ingress entries for
  every source identity; if it is a source, egress entries for every
  destination identity. `entity: any` becomes the wildcard.

The output is deterministic (golden-file tested) and says when it next
changes by itself (a rule's validity window or a session's expiry), so the
agent can apply it again then.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json

from dataplane.identity import Allocator, Requirement, Selector, canonical, render
from dataplane.inventory import Inventory
from dataplane.policy import PROTOCOL_NAMES, Peer, Policy, Rule
from loader.abi import Direction, ReservedIdentity, Verdict
from loader.tables import PolicyEntry

ANY, HOST, WORLD = ReservedIdentity.ANY, ReservedIdentity.HOST, ReservedIdentity.WORLD
RESERVED_LABELS = {ANY: "reserved:any", HOST: "reserved:host", WORLD: "reserved:world"}
_WORLD_KEY = "reserved:world"
EXPIRES_MAX = 2 ** 32 - 1         # the datapath's expires_s is a u32 of CLOCK_MONOTONIC seconds


def _utc(t: dt.datetime) -> dt.datetime:
    """t in UTC. A time the calendar cannot hold there (9999-12-31 at a negative
    offset; the parsers refuse it, records of other origins may carry it)
    becomes the calendar's first or last instant: a little earlier, never later."""
    try:
        return t.astimezone(dt.timezone.utc)
    except OverflowError:
        end = dt.datetime.max if t.year == dt.MAXYEAR else dt.datetime.min
        return end.replace(tzinfo=dt.timezone.utc)


@dataclasses.dataclass
class CompiledState:
    host: str
    identities: dict              # network -> identity number (ipcache content)
    entries: list                 # PolicyEntry, sorted
    audit_default: bool
    rule_ids: dict                # rule name -> rule id, for the rules of the policy
    labels: dict                  # identity number -> label set (dict)
    locals: list                  # identity numbers local to this host
    warnings: list
    next_change: dt.datetime | None
    expiries: dict = dataclasses.field(default_factory=dict)   # network -> when its entry ends (sessions)
    # The same content as text, shared with other hosts where it can be (fleet views):
    ipcache_text: dict | None = None     # prefix text -> identity
    expiry_text: dict | None = None      # prefix text -> RFC 3339 end
    rendered: dict | None = None         # identity -> rendered labels

    def rule_names(self) -> dict:
        return {v: k for k, v in self.rule_ids.items()}

    def to_json(self) -> dict:
        """The golden-file form: readable, stable, diffable."""
        names = self.rule_names()
        used = {e.local_id for e in self.entries} | {e.remote_id for e in self.entries} | \
            set(self.identities.values()) | set(self.locals)
        return {
            "host": self.host,
            "mode": "audit" if self.audit_default else "enforce",
            "locals": sorted(self.locals),
            "identities": {str(n): RESERVED_LABELS.get(n) or render(self.labels[n]) for n in sorted(used)
                           if n in self.labels or n in RESERVED_LABELS},
            "ipcache": {str(net): n for net, n in sorted(self.identities.items(), key=lambda kv: _netkey(kv[0]))},
            "rules": dict(sorted(self.rule_ids.items(), key=lambda kv: kv[1])),
            # One line per entry: local, remote, direction, ports, action, rule.
            "entries": [f"{e.local_id} {'any' if e.remote_id == ANY else e.remote_id} "
                        f"{Direction(e.direction).name.lower()} {_ports_text(e.proto, e.port_lo, e.port_hi)} "
                        f"{Verdict(e.action).name.lower()} {names.get(e.rule_id, e.rule_id)}"
                        for e in self.entries],
            "next_change": self.next_change.isoformat() if self.next_change else None,
            **({"expires": {str(net): _utc(t).isoformat()
                            for net, t in sorted(self.expiries.items(), key=lambda kv: _netkey(kv[0]))}}
               if self.expiries else {}),
        }

    def ipcache(self, wall_now: dt.datetime | None = None, mono_now: int | None = None) -> dict:
        """The ipcache content for loader.tables: network -> identity, or ->
        (identity, expires_s) where a session ends, its end converted to the
        CLOCK_MONOTONIC seconds the datapath compares with. An end later than
        the u32 field holds (about 136 years after boot) is clamped to its
        largest value: earlier than written, never wrapped round to sooner."""
        import math

        from loader.tables import monotonic_seconds

        wall_now = wall_now or dt.datetime.now(dt.timezone.utc)
        mono_now = monotonic_seconds() if mono_now is None else mono_now
        out = dict(self.identities)
        for net, t in self.expiries.items():
            out[net] = (out[net], min(EXPIRES_MAX, max(1, mono_now + math.ceil((t - wall_now).total_seconds()))))
        return out

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"


def _ports_text(proto: int, lo: int, hi: int) -> str:
    if proto == 0:
        return "any"
    name = PROTOCOL_NAMES.get(proto, str(proto))
    if (lo, hi) == (0, 65535):
        return name
    return f"{name}/{lo}" if lo == hi else f"{name}/{lo}-{hi}"


def _netkey(net):
    return (net.version, int(net.network_address), net.prefixlen)


def _host_prefix(addr) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network((addr, addr.max_prefixlen))


@dataclasses.dataclass
class _Identity:
    labels: dict
    prefixes: list
    origin: str                   # where it came from, for messages
    expires: dt.datetime | None = None


class Compiler:
    """Compiles one policy and inventory for any number of hosts, sharing
    the identity and rule numbering (persisted by the allocators)."""

    def __init__(self, policy: Policy, inventory: Inventory, identity_numbers: Allocator,
                 rule_numbers: Allocator, now: dt.datetime | None = None):
        self.policy = policy
        self.inventory = inventory
        self.ids = identity_numbers
        self.rules = rule_numbers
        self.now = now or dt.datetime.now(dt.timezone.utc)
        self._universe = self._build_universe()
        # Number label sets in a fixed order, so a fresh allocator numbers
        # the same policy the same way every time.
        self._numbers = {key: self.ids.number(key) for key in sorted(self._universe)}
        self.rule_ids = {r.name: self.rules.number(r.name) for r in policy.rules}
        self._cidr_parents = self._nest_cidrs()
        # What every host shares; compile() only swaps in the host's own
        # identity (HOST), so a fleet of hosts costs one pass over the
        # universe, not one per host.
        self._base_labels = {self._numbers[k]: ident.labels for k, ident in self._universe.items()}
        self._base_identities = {net: self._numbers[key] for key, ident in self._universe.items()
                                 for net in ident.prefixes}
        self._base_text = {str(net): n for net, n in self._base_identities.items()}
        self._expiry_text = {str(net): _utc(t).isoformat() for net, t in self._expiries.items()}
        self._base_rendered: dict | None = None
        self._resolved: dict[int, set] = {}     # id(peer) -> its identities in the shared numbering

    # -- the identities that exist ----------------------------------------------

    def _build_universe(self) -> dict[str, _Identity]:
        universe: dict[str, _Identity] = {}
        claimed: dict = {}
        self.universe_warnings: list[str] = []

        self._expiries: dict = {}

        def add(labels: dict, prefixes, origin: str, expires: dt.datetime | None = None) -> None:
            key = canonical(labels)
            ident = universe.setdefault(key, _Identity(labels, [], origin))
            for net in prefixes:
                if net in claimed and claimed[net] != key:
                    self.universe_warnings.append(f"{origin}: {net} is already claimed by "
                                                  f"{universe[claimed[net]].origin}; ignored here")
                    continue
                if net not in claimed:
                    claimed[net] = key
                    ident.prefixes.append(net)
                    if expires is not None:
                        self._expiries[net] = expires

        inv = self.inventory
        for h in inv.hosts:
            add(h.identity_labels(), [_host_prefix(a) for a in h.addresses], h.where)
        for e in inv.endpoints:
            add(e.identity_labels(), [_host_prefix(a) for a in e.addresses], e.where)
        for s in inv.sessions:
            if s.live_at(self.now):
                add(s.identity_labels(), [_host_prefix(a) for a in s.addresses], s.where, s.expires)
        for n in inv.networks:
            add(n.identity_labels(), list(n.cidrs), n.where)
        for rule in self.policy.rules:
            for peer in rule.sources + rule.destinations:
                if peer.kind == "cidr" and peer.cidr not in claimed:
                    add({"kind": "cidr", "cidr": str(peer.cidr)}, [peer.cidr], peer.where)
        return universe

    def _nest_cidrs(self) -> dict[str, str]:
        """Each CIDR a rule named (kind=cidr) -> the identity it was carved
        out of: the most specific network or other named CIDR holding it, or
        the world when the inventory knows nothing around it."""
        blocks = [(key, p) for key, ident in self._universe.items()
                  if ident.labels.get("kind") in ("network", "cidr") for p in ident.prefixes]
        parents = {}
        for key, ident in self._universe.items():
            if ident.labels.get("kind") != "cidr" or not ident.prefixes:
                continue
            mine = ident.prefixes[0]
            around = [(p.prefixlen, other) for other, p in blocks
                      if other != key and p.version == mine.version and p != mine and mine.subnet_of(p)]
            parents[key] = max(around)[1] if around else _WORLD_KEY
        return parents

    # -- one host ------------------------------------------------------------------

    def compile(self, host: str) -> CompiledState:
        host_entry = self.inventory.host(host)
        own_key = canonical(host_entry.identity_labels()) if host_entry else None

        numbers = dict(self._numbers)
        labels = dict(self._base_labels)
        identities = dict(self._base_identities)
        text = dict(self._base_text)
        own = self._numbers.get(own_key) if own_key is not None else None
        if own is not None:
            numbers[own_key] = HOST
            del labels[own]
            labels[HOST] = self._universe[own_key].labels
            for net in self._universe[own_key].prefixes:
                identities[net] = HOST
                text[str(net)] = HOST
        if host_entry is None:
            labels[HOST] = {"kind": "host", "name": host}

        locals_ = {HOST} | {numbers[canonical(e.identity_labels())] for e in self.inventory.endpoints
                            if e.host == host}
        # A device running an agent enforces for the sessions on it.
        locals_ |= {numbers[canonical(s.identity_labels())] for s in self.inventory.sessions
                    if s.host == host and s.live_at(self.now) and canonical(s.identity_labels()) in numbers}
        warnings = list(self.universe_warnings)
        entries: list[PolicyEntry] = []
        for rule in self.policy.rules:
            if not rule.active_at(self.now):
                continue
            shared = own if host_entry is not None else False
            sources = self._resolve_all(rule, rule.sources, labels, numbers, warnings, shared)
            destinations = self._resolve_all(rule, rule.destinations, labels, numbers, warnings, shared)
            entries += self._entries(rule, sources, destinations, locals_)

        return CompiledState(
            host=host,
            identities=identities,
            entries=sorted(set(entries)),
            audit_default=self.policy.mode == "audit",
            rule_ids=dict(self.rule_ids),
            labels=labels,
            locals=sorted(locals_),
            warnings=warnings,
            next_change=self._next_change(),
            expiries=dict(self._expiries),
            ipcache_text=text,
            expiry_text=self._expiry_text,
            rendered=self._rendered(labels, own),
        )

    def _rendered(self, labels: dict, own: int | None) -> dict:
        """identity -> rendered labels, from a shared base."""
        if self._base_rendered is None:
            self._base_rendered = {n: render(lab) for n, lab in self._base_labels.items()}
        out = dict(self._base_rendered)
        if own is not None:
            del out[own]
        if HOST in labels:
            out[HOST] = render(labels[HOST])
        return out

    def _resolve_all(self, rule: Rule, peers, labels: dict, numbers: dict, warnings: list,
                     shared=False) -> set[int]:
        """shared: the host's own identity number (or None) when labels and
        numbers are the shared ones with only that identity turned into
        HOST, so a peer's resolution can be taken from the shared cache;
        False: resolve from scratch."""
        out: set[int] = set()
        for peer in peers:
            if shared is not False and peer.kind != "entity":
                base = self._resolved.get(id(peer))
                if base is None:
                    base = self._resolved[id(peer)] = self._resolve(peer, self._base_labels, self._numbers)
                got = (base - {shared}) | {HOST} if shared is not None and shared in base else set(base)
            else:
                got = self._resolve(peer, labels, numbers)
            got = self._within(got, numbers)
            if rule.posture is not None:
                if ANY in got:
                    # "Anyone, on a device in this posture": the wildcard cannot
                    # exclude users, so spell out every identity that passes,
                    # and the world (which has no device to judge).
                    got = {n for n in labels if n != ANY} | {WORLD}
                got = {n for n in got if self._posture_ok(rule.posture, labels.get(n))}
            if not got:
                warnings.append(f"{peer.where}: rule {rule.name!r}: {peer.describe()} matches no identity")
            out |= got
        return out

    @staticmethod
    def _posture_ok(posture: Selector, labels: dict | None) -> bool:
        """Posture conditions restrict users' sessions only."""
        if labels is None or labels.get("kind") != "user":
            return True
        device = Selector(tuple(Requirement(f"device.{r.label}", r.op, r.values) for r in posture.requirements))
        return device.matches(labels)

    def _within(self, got: set[int], numbers: dict) -> set[int]:
        """Adds the CIDRs rules name that lie inside what got selected.

        Addresses take the identity of their longest prefix, so naming
        10.80.0.192/26 in one rule gives those addresses an identity of their
        own, carved out of the named network (or the world) they sit in. They
        still belong there: whatever selects the enclosing network, the world
        or an enclosing CIDR selects them too."""
        def ancestors(key):
            while key in self._cidr_parents:
                key = self._cidr_parents[key]
                yield WORLD if key == _WORLD_KEY else numbers[key]

        return got | {numbers[key] for key in self._cidr_parents if any(a in got for a in ancestors(key))}

    def _resolve(self, peer: Peer, labels: dict, numbers: dict) -> set[int]:
        if peer.kind == "entity":
            return {{"any": ANY, "world": WORLD, "host": HOST}[peer.entity]}
        if peer.kind == "cidr":
            # Networks and CIDRs lying wholly inside; addresses of hosts,
            # endpoints and sessions inside keep their own identities.
            return {numbers[key] for key, ident in self._universe.items()
                    if ident.labels.get("kind") in ("network", "cidr") and ident.prefixes
                    and all(p.version == peer.cidr.version and p.subnet_of(peer.cidr) for p in ident.prefixes)}
        kind = None if peer.kind == "selector" else peer.kind
        return {n for n, lab in labels.items()
                if (kind is None or lab.get("kind") == kind) and peer.selector.matches(lab)}

    def _entries(self, rule: Rule, sources: set, destinations: set, locals_: set) -> list[PolicyEntry]:
        action = rule.action
        if self.policy.mode == "audit" and action == Verdict.DENY:
            action = Verdict.AUDIT
        rule_id = self.rule_ids[rule.name]
        out = []
        for side, remotes, direction in ((destinations, sources, Direction.INGRESS),
                                         (sources, destinations, Direction.EGRESS)):
            mine = locals_ if ANY in side else side & locals_
            if not mine:
                continue
            far = {ANY} if ANY in remotes else remotes
            for local in mine:
                for remote in far:
                    for pr in rule.ports:
                        out.append(PolicyEntry(local, remote, direction, pr.proto, pr.lo, pr.hi, action, rule_id))
        return out

    def _next_change(self) -> dt.datetime | None:
        times = []
        for r in self.policy.rules:
            times += [t for t in (r.not_before, r.not_after) if t is not None and t > self.now]
        times += [s.expires for s in self.inventory.sessions if s.expires is not None and s.expires > self.now]
        first = min(times, default=None)
        return _utc(first) if first else None
