"""The entitlement policy: one language for users on devices and for
workloads, parsed and validated with every error located (file:line).
docs/policy.md is the reference; this module is its implementation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import re
from pathlib import Path

from dataplane import source
from dataplane.identity import Requirement, Selector, label_value
from dataplane.source import SourceError, Where
from loader.abi import Verdict

API_VERSION = "zt-dataplane/v1"

PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "any": 0}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
ACTIONS = {"allow": Verdict.ALLOW, "deny": Verdict.DENY, "audit": Verdict.AUDIT}
PEER_KINDS = ("user", "workload", "host", "network", "selector", "cidr", "entity")
ENTITIES = ("any", "world", "host")
LABEL_NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9._/-]{0,62}[a-zA-Z0-9])?$")
RULE_NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9._-]{0,126}[a-zA-Z0-9])?$")


@dataclasses.dataclass(frozen=True)
class Peer:
    """One item of a rule's from/to list."""

    kind: str                       # one of PEER_KINDS
    selector: Selector | None = None
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    entity: str | None = None
    where: str = ""

    def describe(self) -> str:
        if self.kind == "cidr":
            return f"cidr {self.cidr}"
        if self.kind == "entity":
            return f"entity {self.entity}"
        reqs = ", ".join(f"{r.label} {r.op} {','.join(sorted(r.values))}".strip() for r in self.selector.requirements)
        return f"{self.kind} {{{reqs}}}"


@dataclasses.dataclass(frozen=True)
class PortRange:
    proto: int          # 0: any protocol
    lo: int             # 0, 65535: any port
    hi: int

    def text(self) -> str:
        if self.proto == 0:
            return "any"
        name = PROTOCOL_NAMES.get(self.proto, str(self.proto))
        if (self.lo, self.hi) == (0, 65535):
            return name
        return f"{name}/{self.lo}" if self.lo == self.hi else f"{name}/{self.lo}-{self.hi}"


ANY_PORT = (PortRange(0, 0, 65535),)


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    action: Verdict
    sources: tuple[Peer, ...]
    destinations: tuple[Peer, ...]
    ports: tuple[PortRange, ...]
    posture: Selector | None
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    where: str
    description: str = ""

    def active_at(self, now: dt.datetime) -> bool:
        return (self.not_before is None or now >= self.not_before) and \
               (self.not_after is None or now < self.not_after)


@dataclasses.dataclass(frozen=True)
class PolicyTest:
    name: str
    source: str         # an address, or kind:name (workload:api-1, user:alice, host:h1)
    destination: str
    proto: int
    port: int
    expect: Verdict
    where: str


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    mode: str                       # enforce | audit
    rules: tuple[Rule, ...]
    tests: tuple[PolicyTest, ...]
    file: str

    def rule(self, name: str) -> Rule:
        return next(r for r in self.rules if r.name == name)


# --- parsing helpers shared with the inventory -------------------------------------

class Problems:
    """Collects located problems; raise_if_any() raises them all at once."""

    def __init__(self, where: Where):
        self.where = where
        self.items: list[str] = []

    def add(self, path: tuple, message: str) -> None:
        self.items.append(f"{self.where.at(path)}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise SourceError(self.items)


def expect_map(p: Problems, value, path: tuple, what: str, fields: dict) -> dict | None:
    """Checks a mapping's type, its required fields and that it has no
    unknown ones. fields: name -> required (bool)."""
    if not isinstance(value, dict):
        p.add(path, f"{what} must be a mapping, not {_typename(value)}")
        return None
    for key in value:
        if key not in fields:
            known = ", ".join(sorted(fields))
            p.add(path + (key,), f"unknown field {key!r} in {what} (known: {known})")
    for key, required in fields.items():
        if required and key not in value:
            p.add(path, f"{what} needs {key!r}")
    return value


def expect_list(p: Problems, value, path: tuple, what: str, allow_empty: bool = False) -> list:
    if not isinstance(value, list):
        p.add(path, f"{what} must be a list, not {_typename(value)}")
        return []
    if not value and not allow_empty:
        p.add(path, f"{what} must not be empty")
    return value


def expect_str(p: Problems, value, path: tuple, what: str) -> str | None:
    if not isinstance(value, str) or not value:
        p.add(path, f"{what} must be a non-empty string, not {_typename(value)}")
        return None
    return value


def parse_time(p: Problems, value, path: tuple, what: str) -> dt.datetime | None:
    if not isinstance(value, str):
        p.add(path, f"{what} must be an RFC 3339 time such as 2026-12-31T00:00:00Z, not {_typename(value)}")
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        p.add(path, f"{what}: {value!r} is not an RFC 3339 time such as 2026-12-31T00:00:00Z")
        return None
    if t.tzinfo is None:
        p.add(path, f"{what}: {value!r} has no time zone (add Z or an offset)")
        return None
    try:
        t.astimezone(dt.timezone.utc)
    except OverflowError:
        p.add(path, f"{what}: {value!r} is outside the calendar in UTC (years 1-9999)")
        return None
    return t


def parse_address(p: Problems, value, path: tuple, what: str):
    if isinstance(value, str):
        try:
            a = ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            if getattr(a, "scope_id", None) is None:
                return a
            p.add(path, f"{what}: {value!r} has a zone id (%{a.scope_id}); the datapath keys addresses without one")
            return None
    p.add(path, f"{what}: {value!r} is not an IPv4 or IPv6 address")
    return None


def parse_cidr(p: Problems, value, path: tuple, what: str):
    if not isinstance(value, str):
        p.add(path, f"{what} must be a CIDR string such as 10.0.0.0/8, not {_typename(value)}")
        return None
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        p.add(path, f"{what}: bad CIDR {value!r} ({e})")
        return None
    if getattr(net.network_address, "scope_id", None) is not None:
        p.add(path, f"{what}: bad CIDR {value!r} (a zone id has no place in a prefix)")
        return None
    return net


def _typename(v) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true/false", type(None): "nothing"}.get(type(v), type(v).__name__)


def check_api_version(p: Problems, data: dict, kind: str) -> None:
    if "apiVersion" not in data:
        p.add((), f"missing apiVersion (this is {API_VERSION})")
    elif data["apiVersion"] != API_VERSION:
        p.add(("apiVersion",), f"apiVersion {data['apiVersion']!r} is not supported (this is {API_VERSION})")
    if data.get("kind", kind) != kind:
        p.add(("kind",), f"kind must be {kind!r} here, not {data.get('kind')!r}")


def parse_selector(p: Problems, value, path: tuple, what: str) -> Selector | None:
    """{label: value} equality, {label: {in: [...]}}, {label: {notIn: [...]}},
    {label: {exists: true|false}}."""
    if value is None:
        return Selector(())
    if not isinstance(value, dict):
        p.add(path, f"{what} must be a mapping of label requirements, not {_typename(value)}")
        return None
    reqs = []
    for label, want in value.items():
        lp = path + (label,)
        if not isinstance(label, str) or not LABEL_NAME.match(label):
            p.add(lp, f"{what}: {label!r} is not a valid label name")
            continue
        if isinstance(want, dict):
            if len(want) != 1 or next(iter(want)) not in ("in", "notIn", "exists"):
                p.add(lp, f"{what}: label {label!r} wants one of in, notIn, exists")
                continue
            op, arg = next(iter(want.items()))
            if op == "exists":
                if not isinstance(arg, bool):
                    p.add(lp + (op,), f"{what}: exists takes true or false")
                    continue
                reqs.append(Requirement(label, "exists" if arg else "absent"))
            else:
                if not isinstance(arg, list) or not arg or any(isinstance(x, (dict, list)) for x in arg):
                    p.add(lp + (op,), f"{what}: {op} takes a non-empty list of values")
                    continue
                reqs.append(Requirement(label, "in" if op == "in" else "notin",
                                        frozenset(label_value(x) for x in arg)))
        elif isinstance(want, list) or want is None:
            p.add(lp, f"{what}: label {label!r} wants a value (use {{in: [...]}} for several)")
        else:
            reqs.append(Requirement(label, "eq", frozenset({label_value(want)})))
    return Selector(tuple(sorted(reqs, key=lambda r: (r.label, r.op, sorted(r.values)))))


def parse_ports(p: Problems, value, path: tuple) -> tuple[PortRange, ...]:
    if value is None:
        return ANY_PORT
    out = []
    for i, item in enumerate(expect_list(p, value, path, "ports")):
        ip = path + (i,)
        if isinstance(item, str):
            pr = parse_port_text(item)
            if isinstance(pr, str):
                p.add(ip, pr)
            else:
                out.append(pr)
            continue
        item = expect_map(p, item, ip, "a port", {"protocol": True, "port": False, "endPort": False})
        if item is None or "protocol" not in item:
            continue
        proto = _protocol(p, item["protocol"], ip + ("protocol",))
        if proto is None:
            continue
        port, end = item.get("port"), item.get("endPort")
        if proto == 0 and (port is not None or end is not None):
            p.add(ip, "a port needs a protocol; 'any' protocol covers every port")
            continue
        if port is None:
            if end is not None:
                p.add(ip + ("endPort",), "endPort needs port")
                continue
            out.append(PortRange(proto, 0, 65535))
            continue
        if not _is_port(port):
            p.add(ip + ("port",), _port_problem("port", port))
            continue
        if end is None:
            out.append(PortRange(proto, port, port))
            continue
        if not _is_port(end):
            p.add(ip + ("endPort",), _port_problem("endPort", end))
            continue
        if end < port:
            p.add(ip + ("endPort",), f"endPort {end} is below port {port}")
            continue
        out.append(PortRange(proto, port, end))
    return tuple(out)


def _port_problem(field: str, v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{field} {v} is out of range (1-65535)"
    return f"{field} must be a number 1-65535, not {v!r}"


def _is_port(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


def _protocol(p: Problems, value, path: tuple) -> int | None:
    if isinstance(value, str) and value.lower() in PROTOCOLS:
        return PROTOCOLS[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    p.add(path, f"protocol {value!r} is not one of {', '.join(PROTOCOLS)} or a number 0-255")
    return None


def _ascii_number(text: str) -> int | None:
    """ASCII digits only: str.isdigit() and int() also take '²', '٨٠', ' 8' and '8_0'.
    A number of more than nine digits is out of every range here: 10**9 stands for it."""
    if not text.isascii() or not text.isdigit():
        return None
    text = text.lstrip("0") or "0"
    return int(text) if len(text) <= 9 else 10 ** 9


def parse_port_text(text: str) -> PortRange | str:
    """'tcp/443', 'udp/1000-2000', 'icmp', 'any' -> PortRange, or an error message."""
    proto_text, _, ports = text.strip().partition("/")
    proto = PROTOCOLS.get(proto_text.lower())
    if proto is None:
        if (n := _ascii_number(proto_text)) is not None and n <= 255:
            proto = n
        else:
            return f"{text!r}: unknown protocol {proto_text!r} (want tcp/443, udp/1000-2000, icmp, any)"
    if not ports:
        return PortRange(proto, 0, 65535)
    if proto == 0:
        return f"{text!r}: a port needs a protocol"
    lo_text, dash, hi_text = ports.partition("-")
    lo = _ascii_number(lo_text)
    hi = _ascii_number(hi_text) if dash else lo
    if lo is None or hi is None:
        return f"{text!r}: ports must be numbers, as in tcp/443 or udp/1000-2000"
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        return f"{text!r}: port out of range (1-65535)"
    if hi < lo:
        return f"{text!r}: end port {hi} is below port {lo}"
    return PortRange(proto, lo, hi)


# --- the policy document -----------------------------------------------------------------

def _parse_peer(p: Problems, item, path: tuple, where: Where) -> Peer | None:
    if not isinstance(item, dict) or len(item) != 1:
        p.add(path, f"a peer is a mapping with one of {', '.join(PEER_KINDS)}")
        return None
    kind, value = next(iter(item.items()))
    loc = where.at(path)
    if kind not in PEER_KINDS:
        p.add(path + (kind,), f"unknown peer kind {kind!r} (known: {', '.join(PEER_KINDS)})")
        return None
    if kind == "cidr":
        net = parse_cidr(p, value, path + (kind,), "cidr")
        return Peer("cidr", cidr=net, where=loc) if net is not None else None
    if kind == "entity":
        if value not in ENTITIES:
            p.add(path + (kind,), f"entity {value!r} is not one of {', '.join(ENTITIES)}")
            return None
        return Peer("entity", entity=value, where=loc)
    sel = parse_selector(p, value, path + (kind,), f"{kind} selector")
    return Peer(kind, selector=sel, where=loc) if sel is not None else None


def _parse_rule(p: Problems, raw, path: tuple, where: Where) -> Rule | None:
    raw = expect_map(p, raw, path, "a rule", {"name": True, "description": False, "action": True, "from": True,
                                                "to": True, "ports": False, "conditions": False, "valid": False})
    if raw is None:
        return None
    name = expect_str(p, raw.get("name"), path + ("name",), "rule name") if "name" in raw else None
    if name is not None and not RULE_NAME.match(name):
        p.add(path + ("name",), f"rule name {name!r}: letters, digits, '.', '_' and '-' only")
    action = None
    if "action" in raw:
        action = ACTIONS.get(raw["action"]) if isinstance(raw["action"], str) else None
        if action is None:
            p.add(path + ("action",), f"action {raw['action']!r} is not one of allow, deny, audit")
    peers = {}
    for side in ("from", "to"):
        if side in raw:
            items = expect_list(p, raw[side], path + (side,), f"{side!r}")
            peers[side] = tuple(x for x in (_parse_peer(p, it, path + (side, i), where) for i, it in enumerate(items))
                                if x is not None)
    ports = parse_ports(p, raw.get("ports"), path + ("ports",))
    posture = None
    if "conditions" in raw:
        cond = expect_map(p, raw["conditions"], path + ("conditions",), "conditions", {"posture": False})
        if cond is not None and "posture" in cond:
            posture = parse_selector(p, cond["posture"], path + ("conditions", "posture"), "posture")
    not_before = not_after = None
    if "valid" in raw:
        valid = expect_map(p, raw["valid"], path + ("valid",), "valid", {"notBefore": False, "notAfter": False})
        if valid is not None:
            if "notBefore" in valid:
                not_before = parse_time(p, valid["notBefore"], path + ("valid", "notBefore"), "notBefore")
            if "notAfter" in valid:
                not_after = parse_time(p, valid["notAfter"], path + ("valid", "notAfter"), "notAfter")
            if not_before and not_after and not_after <= not_before:
                p.add(path + ("valid", "notAfter"), "notAfter must be after notBefore")
    description = raw.get("description", "")
    if not isinstance(description, str):
        p.add(path + ("description",), "description must be a string")
    if name is None or action is None or "from" not in peers or "to" not in peers:
        return None
    return Rule(name=name, action=action, sources=peers["from"], destinations=peers["to"], ports=ports,
                posture=posture, not_before=not_before, not_after=not_after, where=where.at(path),
                description=description if isinstance(description, str) else "")


def _parse_test(p: Problems, raw, path: tuple, where: Where, index: int) -> PolicyTest | None:
    raw = expect_map(p, raw, path, "a test", {"name": False, "from": True, "to": True, "port": True, "expect": True})
    if raw is None:
        return None
    ends = {}
    for side in ("from", "to"):
        if side in raw:
            ends[side] = _endpoint_ref(p, raw[side], path + (side,))
    port = parse_port_text(raw["port"]) if isinstance(raw.get("port"), str) else None
    if "port" in raw and not isinstance(raw["port"], str):
        p.add(path + ("port",), "port must look like tcp/443, udp/53 or icmp")
    elif isinstance(port, str):
        p.add(path + ("port",), port)
        port = None
    elif port is not None and port.lo != port.hi and (port.lo, port.hi) != (0, 65535):
        p.add(path + ("port",), "a test names one port, not a range")
        port = None
    expect = ACTIONS.get(raw.get("expect")) if isinstance(raw.get("expect"), str) else None
    if "expect" in raw and expect is None:
        p.add(path + ("expect",), f"expect {raw['expect']!r} is not one of allow, deny, audit")
    if None in (ends.get("from"), ends.get("to"), expect, port):
        return None
    proto, dport = port.proto, (0 if port.lo == 0 else port.lo)
    name = raw.get("name") if isinstance(raw.get("name"), str) else \
        f"{ends['from']} -> {ends['to']} {port.text()} is {raw['expect']}"
    return PolicyTest(name, ends["from"], ends["to"], proto, dport, expect, where.at(path))


def _endpoint_ref(p: Problems, value, path: tuple) -> str | None:
    """A test's end: an address, or {workload|user|host|address: name}."""
    if isinstance(value, str):
        try:
            scoped = getattr(ipaddress.ip_address(value), "scope_id", None) is not None
        except ValueError:
            scoped = True
        if not scoped:
            return value
        p.add(path, f"{value!r} is not an address; name endpoints as {{workload: NAME}}, {{user: NAME}}"
                    f" or {{host: NAME}}")
        return None
    if isinstance(value, dict) and len(value) == 1:
        kind, name = next(iter(value.items()))
        if kind in ("workload", "user", "host", "address") and isinstance(name, str) and name:
            return name if kind == "address" else f"{kind}:{name}"
    p.add(path, "a test end is an address or one of {workload: NAME}, {user: NAME}, {host: NAME}")
    return None


def parse_policy(data, where: Where) -> Policy:
    p = Problems(where)
    data = expect_map(p, data, (), "the policy", {"apiVersion": False, "kind": False, "metadata": False,
                                                  "mode": False, "rules": True, "tests": False})
    if data is None:
        p.raise_if_any()
    check_api_version(p, data, "Policy")
    name = "policy"
    if "metadata" in data:
        meta = expect_map(p, data["metadata"], ("metadata",), "metadata", {"name": False, "description": False})
        if meta and isinstance(meta.get("name"), str):
            name = meta["name"]
    mode = data.get("mode", "enforce")
    if mode not in ("enforce", "audit"):
        p.add(("mode",), f"mode {mode!r} is not one of enforce, audit")
    rules, seen = [], {}
    for i, raw in enumerate(expect_list(p, data.get("rules", []), ("rules",), "rules", allow_empty=True)):
        rule = _parse_rule(p, raw, ("rules", i), where)
        if rule is None:
            continue
        if rule.name in seen:
            p.add(("rules", i, "name"), f"duplicate rule name {rule.name!r} (first at line {seen[rule.name]})")
            continue
        seen[rule.name] = where.line(("rules", i, "name"))
        rules.append(rule)
    tests = []
    for i, raw in enumerate(expect_list(p, data.get("tests", []), ("tests",), "tests", allow_empty=True)):
        t = _parse_test(p, raw, ("tests", i), where, i)
        if t is not None:
            tests.append(t)
    p.raise_if_any()
    return Policy(name=name, mode=mode, rules=tuple(rules), tests=tuple(tests), file=where.file)


def load_policy(path: str | Path) -> Policy:
    data, where = source.load(path)
    return parse_policy(data, where)
