"""Pure-Python statement of what the datapath decides from its maps.

Given the ipcache and policy map contents, Model answers the question the
BPF programs answer for a new flow: which identities, which verdict, which
rule, which reason. It is written from the semantics in bpf/lib/policy.h
and bpf/lib/identity.h, not from the C code, and the tests compare the two
on random maps and packets: they must agree exactly. `policy explain` and
the fuzzers build on it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Mapping

from loader import abi
from loader import tables


@dataclasses.dataclass(frozen=True)
class Decision:
    verdict: abi.Verdict
    reason: abi.Reason
    rule_id: int
    local_id: int = 0
    remote_id: int = 0


class Model:
    def __init__(self, identities: Mapping, policy: Mapping, range_sets: Mapping, audit_default: bool = False):
        """identities: network -> identity; policy: (local, remote, dport, proto, dir) ->
        (action, rule); range_sets: same key -> ((lo, hi, rule, action), ...)."""
        self.audit_default = audit_default
        self.policy = dict(policy)
        self.range_sets = dict(range_sets)
        self._by_len: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        for net, ident in identities.items():
            net = ipaddress.ip_network(net)
            self._by_len[net.version].setdefault(net.prefixlen, {})[int(net.network_address)] = int(ident)
        self._lens = {v: sorted(d, reverse=True) for v, d in self._by_len.items()}

    @classmethod
    def from_entries(cls, identities: Mapping, entries, audit_default: bool = False) -> "Model":
        policy, sets = tables.layout_policy(entries)
        return cls(identities, policy, sets, audit_default)

    @classmethod
    def from_datapath(cls, dp) -> "Model":
        """The live generation's state."""
        gen = tables.active_generation(dp)
        policy, cur = tables.read_policy(dp, gen)
        now = tables.monotonic_seconds()
        live = {n: ident for n, (ident, expires) in tables.read_ipcache(dp, gen).items()
                if not expires or now < expires}
        return cls(live, policy, cur["sets"], tables.live_audit_default(dp))

    def identity_of(self, ip) -> int:
        ip = ipaddress.ip_address(ip)
        bits = ip.max_prefixlen
        value = int(ip)
        for plen in self._lens[ip.version]:
            masked = value & (((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1))
            hit = self._by_len[ip.version][plen].get(masked)
            if hit is not None:
                return hit
        return abi.ReservedIdentity.WORLD

    def decide(self, local_id: int, remote_id: int, direction: int, proto: int, port: int) -> Decision:
        verdict, rule = abi.Verdict.NONE, 0

        def fold(action: int, rule_id: int) -> bool:
            nonlocal verdict, rule
            if action > verdict:
                verdict, rule = abi.Verdict(action), rule_id
            return verdict >= abi.Verdict.DENY

        settled = False
        for remote in (remote_id, abi.ReservedIdentity.ANY):
            for specificity in (0, 1, 2):
                key = (local_id, remote, port if specificity == 0 else 0,
                       0 if specificity == 2 else proto, direction)
                entry = self.policy.get(key)
                if entry is None:
                    continue
                action, rule_id = entry
                if specificity == 1 and key in self.range_sets:
                    for lo, hi, r_rule, r_action in self.range_sets[key]:
                        if lo <= port <= hi:
                            fold(r_action, r_rule)
                            break
                    if verdict >= abi.Verdict.DENY:
                        settled = True
                        break
                if fold(action, rule_id):
                    settled = True
                    break
            if settled:
                break

        if verdict == abi.Verdict.DENY:
            return Decision(verdict, abi.Reason.DROP_POLICY_DENY, rule, local_id, remote_id)
        if verdict == abi.Verdict.AUDIT:
            return Decision(verdict, abi.Reason.PASS_AUDIT, rule, local_id, remote_id)
        if verdict == abi.Verdict.ALLOW:
            return Decision(verdict, abi.Reason.PASS_POLICY, rule, local_id, remote_id)
        if self.audit_default:
            return Decision(abi.Verdict.AUDIT, abi.Reason.PASS_AUDIT, 0, local_id, remote_id)
        return Decision(abi.Verdict.DENY, abi.Reason.DROP_POLICY_DEFAULT, 0, local_id, remote_id)

    def judge(self, src, dst, proto: int, dport: int, direction: int) -> Decision:
        """A new flow's first packet src -> dst, seen in `direction`."""
        local, remote = (dst, src) if direction == abi.Direction.INGRESS else (src, dst)
        return self.decide(self.identity_of(local), self.identity_of(remote), direction, proto, dport)
