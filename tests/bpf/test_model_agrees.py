"""Differential test: the kernel against loader.model.Model.

Random ipcaches (nested IPv4 and IPv6 prefixes of many lengths, hosts) and
random policies (exact ports, ranges, any port, any protocol, any remote,
WORLD, all three actions) are written with loader.tables; then thousands of
random new flows go through random hooks, and for every one the kernel's
verdict, reason, rule and identities (from its event; allow sampling is 1,
so every judged packet reports) must equal the model's. The seed is fixed;
DP_MODEL_SEED overrides it to explore.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import random

from loader import abi, tables
from loader.model import Model
from tests.bpf.packets import (DIRECTION, GRE_P, HOOK_ID, HOOKS, ICMP_OF, TCP_P, UDP_P, echo_frame, frame,
                               send, tcp_frame, udp_frame)

SEED = int(os.environ.get("DP_MODEL_SEED", "731975"))
ROUNDS = 6
PACKETS_PER_ROUND = 900          # 5400 packets in all
AUDIT_DEFAULT_ROUNDS = {2, 5}
SCTP_P = 132

V4_LENGTHS = (0, 8, 10, 12, 16, 20, 22, 24, 26, 28, 30, 31, 32)
V6_LENGTHS = (0, 16, 32, 40, 48, 56, 64, 80, 96, 112, 120, 126, 127, 128)
COMMON_PORTS = (1, 22, 53, 80, 443, 1024, 8080, 65535)


class Scenario:
    """One random ipcache and policy."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.identities = self._identities()
        self.ids = sorted(set(self.identities.values()))
        self.entries = self._entries()
        self.ports = sorted({p for e in self.entries for p in (e.port_lo - 1, e.port_lo, e.port_hi, e.port_hi + 1)
                             if 0 <= p <= 65535} | set(COMMON_PORTS))
        self.networks = {4: [n for n in map(ipaddress.ip_network, self.identities) if n.version == 4],
                         6: [n for n in map(ipaddress.ip_network, self.identities) if n.version == 6]}
        self.by_identity = collections.defaultdict(list)     # (family, identity) -> networks
        for net, ident in self.identities.items():
            net = ipaddress.ip_network(net)
            self.by_identity[(net.version, ident)].append(net)

    def _identities(self) -> dict:
        rng = self.rng
        pool = list(range(256, 256 + rng.randint(8, 24))) + [abi.ReservedIdentity.HOST]
        out = {}
        for family, lengths, bits in ((4, V4_LENGTHS, 32), (6, V6_LENGTHS, 128)):
            chosen = [plen for plen in lengths if plen and rng.random() < 0.6]
            if rng.random() < 0.25:
                chosen.append(0)
            net_type = ipaddress.IPv4Network if family == 4 else ipaddress.IPv6Network
            base = 0x0A000000 if family == 4 else 0xFD << 120
            for _ in range(rng.randint(3, 7)):       # anchors: nested prefixes around one address
                anchor = base | rng.getrandbits(bits - 8) if rng.random() < 0.8 else rng.getrandbits(bits)
                for plen in chosen:
                    if rng.random() < 0.7:
                        net = net_type((anchor, plen), strict=False)
                        out[str(net)] = rng.choice(pool)
            for _ in range(rng.randint(2, 8)):       # unrelated hosts
                out[str(net_type((rng.getrandbits(bits), bits)))] = rng.choice(pool)
        return out

    def _entries(self) -> list[tables.PolicyEntry]:
        rng = self.rng
        W = abi.ReservedIdentity.WORLD
        out, ranges_per_key = [], collections.Counter()
        for rule in range(1, rng.randint(80, 220)):
            local = rng.choice(self.ids + [W])
            remote = rng.choice(self.ids + [0, 0, W, W])
            direction = rng.choice(list(abi.Direction))
            proto = rng.choice((TCP_P, TCP_P, UDP_P, 1, 58, GRE_P, 0))
            action = rng.choices((abi.Verdict.ALLOW, abi.Verdict.AUDIT, abi.Verdict.DENY), (5, 2, 3))[0]
            kind = "any" if proto == 0 else rng.choice(("exact", "exact", "range", "range", "any"))
            if kind == "exact":
                lo = hi = rng.choice(COMMON_PORTS + (rng.randint(1, 65535),))
            elif kind == "range":
                lo = rng.choice((1, 1000, 1024, rng.randint(1, 65000)))
                hi = min(65535, lo + rng.choice((1, 9, 100, 1000, rng.randint(1, 65535))))
                key = (local, remote, direction, proto)
                if ranges_per_key[key] >= abi.MAX_RANGES:
                    continue
                ranges_per_key[key] += 1
            else:
                lo, hi = tables.ANY_PORT
            out.append(tables.PolicyEntry(local, remote, direction, proto, lo, hi, action, rule))
        return out

    def _inside(self, net) -> str:
        bits = net.max_prefixlen
        host = int(net.network_address) | (self.rng.getrandbits(bits - net.prefixlen) if net.prefixlen < bits else 0)
        return str(ipaddress.ip_address(host if bits == 32 else host.to_bytes(16, "big")))

    def address(self, family: int, identity: int | None = None) -> str:
        """An address; with identity, one inside a prefix of that identity
        when there is one (a longer prefix inside it may still name another)."""
        rng = self.rng
        if identity is not None and self.by_identity.get((family, identity)):
            return self._inside(rng.choice(self.by_identity[(family, identity)]))
        nets = self.networks[family]
        bits = 32 if family == 4 else 128
        roll = rng.random()
        if nets and roll < 0.65:             # inside a prefix (and maybe inside longer ones)
            return self._inside(rng.choice(nets))
        if nets and roll < 0.8:              # just outside a prefix
            net = rng.choice(nets)
            edge = (int(net.network_address) - 1) if rng.random() < 0.5 else (int(net.broadcast_address) + 1)
            edge %= 1 << bits
            return str(ipaddress.ip_address(edge if family == 4 else edge.to_bytes(16, "big")))
        value = rng.getrandbits(bits)        # anywhere
        return str(ipaddress.ip_address(value if family == 4 else value.to_bytes(16, "big")))

    def flow(self):
        """A random new flow; about half of them aimed at a random entry's
        identities, direction, protocol and port edges, the rest anywhere."""
        rng = self.rng
        family = rng.choice((4, 6))
        sport = rng.randint(1024, 65535)
        if self.entries and rng.random() < 0.5:
            e = rng.choice(self.entries)
            hook = rng.choice([h for h in HOOKS if DIRECTION[h] == e.direction])
            local = self.address(family, e.local_id)
            remote = self.address(family, e.remote_id or rng.choice(self.ids))
            src, dst = (remote, local) if e.direction == abi.Direction.INGRESS else (local, remote)
            proto = {1: "icmp", 58: "icmp", 0: rng.choice((TCP_P, UDP_P, GRE_P))}.get(e.proto, e.proto)
            dport = rng.choice([p for p in (e.port_lo - 1, e.port_lo, e.port_hi, e.port_hi + 1,
                                            (e.port_lo + e.port_hi) // 2) if 0 <= p <= 65535])
        else:
            hook = rng.choice(HOOKS)
            proto = rng.choice((TCP_P, TCP_P, UDP_P, "icmp", GRE_P, SCTP_P))
            src, dst = self.address(family), self.address(family)
            dport = rng.choice(self.ports) if rng.random() < 0.7 else rng.randint(0, 65535)
        if proto == TCP_P:
            data = tcp_frame(family, src, dst, sport, dport)
        elif proto == UDP_P:
            data = udp_frame(family, src, dst, sport, dport)
        elif proto == "icmp":
            proto = ICMP_OF[family]
            data = echo_frame(family, src, dst, dport, reply=rng.random() < 0.3)
            sport = dport
        else:
            data = frame(family, src, dst, proto, bytes(8))
            sport = dport = 0
        return family, hook, src, dst, proto, sport, dport, data


def test_kernel_agrees_with_model(dp, tap):
    rng = random.Random(SEED)
    dp.set_config(allow_sample=1)
    seen = collections.Counter()
    decided_by = collections.Counter()
    mismatches = []
    total = 0
    for rnd in range(ROUNDS):
        sc = Scenario(rng)
        tables.sync_identities(dp, sc.identities)
        tables.sync_policy(dp, sc.entries)
        dp.set_config(audit_default=rnd in AUDIT_DEFAULT_ROUNDS)
        dp.ct.clear()
        tap.take()
        model = Model.from_datapath(dp)
        # What the maps hold is what the entries say.
        reference = Model.from_entries(sc.identities, sc.entries, audit_default=rnd in AUDIT_DEFAULT_ROUNDS)
        assert (model.policy, model.range_sets) == (reference.policy, reference.range_sets), f"seed {SEED} round {rnd}"
        kinds = {e.rule_id: _kind(e) for e in sc.entries}

        for n in range(PACKETS_PER_ROUND):
            family, hook, src, dst, proto, sport, dport, data = sc.flow()
            direction = DIRECTION[hook]
            want = model.judge(src, dst, proto, dport, direction)
            out = send(dp, hook, data)
            evs = tap.take()
            total += 1
            if out.passed:
                dp.ct.clear()             # the next packet must be a new flow too
            got, flow_ok = None, False
            if len(evs) == 1:
                e = evs[0]
                got = (out.passed, e.verdict, e.reason, e.rule_id, e.local_id, e.remote_id)
                flow_ok = (e.src, e.dst, e.sport, e.dport, e.proto, e.direction, e.hook) == (
                    ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport, proto, direction,
                    HOOK_ID[hook])
            expected = (not want.reason.is_drop, want.verdict, want.reason, want.rule_id, want.local_id,
                        want.remote_id)
            if got != expected or not flow_ok or out.reason != want.reason:
                mismatches.append(f"round {rnd} packet {n}: {hook} {src}:{sport} -> {dst}:{dport} proto {proto}: "
                                  f"kernel {got} (reason counter {out.reason.name}, {len(evs)} events), "
                                  f"model {expected}")
            seen[want.reason] += 1
            decided_by[kinds.get(want.rule_id, "default")] += 1
            if want.remote_id == abi.ReservedIdentity.WORLD:
                seen["remote_world"] += 1
            if want.local_id == abi.ReservedIdentity.WORLD:
                seen["local_world"] += 1

    assert not mismatches, (f"seed {SEED}: kernel and model disagree on {len(mismatches)} of {total} flows:\n"
                            + "\n".join(mismatches[:20]))
    # The draw must exercise every outcome and every kind of entry, or agreeing means little.
    assert total >= 5000
    for reason in (abi.Reason.PASS_POLICY, abi.Reason.PASS_AUDIT, abi.Reason.DROP_POLICY_DENY,
                   abi.Reason.DROP_POLICY_DEFAULT):
        assert seen[reason] >= 100, f"seed {SEED}: only {seen[reason]} flows with {reason.name}: {dict(seen)}"
    for kind in ("exact", "range", "any_port", "any_protocol", "any_remote", "world_remote", "default"):
        assert decided_by[kind] >= 20, f"seed {SEED}: only {decided_by[kind]} flows decided by {kind}: " \
                                       f"{dict(decided_by)}"
    assert seen["remote_world"] >= 200 and seen["local_world"] >= 200, f"seed {SEED}: {dict(seen)}"


def _kind(e: tables.PolicyEntry) -> str:
    if e.remote_id == 0:
        return "any_remote"
    if e.remote_id == abi.ReservedIdentity.WORLD:
        return "world_remote"
    if e.proto == 0:
        return "any_protocol"
    if (e.port_lo, e.port_hi) == tables.ANY_PORT:
        return "any_port"
    return "exact" if e.port_lo == e.port_hi else "range"
