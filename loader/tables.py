"""Map codecs for identities and policy entries, and writers that bring the
maps to a wanted content in an order that never opens a window:

- ipcache: new and changed prefixes are written before the prefix-length
  list grows; the list shrinks before removed prefixes are deleted.
- policy: a changed port-range set is written at a free index before the
  policy entry switches to it (array updates are not atomic; hash updates
  are); entries are added and changed before any is deleted.

Which entries to want is the policy compiler's business; this module only
lays them out in the maps.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Iterable, Mapping

from loader import abi
from loader.errors import MapError

ANY_PORT = (0, 65535)


# --- identities --------------------------------------------------------------

def _plens_for(networks: Iterable[abi.IpNetwork]) -> dict[int, abi.Plens]:
    lengths = {abi.Family.IPV4: set(), abi.Family.IPV6: set()}
    for net in networks:
        lengths[abi.family_of(net)].add(net.prefixlen)
    out = {}
    for slot, family in ((0, abi.Family.IPV4), (1, abi.Family.IPV6)):
        lens = sorted(lengths[family], reverse=True)
        if len(lens) > abi.MAX_PLENS:
            raise MapError(f"dp_plens_v1: {len(lens)} distinct IPv{int(family)} prefix lengths, "
                           f"the datapath probes at most {abi.MAX_PLENS}")
        p = abi.Plens(count=len(lens))
        for i, plen in enumerate(lens):
            p.e[i].prefixlen = plen
            p.e[i].mask = abi.mask_words(family, plen)
        out[slot] = p
    return out


def read_identities(dp) -> dict[abi.IpNetwork, int]:
    lpm = _is_lpm(dp)
    return {abi.ip_key_network(k, lpm): v.identity for k, v in dp.ipcache.items()}


def _is_lpm(dp) -> bool:
    return dp.ipcache.map_type == 11  # BPF_MAP_TYPE_LPM_TRIE


def sync_identities(dp, wanted: Mapping, current: Mapping | None = None) -> dict:
    """Makes the ipcache hold exactly `wanted` (network -> identity).
    Returns counts of what changed."""
    wanted = {ipaddress.ip_network(n): int(i) for n, i in wanted.items()}
    for net, ident in wanted.items():
        if ident == abi.ReservedIdentity.ANY:
            raise MapError(f"{net}: identity 0 is the policy wildcard and cannot name an address")
    lpm = _is_lpm(dp)
    current = read_identities(dp) if current is None else dict(current)
    upserts = [(abi.ip_key(n, lpm), abi.IpVal(identity=i)) for n, i in sorted(wanted.items(), key=lambda kv: _netkey(kv[0]))
               if current.get(n) != i]
    removed = [n for n in current if n not in wanted]
    if len(wanted) > dp.ipcache.max_entries:
        raise MapError(f"dp_ipcache_v1 is full: {len(wanted)} prefixes wanted, capacity {dp.ipcache.max_entries}")
    if upserts:
        dp.ipcache.update_batch(upserts)
    if not lpm:
        grown = _plens_for(list(current) + list(wanted))
        final = _plens_for(wanted)
        for slot in (0, 1):
            dp.plens.update(slot, grown[slot])
        if removed:
            for slot in (0, 1):
                dp.plens.update(slot, final[slot])
    if removed:
        dp.ipcache.delete_batch([abi.ip_key(n, lpm) for n in removed])
    return {"written": len(upserts), "deleted": len(removed)}


def _netkey(net):
    return (net.version, int(net.network_address), net.prefixlen)


# --- policy -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, order=True)
class PolicyEntry:
    """One (local, remote, direction, protocol, ports) -> action entry.
    remote_id 0 and proto 0 are wildcards; ports (0, 65535) is any port."""

    local_id: int
    remote_id: int
    direction: int
    proto: int
    port_lo: int
    port_hi: int
    action: int
    rule_id: int

    def validate(self) -> None:
        if self.local_id == abi.ReservedIdentity.ANY:
            raise MapError(f"rule {self.rule_id}: the local identity cannot be the wildcard 0")
        if not 0 <= self.port_lo <= self.port_hi <= 65535:
            raise MapError(f"rule {self.rule_id}: bad port range {self.port_lo}-{self.port_hi}")
        if self.proto == 0 and (self.port_lo, self.port_hi) != ANY_PORT:
            raise MapError(f"rule {self.rule_id}: ports need a protocol")
        if self.port_lo == 0 and self.port_hi != 65535:
            raise MapError(f"rule {self.rule_id}: port 0 only as part of 'any port'")
        if self.action not in (abi.Verdict.ALLOW, abi.Verdict.AUDIT, abi.Verdict.DENY):
            raise MapError(f"rule {self.rule_id}: action must be allow, audit or deny")


def layout_policy(entries: Iterable[PolicyEntry]) -> tuple[dict, dict]:
    """Entries -> (policy map content keyed by PolicyKey, range sets keyed by
    the PolicyKey that owns them). Deterministic. On two entries for one key
    the higher action wins (deny > audit > allow), ties to the lower rule id."""
    policy: dict[tuple, list] = {}
    ranges: dict[tuple, list] = {}
    for e in sorted(set(entries)):
        e.validate()
        if (e.port_lo, e.port_hi) == ANY_PORT:
            key = (e.local_id, e.remote_id, 0, e.proto, e.direction)
            _merge(policy.setdefault(key, [abi.Verdict.NONE, 0]), e.action, e.rule_id)
        elif e.port_lo == e.port_hi:
            key = (e.local_id, e.remote_id, e.port_lo, e.proto, e.direction)
            _merge(policy.setdefault(key, [abi.Verdict.NONE, 0]), e.action, e.rule_id)
        else:
            key = (e.local_id, e.remote_id, 0, e.proto, e.direction)
            policy.setdefault(key, [abi.Verdict.NONE, 0])
            ranges.setdefault(key, []).append((e.port_lo, e.port_hi, e.rule_id, e.action))
    sets = {}
    for key, rs in ranges.items():
        # First match wins in the datapath: highest action first, then the
        # narrowest range, so the rule reported is the most specific.
        rs = sorted(set(rs), key=lambda r: (-r[3], r[1] - r[0], r[0], r[2]))
        if len(rs) > abi.MAX_RANGES:
            local, remote, _, proto, direction = key
            raise MapError(f"dp_ranges_v1: {len(rs)} port ranges for local identity {local}, remote "
                           f"{remote or 'any'}, protocol {proto}, {abi.Direction(direction).name.lower()}; "
                           f"at most {abi.MAX_RANGES}")
        sets[key] = tuple(rs)
    return {k: tuple(v) for k, v in policy.items()}, sets


def _merge(slot: list, action: int, rule_id: int) -> None:
    if action > slot[0] or (action == slot[0] and rule_id < slot[1]):
        slot[0], slot[1] = action, rule_id


def _policy_key(t: tuple) -> abi.PolicyKey:
    return abi.PolicyKey(local_id=t[0], remote_id=t[1], dport=t[2], proto=t[3], dir=t[4])


def _range_set(rs: tuple) -> abi.RangeSet:
    out = abi.RangeSet(count=len(rs))
    for i, (lo, hi, rule, action) in enumerate(rs):
        out.r[i].lo, out.r[i].hi, out.r[i].rule_id, out.r[i].action = lo, hi, rule, action
    return out


def _decode_range_set(s: abi.RangeSet) -> tuple:
    return tuple((s.r[i].lo, s.r[i].hi, s.r[i].rule_id, s.r[i].action) for i in range(s.count))


def read_policy(dp) -> tuple[dict, dict]:
    """Current map content in layout_policy's form, plus key -> range index."""
    policy, sets, index = {}, {}, {}
    for k, v in dp.policy.items():
        key = (k.local_id, k.remote_id, k.dport, k.proto, k.dir)
        policy[key] = (v.action, v.rule_id)
        if v.ranges:
            sets[key] = _decode_range_set(dp.ranges.lookup(v.ranges))
            index[key] = v.ranges
    return policy, {"sets": sets, "index": index}


def sync_policy(dp, entries: Iterable[PolicyEntry]) -> dict:
    """Makes the policy maps express exactly `entries`, add-before-delete."""
    want_policy, want_sets = layout_policy(entries)
    if len(want_policy) > dp.policy.max_entries:
        raise MapError(f"dp_policy_v1 is full: {len(want_policy)} entries wanted, capacity "
                       f"{dp.policy.max_entries}")
    cur_policy, cur = read_policy(dp)
    cur_sets, cur_index = cur["sets"], cur["index"]

    # Reuse the index of an identical set already in place; new sets go to
    # indices no current entry references.
    in_use = set(cur_index.values())
    free = (i for i in range(1, dp.ranges.max_entries) if i not in in_use)
    index, new_sets = {}, []
    for key, rs in want_sets.items():
        if cur_sets.get(key) == rs:
            index[key] = cur_index[key]
            continue
        try:
            idx = next(free)
        except StopIteration:
            raise MapError(f"dp_ranges_v1 is full: capacity {dp.ranges.max_entries - 1} range sets") from None
        index[key] = idx
        new_sets.append((idx, _range_set(rs)))

    upserts = []
    for key, (action, rule) in want_policy.items():
        val = abi.PolicyVal(rule_id=rule, action=action, ranges=index.get(key, 0))
        if cur_policy.get(key) != (action, rule) or cur_index.get(key, 0) != val.ranges:
            upserts.append((_policy_key(key), val))
    removed = [_policy_key(k) for k in cur_policy if k not in want_policy]

    for idx, s in new_sets:
        dp.ranges.update(idx, s)
    if upserts:
        dp.policy.update_batch(upserts)
    if removed:
        dp.policy.delete_batch(removed)
    return {"written": len(upserts), "deleted": len(removed), "range_sets": len(new_sets)}
