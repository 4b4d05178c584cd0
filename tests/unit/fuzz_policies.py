"""Random and mutated policy and inventory documents, and the oracle that
judges what the project makes of them.

`case(seed, index)` is one fuzz case, derived from its own rng so that any
case can be replayed alone: a valid random pair of documents (every rule
form docs/policy.md allows), the examples, structural mutations of either
(keys deleted, added, retyped; edge CIDRs, addresses, ports, times, names),
text and byte mutations (truncation, tabs, duplicated lines, bad bytes,
several documents) or hostile YAML (deep nesting, recursive aliases, alias
bombs, huge numbers, huge strings, garbage).

`judge(case, workdir)` loads both files the way the agent does, compiles
for several hosts and lays the policy out for the maps. The only outcomes
allowed: a valid compile whose state is self-consistent, a SourceError
whose every problem is one line naming FILE:LINE, or (for a valid compile)
a capacity refusal from the layout. Anything else is a failure.

Run as a module (`python -m tests.unit.fuzz_policies --seed S --cases N`)
it judges cases under a memory limit and a per-case time limit, so that a
bomb fails its case instead of the machine, and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import ipaddress
import json
import random
import re
import signal
import sys
import time
import traceback
from pathlib import Path

import yaml

from dataplane import source
from dataplane.compiler import EXPIRES_MAX, Compiler
from dataplane.identity import Allocator
from dataplane.inventory import load_inventory
from dataplane.policy import API_VERSION, load_policy
from dataplane.source import SourceError
from loader import abi, tables
from loader.errors import MapError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = (ROOT / "examples" / "policy.yaml").read_bytes()
EXAMPLE_INVENTORY = (ROOT / "examples" / "inventory.yaml").read_bytes()
NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
MONO_NOW = 1000                      # the CLOCK_MONOTONIC second the ipcache is converted at
CASE_SECONDS = 30                    # per-case guard against a hang, not a measurement
MEMORY_LIMIT = 3 * 2 ** 30           # address space of the fuzz process

APPS = ("web", "api", "db", "cache")
ENVS = ("prod", "stage", "dev")
TIERS = ("frontend", "backend", "data")
GROUPS = ("eng", "sales", "ops", "admin")
USERS = ("alice", "bob", "carol", "dave", "zoë", "用户")
NAMES = ("h", "web-1", "hôte", "工作负载", "x" * 63, "a.b_c-d", "Ωmega")

# --- edge values, by the kind of field they go into ---------------------------------

EDGE_ADDRESSES = ("fd00::2%eth0", "fe80::1%1", "::ffff:10.9.0.1", "::ffff:0:0", "0.0.0.0", "255.255.255.255",
                  "::", "::1", "10.9.0.256", "10.9.0", "10.9.0.1/32", "1.2.3.4.5", "01.02.03.04", "１.２.３.４",
                  "fd00::g", "fd00:::1", "", " 10.9.0.1", "10.9.0.1 ", "localhost", "0x0a000001", "167772161",
                  "fd00::1%", "%eth0")
EDGE_CIDRS = ("10.0.0.0/33", "fd00::/129", "10.0.0.1/24", "fd00::1/64", "fd00::%eth0/64", "10.0.0.0/-1",
              "10.0.0.0/8/8", "0.0.0.0/0", "::/0", "::ffff:10.0.0.0/104", "10.0.0.0/255.0.0.0",
              "10.0.0.0/0.255.255.255", "10.0.0.0/", "/8", "10.0.0.0/٨", "10.0.0.0/²", "10.0.0.0/08",
              "1.2.3.4/32", "fd00::/128", "10.0.0.0 /8", "")
EDGE_PORTS = ("tcp/0", "tcp/65536", "tcp/80-79", "tcp/²", "²/80", "tcp/٨٠", "tcp/８０", "tcp/ 80", "tcp/8_0",
              "tcp/+80", "tcp/-80", "tcp/80-", "tcp/-", "tcp/1-65535", "tcp/65535", "udp/1", "256/80", "255",
              "0/80", "any/80", "TCP/443", "tcp/443/1", "tcp/0080", "tcp/" + "9" * 5000, "9" * 5000 + "/1",
              "icmp/8", "tcp", "", "/", "tcp/1e3", "tcp/0x50", 0, 65536, -1, 2 ** 64, 1.5, True, None)
EDGE_TIMES = ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
              "9999-12-31T23:59:59Z", "9999-12-31T23:59:59+14:00", "2026-12-31T00:00:00", "2026-12-31",
              "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-12-31T24:00:00Z", "2026-12-31T00:00:00+24:00",
              "2026-12-31T00:00:00.123456789Z", "2106-02-07T06:28:16Z", "2162-01-01T00:00:00Z",
              "2200-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "2030-06-01T12:00:00Z", "2030-06-01T12:00:01Z",
              "yesterday", "", 0, 1.5, -1, 2 ** 40)
EDGE_NAMES = ("", " ", "\t", "é", "名前", "a" * 129, "a" * 100_000, "-a", "a-", "a b", "a/b", "a:b", "🙂",
              "\u200b", "\x7f", "kind", "null", "~", "true")
WRONG_VALUES = ([], {}, None, True, False, 0, -1, 2 ** 64, -2 ** 63, 10 ** 30, 1.5, -0.0, 1e308, "", "x",
                [[[]]], {"a": {"b": {}}}, [None], {"": None}, "x" * 4096)
UNKNOWN_KEYS = ("colour", "Name", "name ", "rules2", "ports", "", "ÄÖÜ", "<<", "?", "0", "-")

FIELD_EDGES = {
    "address": EDGE_ADDRESSES, "addresses": EDGE_ADDRESSES, "cidr": EDGE_CIDRS, "cidrs": EDGE_CIDRS,
    "ports": EDGE_PORTS, "port": EDGE_PORTS, "endPort": EDGE_PORTS, "protocol": ("tcp", "TCP", 0, 255, 256, -1, "ip"),
    "notBefore": EDGE_TIMES, "notAfter": EDGE_TIMES, "expires": EDGE_TIMES,
    "name": EDGE_NAMES, "user": EDGE_NAMES, "host": EDGE_NAMES, "id": EDGE_NAMES, "groups": EDGE_NAMES,
    "action": ("Allow", "DENY", "permit", "", None), "mode": ("Audit", "enforcing", "", None),
    "entity": ("anything", "World", "", None), "apiVersion": ("zt-dataplane/v2", "v1", "", None),
    "kind": ("policy", "Inventory", "", None), "expect": ("allowed", "", None),
}


# --- valid documents --------------------------------------------------------------------

class Generator:
    """A valid random inventory and policy over it; everything from the rng."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.next_addr = 1
        self.block = rng.randrange(1, 200)

    def pick(self, seq):
        return self.rng.choice(seq)

    def address(self, family: int | None = None) -> str:
        self.next_addr += 1
        n = self.next_addr
        family = family or self.rng.choice((4, 4, 6, 6, 46))
        if family == 4:
            return f"10.{self.block}.{n // 250}.{n % 250 + 1}"
        if family == 46:                                  # v4-mapped v6: an IPv6 address like any other
            return f"::ffff:10.{self.block}.{n // 250}.{n % 250 + 1}"
        return f"fd00:{self.block:x}::{n:x}"

    def time(self, kind: str) -> str:
        if kind == "past":
            t = NOW - dt.timedelta(days=self.rng.randrange(1, 4000))
        elif kind == "future":
            t = NOW + dt.timedelta(days=self.rng.randrange(1, 4000))
        else:                                             # far: past what a u32 of seconds holds
            return self.pick(("2106-02-07T06:28:16Z", "2200-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
                              "9999-12-31T23:59:59+14:00", "5000-01-01T00:00:00-03:30"))
        offset = self.pick(("Z", "+00:00", "+05:30", "-08:00", "+14:00", "-12:00"))
        return t.strftime("%Y-%m-%dT%H:%M:%S") + offset

    def labels(self, pools: dict) -> dict:
        out = {}
        for k, values in pools.items():
            if self.rng.random() < 0.7:
                out[k] = self.pick(values)
        if self.rng.random() < 0.2:
            out["num"] = self.pick((1, 0, 42, True, 10 ** 20, "007"))
        if self.rng.random() < 0.1:
            out["multi"] = self.rng.sample(["a", "b", "c"], 2)
        return out

    def inventory(self) -> dict:
        rng = self.rng
        hosts = []
        for i in range(rng.randrange(1, 5)):
            h = {"name": f"h{i}" if rng.random() < 0.8 else f"{self.pick(NAMES)}-{i}"}
            if rng.random() < 0.8:
                if rng.random() < 0.4:
                    h["addresses"] = [self.address() for _ in range(rng.randrange(1, 3))]
                else:
                    h["address"] = self.address()
            if rng.random() < 0.5:
                h["labels"] = self.labels({"zone": ("dmz", "core"), "rack": (1, 2, 3)})
            hosts.append(h)
        endpoints = []
        for i in range(rng.randrange(0, 8)):
            e = {"name": f"w{i}", "host": self.pick(hosts)["name"],
                 "labels": self.labels({"app": APPS, "env": ENVS, "tier": TIERS})}
            if rng.random() < 0.5:
                e["address"] = self.address()
            else:
                e["addresses"] = [self.address() for _ in range(rng.randrange(1, 3))]
            endpoints.append(e)
        sessions = []
        for i in range(rng.randrange(0, 5)):
            s = {"user": self.pick(USERS), "address": self.address()}
            if rng.random() < 0.7:
                s["id"] = f"s{i}"
            if rng.random() < 0.7:
                s["groups"] = rng.sample(GROUPS, rng.randrange(0, 3))
            if rng.random() < 0.7:
                s["device"] = {"id": f"dev-{i}", "managed": rng.random() < 0.5, "compliant": rng.random() < 0.5,
                               "os": self.pick(("linux", "macos", "windows"))}
            if rng.random() < 0.8:
                s["expires"] = self.time(self.pick(("past", "future", "future", "far")))
            if rng.random() < 0.15:
                s["host"] = self.pick(hosts)["name"]
            sessions.append(s)
        networks = []
        for i in range(rng.randrange(0, 3)):
            v4 = rng.random() < 0.6
            cidrs = [f"172.{16 + i}.0.0/{self.pick((12, 16, 24))}".replace("/12", "/16") if v4
                     else f"fd{i + 10:02x}::/{self.pick((48, 64))}"]
            networks.append({"name": f"n{i}", "cidrs": cidrs,
                             "labels": self.labels({"trust": ("partner", "vendor")})})
        inv = {"apiVersion": API_VERSION, "kind": "Inventory", "hosts": hosts}
        for key, items in (("endpoints", endpoints), ("sessions", sessions), ("networks", networks)):
            if items or rng.random() < 0.3:
                inv[key] = items
        self._inventory = inv
        return inv

    def selector(self, pools: dict) -> dict:
        rng = self.rng
        out = {}
        for label, values in rng.sample(list(pools.items()), rng.randrange(0, min(3, len(pools)) + 1)):
            form = rng.randrange(4)
            if form == 0:
                out[label] = self.pick(values)
            elif form == 1:
                out[label] = {"in": rng.sample(list(values), rng.randrange(1, len(values) + 1))}
            elif form == 2:
                out[label] = {"notIn": rng.sample(list(values), 1)}
            else:
                out[label] = {"exists": rng.random() < 0.5}
        return out

    def peer(self) -> dict:
        rng = self.rng
        kind = self.pick(("user", "workload", "workload", "host", "network", "selector", "cidr", "entity"))
        if kind == "user":
            return {"user": self.selector({"group": GROUPS, "user": USERS})}
        if kind == "workload":
            return {"workload": self.selector({"app": APPS, "env": ENVS, "tier": TIERS})}
        if kind == "host":
            return {"host": self.selector({"zone": ("dmz", "core"), "name": [h["name"] for h in
                                                                             self._inventory["hosts"]]})}
        if kind == "network":
            return {"network": self.selector({"trust": ("partner", "vendor")})}
        if kind == "selector":
            return {"selector": self.selector({"kind": ("user", "workload", "host"), "app": APPS})}
        if kind == "cidr":
            return {"cidr": self.pick((f"10.{self.block}.0.0/16", f"10.{self.block}.1.128/25", "192.0.2.0/24",
                                       "203.0.113.7/32", "172.16.0.0/24", f"fd00:{self.block:x}::/64",
                                       "2001:db8::/32", "0.0.0.0/0", "::/0", "fd0a::/56"))}
        return {"entity": self.pick(("any", "world", "host"))}

    def ports(self) -> list:
        rng = self.rng
        out = []
        for _ in range(rng.randrange(1, 4)):
            form = rng.randrange(7)
            if form == 0:
                out.append(f"{self.pick(('tcp', 'udp', 'sctp', 'TCP'))}/{rng.randrange(1, 65536)}")
            elif form == 1 and self.ranges < 10:
                self.ranges += 1
                lo = rng.randrange(1, 65000)
                out.append(f"{self.pick(('tcp', 'udp'))}/{lo}-{lo + rng.randrange(0, 500)}")
            elif form == 2:
                out.append(self.pick(("icmp", "icmpv6", "any", "tcp", "47", "udp/65535", "tcp/1")))
            elif form == 3:
                out.append({"protocol": self.pick(("tcp", "udp", 6, 17)), "port": rng.randrange(1, 65536)})
            elif form == 4 and self.ranges < 10:
                self.ranges += 1
                lo = rng.randrange(1, 65000)
                out.append({"protocol": "tcp", "port": lo, "endPort": lo + rng.randrange(0, 500)})
            elif form == 5:
                out.append({"protocol": self.pick((47, 132, "icmp", "any", 0))})
            else:
                out.append("tcp/443")
        return out

    def policy(self) -> dict:
        rng = self.rng
        self.ranges = 0
        rules = []
        for i in range(rng.randrange(0, 9)):
            r = {"name": f"r{i}" if rng.random() < 0.8 else f"rule.{i}_x-{i}", "action":
                 self.pick(("allow", "allow", "deny", "audit")),
                 "from": [self.peer() for _ in range(rng.randrange(1, 3))],
                 "to": [self.peer() for _ in range(rng.randrange(1, 3))]}
            if rng.random() < 0.7:
                r["ports"] = self.ports()
            if rng.random() < 0.2:
                r["description"] = self.pick(("text", "ünïcödé ✓", "x" * 500))
            if rng.random() < 0.2:
                r["conditions"] = {"posture": self.selector({"managed": (True, False), "compliant": (True, False),
                                                             "os": ("linux", "macos")})}
            if rng.random() < 0.25:
                window = rng.randrange(3)
                if window == 0:
                    r["valid"] = {"notBefore": self.time("past")}
                elif window == 1:
                    r["valid"] = {"notAfter": self.time(self.pick(("past", "future", "far")))}
                else:
                    start = NOW + dt.timedelta(days=rng.randrange(-300, 300))
                    r["valid"] = {"notBefore": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                  "notAfter": (start + dt.timedelta(days=rng.randrange(1, 90)))
                                  .strftime("%Y-%m-%dT%H:%M:%S+00:00")}
            rules.append(r)
        pol = {"apiVersion": API_VERSION, "kind": "Policy", "rules": rules}
        if rng.random() < 0.5:
            pol["metadata"] = {"name": self.pick(NAMES[:4]), "description": "generated"}
        if rng.random() < 0.3:
            pol["mode"] = self.pick(("audit", "enforce"))
        eps = self._inventory.get("endpoints", [])
        if eps and rng.random() < 0.4:
            pol["tests"] = [{"from": {"workload": self.pick(eps)["name"]}, "to": self.pick(
                ({"workload": self.pick(eps)["name"]}, "192.0.2.1", "fd00::99")),
                "port": self.pick(("tcp/443", "udp/53", "icmp", "any")),
                "expect": self.pick(("allow", "deny", "audit"))} for _ in range(rng.randrange(1, 3))]
        return pol


# --- serialisation and mutation ----------------------------------------------------------

def dump(data, rng: random.Random) -> bytes:
    """YAML in block or flow style, or JSON."""
    style = rng.randrange(4)
    if style == 3:
        return json.dumps(data, ensure_ascii=rng.random() < 0.5, indent=rng.choice((None, 1, "\t"))).encode()
    text = yaml.safe_dump(data, default_flow_style=style == 2, allow_unicode=rng.random() < 0.7, sort_keys=False,
                          width=rng.choice((80, 10 ** 6)))
    return text.encode()


def _nodes(data, path=()):
    yield path, data
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _nodes(v, path + (i,))


def _get(data, path):
    for p in path:
        data = data[p]
    return data


def _field_of(path) -> str | None:
    for p in reversed(path):
        if isinstance(p, str):
            return p
    return None


def mutate_data(data, rng: random.Random) -> tuple[object, str]:
    """One structural change to a deep copy of data; returns it and what was done."""
    data = copy.deepcopy(data)
    nodes = list(_nodes(data))
    path, value = rng.choice(nodes)
    op = rng.choice(("delete", "unknown-key", "retype", "edge", "edge", "edge", "wrap", "duplicate-item", "swap"))
    if op == "edge":
        edges = [(p, FIELD_EDGES[_field_of(p)]) for p, _ in nodes if _field_of(p) in FIELD_EDGES]
        if edges:
            path, pool = rng.choice(edges)
            new = rng.choice(pool)
            return _set(data, path, new), f"edge {path}={_short(new)}"
        op = "retype"
    if op == "delete" and path:
        parent = _get(data, path[:-1])
        del parent[path[-1]]
        return data, f"delete {path}"
    if op == "unknown-key":
        maps = [p for p, v in nodes if isinstance(v, dict)]
        if maps:
            path = rng.choice(maps)
            key = rng.choice(UNKNOWN_KEYS)
            _get(data, path)[key] = rng.choice(WRONG_VALUES)
            return data, f"unknown key {key!r} at {path}"
    if op == "wrap":
        new = rng.choice(([value], {"x": value}, list(value.items()) if isinstance(value, dict) else value,
                          {str(i): v for i, v in enumerate(value)} if isinstance(value, list) else value,
                          str(value) if not isinstance(value, str) else [value]))
        return _set(data, path, new), f"wrap {path}"
    if op == "duplicate-item":
        lists = [p for p, v in nodes if isinstance(v, list) and v]
        if lists:
            path = rng.choice(lists)
            seq = _get(data, path)
            seq.append(copy.deepcopy(rng.choice(seq)))
            return data, f"duplicate item in {path}"
    if op == "swap":
        others = [v for p, v in nodes if p != path]
        if others:
            return _set(data, path, copy.deepcopy(rng.choice(others))), f"swap {path}"
    new = copy.deepcopy(rng.choice(WRONG_VALUES))
    return _set(data, path, new), f"retype {path}={_short(new)}"


def _set(data, path, new):
    if not path:
        return new
    _get(data, path[:-1])[path[-1]] = new
    return data


def _short(v) -> str:
    text = repr(v)
    return text if len(text) < 60 else text[:57] + "..."


def mutate_text(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One change to the text or bytes of a document."""
    lines = raw.split(b"\n")
    op = rng.choice(("truncate", "truncate", "delete-line", "duplicate-line", "swap-lines", "tab", "byte",
                     "bad-bytes", "char", "bom", "utf16", "second-doc", "doc-end", "indent", "anchor"))
    i = rng.randrange(len(lines))
    if op == "truncate":
        n = rng.randrange(len(raw) + 1)
        return raw[:n], f"truncate at {n}"
    if op == "delete-line":
        return b"\n".join(lines[:i] + lines[i + 1:]), f"delete line {i + 1}"
    if op == "duplicate-line":
        return b"\n".join(lines[:i + 1] + lines[i:]), f"duplicate line {i + 1}"
    if op == "swap-lines":
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return b"\n".join(lines), f"swap lines {i + 1} {j + 1}"
    if op == "tab":
        lines[i] = b"\t" + lines[i] if rng.random() < 0.5 else lines[i].replace(b"  ", b"\t", 1)
        return b"\n".join(lines), f"tab on line {i + 1}"
    if op == "byte":
        pos = rng.randrange(len(raw) or 1)
        return raw[:pos] + bytes([rng.randrange(256)]) + raw[pos + 1:], f"byte at {pos}"
    if op == "bad-bytes":
        pos = rng.randrange(len(raw) + 1)
        bad = rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\x1b[0m", b"\xef\xbb\xbf", b"\xf4\x90\x80\x80"))
        return raw[:pos] + bad + raw[pos:], f"bytes {bad!r} at {pos}"
    if op == "char":
        pos = rng.randrange(len(lines[i]) + 1)
        ch = rng.choice(("\u2028", "\u0085", "\ufeff", "\x7f", "\u00a0", "\u200b", "#", ":", "&", "*", "!", "|",
                         ">", "%", "@", "`", "{", "}", "[", "]", ",", "'", '"', "\\", "?", "-", "\x0c"))
        lines[i] = lines[i][:pos] + ch.encode() + lines[i][pos:]
        return b"\n".join(lines), f"char {ch!r} on line {i + 1}"
    if op == "bom":
        return b"\xef\xbb\xbf" + raw, "BOM"
    if op == "utf16":
        return raw.decode("utf-8", "replace").encode("utf-16"), "UTF-16"
    if op == "second-doc":
        return raw + b"\n---\n" + raw, "second document"
    if op == "doc-end":
        return b"\n".join(lines[:i] + [rng.choice((b"...", b"---", b"%YAML 1.1"))] + lines[i:]), \
            f"document marker at line {i + 1}"
    if op == "indent":
        lines[i] = b" " * rng.randrange(1, 5) + lines[i]
        return b"\n".join(lines), f"indent line {i + 1}"
    # anchor: give a line's value an anchor and refer to it elsewhere
    j = rng.randrange(len(lines))
    if b": " in lines[i] and b": " in lines[j]:
        lines[i] = lines[i].replace(b": ", b": &fz ", 1)
        key = lines[j].split(b": ", 1)[0]
        lines[j] = key + b": *fz"
        return b"\n".join(lines), f"alias line {j + 1} -> line {i + 1}"
    return raw, "unchanged"


# --- hostile YAML ----------------------------------------------------------------------------

def _laughs(levels: int, width: int) -> str:
    out = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        out.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(out) + "\n"


def hostile(rng: random.Random) -> tuple[bytes, str]:
    """A document made to exhaust a parser: nesting, aliases, numbers, sizes, garbage."""
    n = rng.choice((65, 100, 450, 1000, 5000, 100_000))
    choice = rng.randrange(22)
    if choice == 0:
        return ("[" * n + "]" * n).encode(), f"{n} nested flow lists"
    if choice == 1:
        return ("{a: " * n + "1" + "}" * n).encode(), f"{n} nested flow maps"
    if choice == 2:
        return "".join(f"{'  ' * i}k{i}:\n" for i in range(min(n, 5000))).encode(), f"{min(n, 5000)} nested block maps"
    if choice == 3:
        return "".join(f"{'  ' * i}-\n" for i in range(min(n, 5000))).encode(), f"{min(n, 5000)} nested block lists"
    if choice == 4:
        return ("rules: " + "[" * n + "]" * n + "\n").encode(), f"rules nested {n} deep"
    if choice == 5:
        return rng.choice((b"a: &a [*a]\n", b"&a [*a]\n", b"a: &a {b: *a}\n", b"&a {x: [1, {y: *a}]}\n",
                           b"apiVersion: zt-dataplane/v1\nkind: Policy\nrules: &r\n  - name: x\n    action: allow\n"
                           b"    from: *r\n    to: *r\n")), "recursive alias"
    if choice == 6:
        return _laughs(rng.choice((5, 9, 12)), rng.choice((9, 10))).encode(), "billion laughs"
    if choice == 7:
        peer = "&p [" + ", ".join(["{entity: any}"] * 50) + "]"
        body = ("apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n  - &r {name: r, action: allow, from: "
                f"{peer}, to: *p}}\n" + "".join(f"  - *r\n" for _ in range(rng.choice((10, 3000)))))
        return body.encode(), "aliased rules"
    if choice == 8:
        digits = rng.choice(("9" * 5000, "0x" + "f" * 5000, "0b" + "1" * 20000, "-" + "9" * 4301, "0o" + "7" * 6000,
                             "1" + "_0" * 3000, "9" * 101, "9" * 100))
        field = rng.choice(("rules: []\nmetadata: {name: %s}",
                            "rules: [{name: r, action: allow, from: [{entity: any}], "
                            "to: [{entity: any}], ports: [{protocol: tcp, port: %s}]}]",
                            "rules: [{name: r, action: allow, from: [{workload: {app: %s}}], to: [{entity: any}]}]"))
        return (f"apiVersion: zt-dataplane/v1\nkind: Policy\n" + field % digits + "\n").encode(), "huge integer"
    if choice == 9:
        s = "x" * rng.choice((10 ** 4, 10 ** 6))
        return f"apiVersion: zt-dataplane/v1\nkind: Policy\nmetadata: {{name: {s}}}\nrules: []\n".encode(), \
            "long string"
    if choice == 10:
        return rng.choice((b"", b"\n", b"   \n\n", b"# only a comment\n", b"---\n", b"...\n", b"~\n", b"null\n",
                           b"[]\n", b"{}\n", b"--- \n---\n", b"\xef\xbb\xbf", b"0\n", b"true\n", b"''\n")), "empty-ish"
    if choice == 11:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))), "binary garbage"
    if choice == 12:
        return (b"apiVersion: zt-dataplane/v1\nkind: Policy\nrules: []\n---\n"
                b"apiVersion: zt-dataplane/v1\nkind: Policy\nrules: []\n"), "two documents"
    if choice == 13:
        return b"apiVersion: zt-dataplane/v1\nkind: Policy\nrules: []\nrules: []\n", "duplicate key"
    if choice == 14:
        return b"apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n\t- name: x\n", "tab indentation"
    if choice == 15:
        return b"apiVersion: zt-dataplane/v1\nkind: Policy\nrules: []\n" + b"#" * 10 ** 6 + b"\n", "long comment"
    if choice == 16:
        body = "apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n" + "".join(
            f"  - {{name: r{i}, action: allow, from: [{{entity: any}}], to: [{{entity: host}}], "
            f"ports: [tcp/{i + 1}]}}\n"
            for i in range(rng.choice((200, 1000))))
        return body.encode(), "many rules"
    if choice == 17:
        return (b"!!python/object/apply:os.system ['true']\n", b"a: !!binary aGk=\n", b"a: !!set {x, y}\n",
                b"a: !!omap [a: 1]\n", b"a: !custom 1\n", b"? [a, b]\n: c\n", b"? {a: 1}\n: c\n",
                b"a: !!int xyz\n", b"a: !!float nan\n", b"rules: !!str []\n", b"%TAG ! tag:x,2000:\n--- !x\n")[
            rng.randrange(11)], "tags"
    if choice == 18:
        return b"a: *nowhere\n", "undefined alias"
    if choice == 19:
        return ("apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n" + "  - " * 2 + "\n").encode(), "odd nesting"
    if choice == 20:
        return "\n".join(["a:"] + [" " * i + "b:" for i in range(1, min(n, 2000))]).encode(), "staircase"
    return ('"' + "\\" * rng.randrange(1, 5) + "u" + "d800" + '"\n').encode(), "escape"


# --- cases ---------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    seed: str
    index: int
    family: str                 # valid | example | mutated | text | hostile | truncated
    what: str
    policy: bytes
    inventory: bytes

    def show(self, limit: int = 1500) -> str:
        def cut(b: bytes) -> str:
            text = b.decode("utf-8", "backslashreplace")
            return text if len(text) <= limit else text[:limit] + f"... ({len(b)} bytes)"
        return (f"seed {self.seed} case {self.index} ({self.family}: {self.what})\n--- policy\n{cut(self.policy)}\n"
                f"--- inventory\n{cut(self.inventory)}")


def case(seed: str, index: int) -> Case:
    rng = random.Random(f"{seed}:{index}")
    gen = Generator(rng)
    inv_data = gen.inventory()
    pol_data = gen.policy()
    roll = rng.random()
    if roll < 0.2:
        return Case(seed, index, "valid", "generated", dump(pol_data, rng), dump(inv_data, rng))
    if roll < 0.3:
        pol, inv = EXAMPLE_POLICY, EXAMPLE_INVENTORY
        what = "examples"
        if rng.random() < 0.8:
            target = rng.choice(("policy", "inventory"))
            raw = pol if target == "policy" else inv
            if rng.random() < 0.5:
                raw, what = mutate_text(raw, rng)
            else:
                data, what = mutate_data(source.loads(raw.decode(), "example")[0], rng)
                raw = dump(data, rng)
            pol, inv = (raw, inv) if target == "policy" else (pol, raw)
            what = f"{target}: {what}"
        return Case(seed, index, "example", what, pol, inv)
    target = "policy" if rng.random() < 0.75 else "inventory"
    data = pol_data if target == "policy" else inv_data
    if roll < 0.7:
        what = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            data, w = mutate_data(data, rng)
            what.append(w)
        raw, family, what = dump(data, rng), "mutated", "; ".join(what)
    elif roll < 0.9:
        raw, what = mutate_text(dump(data, rng), rng)
        family = "text"
    else:
        raw, what = hostile(rng)
        family = "hostile"
    pol = raw if target == "policy" else dump(pol_data, rng)
    inv = raw if target == "inventory" else dump(inv_data, rng)
    return Case(seed, index, family, f"{target}: {what}", pol, inv)


# --- the oracle ------------------------------------------------------------------------------

KINDS = (("not UTF-8", "encoding"), ("not valid YAML", "yaml"), ("nested more than", "depth"),
         ("alias", "alias"), ("number of", "huge-number"), ("empty", "empty"), ("duplicate key", "duplicate-key"),
         ("keys must be plain", "complex-key"), ("unknown field", "unknown-field"), ("zone id", "zone-id"),
         ("CIDR", "cidr"), ("address", "address"), ("calendar", "time"), ("time", "time"), ("RFC 3339", "time"),
         ("port", "port"), ("protocol", "port"), ("apiVersion", "api-version"), ("kind must be", "kind"),
         ("must be a", "wrong-type"), ("needs", "missing-field"), ("duplicate", "duplicate-name"),
         ("label", "label"), ("selector", "selector"), ("peer", "peer"), ("name", "name"), ("action", "action"),
         ("mode", "mode"), ("expect", "test"), ("entity", "entity"), ("is not in hosts", "unknown-host"))


def error_kind(message: str) -> str:
    text = message.split(": ", 1)[-1] if ": " in message else message
    for needle, kind in KINDS:
        if needle in text:
            return kind
    return "other"


@dataclasses.dataclass
class Outcome:
    result: str                  # compiled | located | capacity | FAILURE
    kind: str = ""               # the error's kind, or what went wrong
    detail: str = ""


def located_problems(e: SourceError, files: dict) -> str | None:
    """None when every problem is one line 'FILE:LINE: message' with LINE inside FILE; else what is wrong."""
    if not e.problems:
        return "a SourceError with no problems"
    for problem in e.problems:
        if "\n" in problem or "\r" in problem:
            return f"a problem of more than one line: {problem[:300]!r}"
        m = re.match(r"^(?P<file>.+?):(?P<line>\d+): \S", problem)
        if not m or m["file"] not in files:
            return f"a problem without FILE:LINE: {problem[:300]!r}"
        lines = files[m["file"]].count(b"\n") + 1
        if not 1 <= int(m["line"]) <= lines:
            return f"line {m['line']} outside the file's {lines} lines: {problem[:300]!r}"
    return None


def check_state(state) -> str | None:
    """None when a compiled state is self-consistent; else what is not."""
    known = set(state.labels) | {abi.ReservedIdentity.ANY, abi.ReservedIdentity.HOST, abi.ReservedIdentity.WORLD}
    rule_ids = set(state.rule_ids.values())
    for e in state.entries:
        try:
            e.validate()
        except MapError as err:
            return f"entry {e}: {err}"
        if e.local_id not in state.locals:
            return f"entry {e}: local identity not local"
        if e.remote_id not in known:
            return f"entry {e}: remote identity {e.remote_id} does not exist"
        if e.rule_id not in rule_ids or not 0 <= e.proto <= 255:
            return f"entry {e}: bad rule or protocol"
    kernel_keys = set()
    for net, ident in state.identities.items():
        if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return f"ipcache key {net!r} is not a network"
        if getattr(net.network_address, "scope_id", None) is not None:
            return f"ipcache key {net} has a zone id"
        kernel_keys.add((net.version, int(net.network_address), net.prefixlen))
        if ident not in state.labels or ident == abi.ReservedIdentity.ANY:
            return f"ipcache {net} -> {ident}: no such identity"
    if len(kernel_keys) != len(state.identities):
        return "two ipcache entries are one kernel key"
    for net, v in state.ipcache(wall_now=NOW, mono_now=MONO_NOW).items():
        if isinstance(v, tuple):
            ident, expires = v
            if not 1 <= expires <= EXPIRES_MAX:
                return f"ipcache {net}: expires_s {expires} does not fit the u32 field"
            exact = MONO_NOW + (state.expiries[net] - NOW).total_seconds()
            if expires < min(exact, EXPIRES_MAX) - 1:
                return f"ipcache {net}: expires_s {expires} is earlier than {exact} (wrapped)"
    if state.next_change is not None and state.next_change.utcoffset() != dt.timedelta(0):
        return f"next_change {state.next_change} is not UTC"
    json.loads(state.to_json_text())
    # Everything the CLI, the logs and the wire may print must be text.
    try:
        json.dumps({"labels": state.labels, "rules": state.rule_ids}, ensure_ascii=False,
                   default=str).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a label or rule name cannot be printed: {e}"
    return None


def judge(c: Case, workdir: Path) -> Outcome:
    """What loading and compiling the case gives; FAILURE for anything not allowed."""
    ppath, ipath = workdir / "policy.yaml", workdir / "inventory.yaml"
    ppath.write_bytes(c.policy)
    ipath.write_bytes(c.inventory)
    files = {str(ppath): c.policy, str(ipath): c.inventory}
    try:
        policy = load_policy(ppath)
        inventory = load_inventory(ipath)
        compiler = Compiler(policy, inventory, Allocator(None), Allocator(None, first=1, limit=65535, what="rule"),
                            NOW)
        hosts = [h.name for h in inventory.hosts][:3] + ["not-in-the-inventory"]
        capacity = None
        for host in hosts:
            state = compiler.compile(host)
            problem = check_state(state)
            if problem:
                return Outcome("FAILURE", "inconsistent state", f"host {host}: {problem}")
            try:
                tables.layout_policy(state.entries)
            except MapError as e:
                if "\n" in str(e):
                    return Outcome("FAILURE", "capacity message", str(e))
                capacity = str(e)
        if capacity:
            return Outcome("capacity", "capacity", capacity)
        return Outcome("compiled")
    except SourceError as e:
        bad = located_problems(e, files)
        if bad:
            return Outcome("FAILURE", "not located", bad)
        return Outcome("located", error_kind(e.problems[0]), e.problems[0][:300])
    except CaseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001 - the point: nothing else may escape
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return Outcome("FAILURE", type(e).__name__, "".join(traceback.format_exception(e))[-3000:])


# --- the guarded run ----------------------------------------------------------------------

class CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def run(seed: str, count: int, only: int | None, workdir: Path) -> dict:
    """Judges cases [0, count) (or the one case `only`) in this process, each
    under a CASE_SECONDS alarm; returns the summary with every failure."""
    signal.signal(signal.SIGALRM, _alarm)
    indices = [only] if only is not None else range(count)
    summary = {"seed": seed, "documents": 0, "valid_compiles": 0, "located_errors": 0, "capacity_refusals": 0,
               "tracebacks": 0, "by_kind": {}, "by_family": {}, "failures": []}
    t0 = time.monotonic()
    for i in indices:
        (workdir / "current").write_text(f"{i}\n")     # names the case if the process dies in it
        c = case(seed, i)
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            out = judge(c, workdir)
        except CaseTimeout:
            out = Outcome("FAILURE", "timeout", f"not decided within {CASE_SECONDS} s")
        except MemoryError:
            out = Outcome("FAILURE", "MemoryError", "")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        summary["documents"] += 1
        fam = summary["by_family"].setdefault(c.family, {})
        fam[out.result] = fam.get(out.result, 0) + 1
        if out.result == "compiled":
            summary["valid_compiles"] += 1
        elif out.result == "capacity":
            summary["capacity_refusals"] += 1
        elif out.result == "located":
            summary["located_errors"] += 1
            summary["by_kind"][out.kind] = summary["by_kind"].get(out.kind, 0) + 1
        if c.family == "valid" and out.result == "located":
            out = Outcome("FAILURE", "valid document refused", out.detail)
        if out.result == "FAILURE":
            summary["tracebacks"] += out.kind not in ("not located", "inconsistent state", "valid document refused")
            summary["failures"].append({"case": i, "kind": out.kind, "detail": out.detail, "document": c.show()})
    summary["duration_s"] = round(time.monotonic() - t0, 2)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", default="1")
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--case", type=int, default=None, help="judge this one case only")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--memory", type=int, default=MEMORY_LIMIT, help="address-space limit in bytes")
    args = ap.parse_args(argv)
    import resource

    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = args.memory if hard == resource.RLIM_INFINITY else min(args.memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    summary = run(args.seed, args.cases, args.case, Path(args.workdir))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
