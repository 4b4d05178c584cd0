"""Random entitlement policies and inventories, as the YAML an operator
writes, for differential tests of the policy layer.

A `World` is one round: an inventory (hosts, workloads with random label
sets, user sessions with groups and device posture, some expired, named
networks), a policy over it (every peer kind, every action, every port form,
posture conditions, validity windows, enforce or audit mode), both parsed
by the project's own parsers from the generated text, and the pools of
addresses a test draws flows from: the compiled host's own addresses and
workloads, other hosts' workloads, sessions, addresses inside networks and
inside the CIDRs the policy names, and addresses nothing knows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import random

import yaml

from dataplane import source
from dataplane.inventory import Inventory, parse_inventory
from dataplane.policy import API_VERSION, Policy, PortRange, parse_policy

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
LIVE_UNTIL = "2099-01-01T00:00:00Z"
EXPIRED_AT = "2029-01-01T00:00:00Z"          # before NOW: the session is not live
PAST = "2029-06-01T00:00:00Z"
FUTURE = "2031-01-01T00:00:00Z"

APPS = ("web", "api", "db", "cache", "queue")
ENVS = ("prod", "stage", "dev")
TIERS = ("frontend", "backend", "data")
TEAMS = ("red", "blue")
ROLES = ("metrics", "backup", "admin")
GROUPS = ("eng", "sales", "ops", "admin")
USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
OSES = ("linux", "macos", "windows")
ZONES = ("dmz", "core")
TRUST = ("partner", "vendor", "internal")

COMMON_PORTS = (22, 53, 80, 443, 5432, 6379, 8080, 8443, 9100)
RANGES = ((1000, 2000), (8000, 8999), (30000, 32767), (1, 1023), (5000, 5010), (443, 8443), (60000, 65535))
MAX_RANGE_ITEMS = 12          # per policy: keeps every (local, remote, proto) key within the 16-range limit


def _v4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


@dataclasses.dataclass
class World:
    seed: str
    round: int
    host: str                       # the host the state is compiled for
    policy_text: str
    inventory_text: str
    policy: Policy
    inventory: Inventory
    audit: bool
    pools: dict                     # name -> {4: [addresses], 6: [addresses]} or networks
    ports: list                     # interesting port numbers for this policy


class Generator:
    """One round's random world; everything is derived from the rng."""

    def __init__(self, rng: random.Random, rnd: int, audit: bool):
        self.rng = rng
        self.r = rnd
        self.audit = audit
        self.v4_base = f"10.{40 + rnd}"
        self.v6_base = f"fd40:{rnd + 1:x}"
        self._next_host = {"hosts": 1, "endpoints": 1, "sessions": 1}

    # -- addresses ------------------------------------------------------------------

    def _addr(self, section: str, family: int) -> str:
        i = self._next_host[section]
        self._next_host[section] += 1
        subnet = {"hosts": 1, "endpoints": 2, "sessions": 3}[section]
        return f"{self.v4_base}.{subnet}.{i}" if family == 4 else f"{self.v6_base}:{subnet}::{i:x}"

    def _addresses(self, section: str, need_v6: bool = False) -> list[str]:
        roll = self.rng.random()
        fams = [4, 6] if need_v6 or roll < 0.45 else ([4] if roll < 0.8 else [6])
        out = []
        for fam in fams:
            out.append(self._addr(section, fam))
            if self.rng.random() < 0.15:
                out.append(self._addr(section, fam))
        return out

    # -- inventory ------------------------------------------------------------------

    def _labels(self) -> dict:
        rng = self.rng
        labels = {}
        if rng.random() < 0.9:
            labels["app"] = rng.choice(APPS)
        if rng.random() < 0.7:
            labels["env"] = rng.choice(ENVS)
        if rng.random() < 0.5:
            labels["tier"] = rng.choice(TIERS)
        if rng.random() < 0.3:
            labels["team"] = rng.choice(TEAMS)
        if rng.random() < 0.2:
            labels["roles"] = sorted(rng.sample(ROLES, rng.randint(1, 2)))
        return labels

    def inventory(self) -> tuple[dict, str]:
        rng = self.rng
        n_hosts = rng.randint(3, 4)
        hosts = []
        for i in range(n_hosts):
            h = {"name": f"h{i}", "labels": {"zone": rng.choice(ZONES)}}
            addrs = self._addresses("hosts", need_v6=(i == 0))
            if i > 0 and rng.random() < 0.15:
                addrs = []                       # a host known by name only
            if addrs:
                h["addresses"] = addrs
            hosts.append(h)
        compiled = "h0"
        endpoints = []
        for i in range(rng.randint(9, 14)):
            host = compiled if i < 3 else rng.choice([h["name"] for h in hosts])
            ep = {"name": f"e{i}", "host": host, "addresses": self._addresses("endpoints", need_v6=(i == 0)),
                  "labels": self._labels()}
            if not ep["labels"]:
                del ep["labels"]
            endpoints.append(ep)
        sessions = []
        for i in range(rng.randint(4, 8)):
            s = {"id": f"s{i}", "user": rng.choice(USERS),
                 "groups": sorted(rng.sample(GROUPS, rng.randint(0, 2))),
                 "device": {"id": f"dev-{i}", "managed": rng.random() < 0.6, "compliant": rng.random() < 0.7,
                            "os": rng.choice(OSES)},
                 "addresses": self._addresses("sessions"),
                 "expires": EXPIRED_AT if rng.random() < 0.2 else LIVE_UNTIL}
            sessions.append(s)
        b4, b6 = self.v4_base, self.v6_base
        candidates = [
            ("lan", [f"{b4}.0.0/16", f"{b6}::/32"]),
            ("lan4", [f"{b4}.0.0/16"]),
            ("partner", [f"{b4}.200.0/24"]),
            ("lab", [f"{b4}.200.128/26", f"{b6}:200::/64"]),
            ("vendor", [f"172.16.{self.r}.0/24", f"2001:db8:{self.r + 1:x}::/48"]),
            ("edge", [f"{b4}.3.0/28"]),          # covers some session addresses
        ]
        chosen = [c for c in candidates if rng.random() < 0.6]
        if not any(name in ("lan", "lan4") for name, _ in chosen):
            chosen.append(candidates[0] if rng.random() < 0.5 else candidates[1])
        if any(name == "lan" for name, _ in chosen):
            chosen = [c for c in chosen if c[0] != "lan4"]
        networks = [{"name": name, "cidrs": cidrs, "labels": {"trust": rng.choice(TRUST)}} for name, cidrs in chosen]
        data = {"apiVersion": API_VERSION, "kind": "Inventory", "hosts": hosts, "endpoints": endpoints,
                "sessions": sessions, "networks": networks}
        self.inv_data = data
        self.compiled = compiled
        return data, yaml.safe_dump(data, sort_keys=False)

    # -- policy ---------------------------------------------------------------------

    def _cidr_peer(self) -> str:
        rng = self.rng
        b4, b6 = self.v4_base, self.v6_base
        return rng.choice([
            f"{b4}.200.0/25", f"{b4}.200.0/24", f"{b4}.200.192/27", f"{b4}.0.0/16", f"{b4}.2.0/24",
            f"{b4}.3.0/29", "198.51.100.0/24", "198.51.100.64/26", "203.0.113.128/25",
            f"{b6}:200::/64", f"{b6}:200::/56", f"2001:db8:{self.r + 1:x}::/48", f"2001:db8:{self.r + 1:x}:7::/64",
            "2001:db8:ff00::/40", f"{b6}:2::/64",
        ])

    def _peer(self) -> dict:
        rng = self.rng
        kind = rng.choices(("user", "workload", "host", "network", "selector", "cidr", "entity"),
                           (5, 7, 2, 2, 2, 3, 3))[0]
        if kind == "user":
            return {"user": rng.choice([{"group": rng.choice(GROUPS)},
                                        {"group": {"in": rng.sample(GROUPS, 2)}},
                                        {"user": rng.choice(USERS)},
                                        {"group": {"notIn": [rng.choice(GROUPS)]}},
                                        {}])}
        if kind == "workload":
            return {"workload": rng.choice([{"app": rng.choice(APPS)},
                                            {"app": rng.choice(APPS), "env": rng.choice(ENVS)},
                                            {"env": {"in": rng.sample(ENVS, 2)}},
                                            {"tier": {"notIn": [rng.choice(TIERS)]}},
                                            {"team": {"exists": rng.random() < 0.7}},
                                            {"roles": rng.choice(ROLES)},
                                            {}])}
        if kind == "host":
            return {"host": rng.choice([{"zone": rng.choice(ZONES)}, {"name": f"h{rng.randint(0, 3)}"}, {}])}
        if kind == "network":
            return {"network": rng.choice([{"trust": rng.choice(TRUST)},
                                           {"name": rng.choice(["lan", "lan4", "partner", "lab", "vendor", "edge"])}])}
        if kind == "selector":
            return {"selector": rng.choice([{"env": rng.choice(ENVS)}, {"kind": {"in": ["host", "network"]}},
                                            {"app": {"in": rng.sample(APPS, 2)}}, {"trust": rng.choice(TRUST)}])}
        if kind == "cidr":
            return {"cidr": self._cidr_peer()}
        return {"entity": rng.choices(("any", "world", "host"), (3, 2, 2))[0]}

    def _port_item(self, ranges_left: list) -> object:
        rng = self.rng
        roll = rng.random()
        proto = rng.choice(("tcp", "tcp", "udp"))
        if roll < 0.4:
            p = rng.choice(COMMON_PORTS + (rng.randint(1, 65535),))
            return rng.choice([f"{proto}/{p}", {"protocol": proto, "port": p},
                               {"protocol": 6 if proto == "tcp" else 17, "port": p}])
        if roll < 0.62 and ranges_left[0] > 0:
            ranges_left[0] -= 1
            lo, hi = rng.choice(RANGES)
            return rng.choice([f"{proto}/{lo}-{hi}", {"protocol": proto, "port": lo, "endPort": hi}])
        if roll < 0.8:
            return rng.choice([proto, {"protocol": proto}])
        if roll < 0.92:
            return rng.choice(["icmp", "icmpv6"])
        return "any"

    def policy(self) -> tuple[dict, str]:
        rng = self.rng
        ranges_left = [MAX_RANGE_ITEMS]
        rules = []
        for i in range(rng.randint(18, 32)):
            action = rng.choices(("allow", "deny", "audit"), (5, 2, 2))[0]
            froms = [self._peer() for _ in range(rng.choices((1, 2), (3, 1))[0])]
            tos = [self._peer() for _ in range(rng.choices((1, 2), (3, 1))[0])]
            # Most rules touch the compiled host: one side names its workloads or itself.
            if rng.random() < 0.6:
                local_peer = rng.choice([{"workload": {}}, {"entity": "host"},
                                         {"workload": {"app": rng.choice(APPS)}}, {"host": {"name": "h0"}}])
                (tos if rng.random() < 0.6 else froms)[0] = local_peer
            rule = {"name": f"r{i}-{action}", "action": action, "from": froms, "to": tos}
            if rng.random() < 0.85:
                rule["ports"] = [self._port_item(ranges_left) for _ in range(rng.choices((1, 2, 3), (5, 3, 1))[0])]
            if rng.random() < 0.2:
                rule["conditions"] = {"posture": rng.choice([{"managed": True}, {"compliant": True, "managed": True},
                                                             {"os": {"in": ["linux", "macos"]}},
                                                             {"os": {"notIn": ["windows"]}}])}
            if rng.random() < 0.08:
                rule["valid"] = rng.choice([{"notAfter": PAST}, {"notBefore": FUTURE},
                                            {"notBefore": PAST, "notAfter": FUTURE}])
            rules.append(rule)
        data = {"apiVersion": API_VERSION, "kind": "Policy", "metadata": {"name": f"random-{self.r}"},
                "mode": "audit" if self.audit else "enforce", "rules": rules}
        return data, yaml.safe_dump(data, sort_keys=False)


def interesting_ports(policy: Policy) -> list[int]:
    """Every port a rule names, the edges of every range and a few more."""
    out = set(COMMON_PORTS)
    for rule in policy.rules:
        for pr in rule.ports:
            if pr.proto == 0 or (pr.lo, pr.hi) == (0, 65535):
                continue
            out.update(p for p in (pr.lo - 1, pr.lo, pr.hi, pr.hi + 1, (pr.lo + pr.hi) // 2) if 1 <= p <= 65535)
    return sorted(out)


def inside(rng: random.Random, net) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    span = net.num_addresses
    offset = rng.randrange(1, span - 1) if span > 2 else 0
    return net.network_address + offset


def make_world(seed: str, rnd: int, audit: bool) -> World:
    rng = random.Random(f"{seed}:{rnd}")
    g = Generator(rng, rnd, audit)
    _, inv_text = g.inventory()
    _, pol_text = g.policy()
    data, where = source.loads(inv_text, f"inventory-{rnd}.yaml")
    inventory = parse_inventory(data, where)
    data, where = source.loads(pol_text, f"policy-{rnd}.yaml")
    policy = parse_policy(data, where)

    host = inventory.host(g.compiled)
    by_family = lambda addrs: {4: [a for a in addrs if a.version == 4], 6: [a for a in addrs if a.version == 6]}
    local = list(host.addresses) + [a for e in inventory.endpoints if e.host == host.name for a in e.addresses]
    remote_eps = [a for e in inventory.endpoints if e.host != host.name for a in e.addresses]
    other_hosts = [a for h in inventory.hosts if h.name != host.name for a in h.addresses]
    live = [a for s in inventory.sessions if s.live_at(NOW) for a in s.addresses]
    expired = [a for s in inventory.sessions if not s.live_at(NOW) for a in s.addresses]
    networks = [c for n in inventory.networks for c in n.cidrs]
    cidr_peers = sorted({p.cidr for r in policy.rules for p in r.sources + r.destinations if p.kind == "cidr"},
                        key=lambda n: (n.version, str(n)))
    pools = {
        "local": by_family(local),
        "remote_endpoint": by_family(remote_eps),
        "other_host": by_family(other_hosts),
        "session": by_family(live),
        "expired_session": by_family(expired),
        "network": by_family(networks),
        "cidr_peer": by_family(cidr_peers),
        "unknown": {4: [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("100.64.0.0/10")],
                    6: [ipaddress.ip_network("2001:db8:ffff::/48"), ipaddress.ip_network("3fff:1234::/32")]},
    }
    return World(seed=seed, round=rnd, host=host.name, policy_text=pol_text, inventory_text=inv_text,
                 policy=policy, inventory=inventory, audit=audit, pools=pools, ports=interesting_ports(policy))


def draw_address(rng: random.Random, world: World, category: str, family: int):
    """An address of one category and family, or None when there is none."""
    items = world.pools[category][family]
    if not items:
        return None
    item = rng.choice(items)
    if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return inside(rng, item)
    return item


def port_form(pr: PortRange) -> str:
    if pr.proto == 0:
        return "any_protocol"
    if (pr.lo, pr.hi) == (0, 65535):
        return "any_port"
    return "exact" if pr.lo == pr.hi else "range"
