"""The inventory: what exists, as opposed to what may talk to what.

Hosts (the machines running agents, with their own addresses), endpoints
(workloads and the host each runs on), user sessions (a user, their groups
and device posture, bound to the address their traffic comes from, until an
expiry) and external networks (named CIDRs). In standalone mode it comes
from a file; in fleet mode the controller holds it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from pathlib import Path

from dataplane import source
from dataplane.identity import freeze
from dataplane.policy import (LABEL_NAME, Problems, check_api_version, expect_list, expect_map, expect_str,
                              parse_address, parse_cidr, parse_time)
from dataplane.source import Where

RESERVED_LABELS = ("kind",)


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    addresses: tuple
    labels: dict
    where: str

    def identity_labels(self) -> dict:
        return {**self.labels, "kind": "host", "name": self.name}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    name: str
    host: str
    addresses: tuple
    labels: dict
    where: str

    def identity_labels(self) -> dict:
        return {**self.labels, "kind": "workload"}


@dataclasses.dataclass(frozen=True)
class Session:
    id: str
    user: str
    groups: tuple
    device: dict            # id and posture attributes, values as strings
    addresses: tuple
    expires: dt.datetime | None
    where: str
    host: str | None = None  # the device runs an agent as this host: the session is local there

    def identity_labels(self) -> dict:
        labels = {"kind": "user", "user": self.user}
        if self.groups:
            labels["group"] = frozenset(self.groups)
        labels.update({f"device.{k}": v for k, v in self.device.items()})
        return labels

    def live_at(self, now: dt.datetime) -> bool:
        return self.expires is None or now < self.expires


@dataclasses.dataclass(frozen=True)
class Network:
    name: str
    cidrs: tuple
    labels: dict
    where: str

    def identity_labels(self) -> dict:
        return {**self.labels, "kind": "network", "name": self.name}


@dataclasses.dataclass(frozen=True)
class Inventory:
    hosts: tuple[Host, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    sessions: tuple[Session, ...] = ()
    networks: tuple[Network, ...] = ()
    file: str = ""

    def host(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name == name), None)

    def endpoint(self, name: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.name == name), None)

    def sessions_of(self, user: str) -> list[Session]:
        return [s for s in self.sessions if s.user == user]


def _labels(p: Problems, value, path: tuple, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        p.add(path, f"{what} labels must be a mapping")
        return {}
    for k, v in value.items():
        if not isinstance(k, str) or not LABEL_NAME.match(k):
            p.add(path + (k,), f"{k!r} is not a valid label name")
        elif k in RESERVED_LABELS:
            p.add(path + (k,), f"label {k!r} is set by the inventory section, not by hand")
        elif isinstance(v, dict) or v is None:
            p.add(path + (k,), f"label {k!r} needs a value (a string, number, true/false or a list)")
    return freeze({k: v for k, v in value.items() if isinstance(k, str) and k not in RESERVED_LABELS
                   and not isinstance(v, dict) and v is not None})


def _addresses(p: Problems, raw: dict, path: tuple, what: str, required: bool = True) -> tuple:
    items = []
    if "address" in raw:
        items.append((raw["address"], path + ("address",)))
    if "addresses" in raw:
        items += [(a, path + ("addresses", i)) for i, a in
                  enumerate(expect_list(p, raw["addresses"], path + ("addresses",), f"{what} addresses"))]
    if required and not items:
        p.add(path, f"{what} needs address or addresses")
    out = []
    for value, ap in items:
        a = parse_address(p, value, ap, f"{what} address")
        if a is not None:
            out.append(a)
    return tuple(out)


def _name(p: Problems, raw: dict, path: tuple, what: str, seen: dict, where: Where) -> str | None:
    name = expect_str(p, raw.get("name"), path + ("name",), f"{what} name") if "name" in raw else None
    if name is not None:
        if name in seen:
            p.add(path + ("name",), f"duplicate {what} name {name!r} (first at line {seen[name]})")
            return None
        seen[name] = where.line(path + ("name",))
    return name


def parse_inventory(data, where: Where) -> Inventory:
    p = Problems(where)
    data = expect_map(p, data, (), "the inventory", {"apiVersion": False, "kind": False, "hosts": False,
                                                     "endpoints": False, "sessions": False, "networks": False})
    if data is None:
        p.raise_if_any()
    check_api_version(p, data, "Inventory")

    hosts, seen = [], {}
    for i, raw in enumerate(expect_list(p, data.get("hosts", []), ("hosts",), "hosts", allow_empty=True)):
        path = ("hosts", i)
        raw = expect_map(p, raw, path, "a host", {"name": True, "address": False, "addresses": False,
                                                  "labels": False})
        if raw is None:
            continue
        name = _name(p, raw, path, "host", seen, where)
        addrs = _addresses(p, raw, path, "host", required=False)
        labels = _labels(p, raw.get("labels"), path + ("labels",), "host")
        if name:
            hosts.append(Host(name, addrs, labels, where.at(path)))

    endpoints, seen = [], {}
    host_names = {h.name for h in hosts}
    for i, raw in enumerate(expect_list(p, data.get("endpoints", []), ("endpoints",), "endpoints",
                                        allow_empty=True)):
        path = ("endpoints", i)
        raw = expect_map(p, raw, path, "an endpoint", {"name": True, "host": True, "address": False,
                                                       "addresses": False, "labels": False})
        if raw is None:
            continue
        name = _name(p, raw, path, "endpoint", seen, where)
        host = expect_str(p, raw.get("host"), path + ("host",), "endpoint host") if "host" in raw else None
        if host is not None and host not in host_names:
            p.add(path + ("host",), f"endpoint host {host!r} is not in hosts")
        addrs = _addresses(p, raw, path, "endpoint")
        labels = _labels(p, raw.get("labels"), path + ("labels",), "endpoint")
        if name and host:
            endpoints.append(Endpoint(name, host, addrs, labels, where.at(path)))

    sessions, seen = [], {}
    for i, raw in enumerate(expect_list(p, data.get("sessions", []), ("sessions",), "sessions", allow_empty=True)):
        path = ("sessions", i)
        raw = expect_map(p, raw, path, "a session", {"id": False, "user": True, "groups": False, "device": False,
                                                     "address": False, "addresses": False, "expires": False,
                                                     "host": False})
        if raw is None:
            continue
        user = expect_str(p, raw.get("user"), path + ("user",), "session user") if "user" in raw else None
        groups = []
        for j, g in enumerate(expect_list(p, raw.get("groups", []), path + ("groups",), "groups", allow_empty=True)):
            if isinstance(g, (dict, list)) or g is None or isinstance(g, bool):
                p.add(path + ("groups", j), f"a group is a name, not {g!r}")
            else:
                groups.append(str(g))
        groups = tuple(sorted(set(groups)))
        device = {}
        if "device" in raw:
            dev = raw["device"]
            if not isinstance(dev, dict):
                p.add(path + ("device",), "device must be a mapping (id and posture attributes)")
            else:
                device = {k: v for k, v in _labels(p, dev, path + ("device",), "device").items()}
        addrs = _addresses(p, raw, path, "session")
        expires = parse_time(p, raw["expires"], path + ("expires",), "expires") if "expires" in raw else None
        sid = raw.get("id") if isinstance(raw.get("id"), str) else f"{user}@{addrs[0] if addrs else '?'}"
        if sid in seen:
            p.add(path, f"duplicate session {sid!r} (first at line {seen[sid]})")
            continue
        seen[sid] = where.line(path)
        host = None
        if "host" in raw:
            host = expect_str(p, raw["host"], path + ("host",), "session host")
            if host is not None and host not in host_names:
                p.add(path + ("host",), f"session host {host!r} is not in hosts")
        if user:
            sessions.append(Session(sid, user, groups, device, addrs, expires, where.at(path), host))

    networks, seen = [], {}
    for i, raw in enumerate(expect_list(p, data.get("networks", []), ("networks",), "networks", allow_empty=True)):
        path = ("networks", i)
        raw = expect_map(p, raw, path, "a network", {"name": True, "cidrs": True, "labels": False})
        if raw is None:
            continue
        name = _name(p, raw, path, "network", seen, where)
        cidrs = tuple(c for c in (parse_cidr(p, x, path + ("cidrs", j), "network cidr") for j, x in
                                  enumerate(expect_list(p, raw.get("cidrs", []), path + ("cidrs",), "cidrs")))
                      if c is not None)
        labels = _labels(p, raw.get("labels"), path + ("labels",), "network")
        if name:
            networks.append(Network(name, cidrs, labels, where.at(path)))

    _check_address_owners(p, hosts, endpoints, sessions, where)
    p.raise_if_any()
    return Inventory(tuple(hosts), tuple(endpoints), tuple(sessions), tuple(networks), where.file)


def _check_address_owners(p: Problems, hosts, endpoints, sessions, where: Where) -> None:
    """An address belongs to one host, endpoint or session."""
    owner: dict[ipaddress._BaseAddress, str] = {}
    for kind, items in (("host", hosts), ("endpoint", endpoints), ("session", sessions)):
        for item in items:
            label = f"{kind} {getattr(item, 'name', None) or item.id}"
            for a in item.addresses:
                if a in owner and owner[a] != label:
                    p.items.append(f"{item.where}: address {a} of {label} already belongs to {owner[a]}")
                owner.setdefault(a, label)


def load_inventory(path: str | Path) -> Inventory:
    data, where = source.load(path)
    return parse_inventory(data, where)
