"""Map codecs for identities and policy entries, and the writers that put a
wanted state into the maps.

The ipcache, prefix-length and policy maps hold two generations (a field of
their keys); `struct dp_gen` says which one packets are judged by.
`apply_state` writes a whole new state into the idle generation, switches
the live one with a single hash-map update, bumps the conntrack epoch so
established flows are judged again, and then brings the other generation up
to date for the next time. A packet is therefore judged entirely by the old
state or entirely by the new, whatever the change: identities moving,
rules tightening and loosening at once, port ranges rewritten.

The per-generation writers (`sync_identities`, `sync_policy`) also keep
each single map update safe on its own: a prefix is written before the
prefix-length list grows and deleted after it shrinks, and a changed
port-range set goes to a free index before the policy entry (a hash value,
replaced at once) points at it; array updates are not atomic, so a set in
use is never rewritten.

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
            raise MapError(f"dp_plens_v3: {len(lens)} distinct IPv{int(family)} prefix lengths, "
                           f"the datapath probes at most {abi.MAX_PLENS}")
        p = abi.Plens(count=len(lens))
        for i, plen in enumerate(lens):
            p.e[i].prefixlen = plen
            p.e[i].mask = abi.mask_words(family, plen)
        out[slot] = p
    return out


# --- generations ---------------------------------------------------------------

def active_generation(dp) -> int:
    g = dp.gen.lookup(0)
    return (g.active & 1) if g is not None else 0


def live_audit_default(dp) -> bool:
    g = dp.gen.lookup(0)
    return bool(g is not None and g.flags & abi.GEN_AUDIT_DEFAULT)


def set_active_generation(dp, gen: int, audit_default: bool = False) -> None:
    """One hash update: which generation is live, and its policy mode."""
    dp.gen.update(0, abi.Gen(active=gen & 1, flags=abi.GEN_AUDIT_DEFAULT if audit_default else 0))


def _gen(dp, gen: int | None) -> int:
    return active_generation(dp) if gen is None else gen


def read_ipcache(dp, gen: int | None = None) -> dict[abi.IpNetwork, tuple[int, int]]:
    """network -> (identity, expires_s) in one generation (default: the live one)."""
    gen, lpm = _gen(dp, gen), _is_lpm(dp)
    return {abi.ip_key_network(k, lpm): (v.identity, v.expires_s) for k, v in dp.ipcache.items() if k.gen == gen}


def read_identities(dp, gen: int | None = None) -> dict[abi.IpNetwork, int]:
    """network -> identity in one generation (default: the live one)."""
    return {n: ident for n, (ident, _) in read_ipcache(dp, gen).items()}


def monotonic_seconds() -> int:
    """The clock the datapath compares expiries with (CLOCK_MONOTONIC)."""
    import time

    return int(time.clock_gettime(time.CLOCK_MONOTONIC))


def _is_lpm(dp) -> bool:
    return dp.ipcache.map_type == 11  # BPF_MAP_TYPE_LPM_TRIE


def _normalize_identities(wanted: Mapping) -> dict:
    """network -> (identity, expires_s); values may be an identity alone
    (never expires) or an (identity, expires_s) pair."""
    out = {}
    for n, v in wanted.items():
        ident, expires = (v, 0) if isinstance(v, int) else (int(v[0]), int(v[1]))
        net = n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) else ipaddress.ip_network(n)
        if ident == abi.ReservedIdentity.ANY:
            raise MapError(f"{net}: identity 0 is the policy wildcard and cannot name an address")
        out[net] = (int(ident), expires)
    return out


def sync_identities(dp, wanted: Mapping, current: Mapping | None = None, gen: int | None = None) -> dict:
    """Makes one generation (default: the live one) of the ipcache hold
    exactly `wanted` (network -> identity, or -> (identity, expires_s) for
    entries that stop counting at a CLOCK_MONOTONIC second). Returns counts
    of what changed."""
    gen, lpm = _gen(dp, gen), _is_lpm(dp)
    wanted = _normalize_identities(wanted)
    current = read_ipcache(dp, gen) if current is None else _normalize_identities(current)
    if len(wanted) > dp.ipcache.max_entries // 2:
        raise MapError(f"dp_ipcache_v3 is full: {len(wanted)} prefixes wanted, room for "
                       f"{dp.ipcache.max_entries // 2} per generation")
    upserts = [(abi.ip_key(n, lpm, gen), abi.IpVal(identity=v[0], expires_s=v[1]))
               for n, v in sorted(wanted.items(), key=lambda kv: _netkey(kv[0])) if current.get(n) != v]
    removed = [n for n in current if n not in wanted]
    if upserts:
        dp.ipcache.update_batch(upserts)
    if not lpm:
        grown = _plens_for(list(current) + list(wanted))
        final = _plens_for(wanted)
        for slot in (0, 1):
            dp.plens.update(gen * 2 + slot, grown[slot])
        if removed:
            for slot in (0, 1):
                dp.plens.update(gen * 2 + slot, final[slot])
    if removed:
        dp.ipcache.delete_batch([abi.ip_key(n, lpm, gen) for n in removed])
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
    # The dataclass order, by an explicit key: the generated __lt__ is slow at 10^5 entries.
    for e in sorted(set(entries), key=_entry_order):
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
            raise MapError(f"dp_ranges_v3: {len(rs)} port ranges for local identity {local}, remote "
                           f"{remote or 'any'}, protocol {proto}, {abi.Direction(direction).name.lower()}; "
                           f"at most {abi.MAX_RANGES}")
        sets[key] = tuple(rs)
    return {k: tuple(v) for k, v in policy.items()}, sets


def _entry_order(e: PolicyEntry) -> tuple:
    return (e.local_id, e.remote_id, e.direction, e.proto, e.port_lo, e.port_hi, e.action, e.rule_id)


def _merge(slot: list, action: int, rule_id: int) -> None:
    if action > slot[0] or (action == slot[0] and rule_id < slot[1]):
        slot[0], slot[1] = action, rule_id


def _policy_key(t: tuple, gen: int) -> abi.PolicyKey:
    return abi.PolicyKey(local_id=t[0], remote_id=t[1], dport=t[2], proto=t[3], dir=t[4], gen=gen)


def _range_set(rs: tuple) -> abi.RangeSet:
    out = abi.RangeSet(count=len(rs))
    for i, (lo, hi, rule, action) in enumerate(rs):
        out.r[i].lo, out.r[i].hi, out.r[i].rule_id, out.r[i].action = lo, hi, rule, action
    return out


def _decode_range_set(s: abi.RangeSet) -> tuple:
    return tuple((s.r[i].lo, s.r[i].hi, s.r[i].rule_id, s.r[i].action) for i in range(s.count))


def read_policy(dp, gen: int | None = None) -> tuple[dict, dict]:
    """One generation's policy (default: the live one) in layout_policy's
    form, plus key -> range-set index and the indices either generation uses."""
    gen = _gen(dp, gen)
    policy, sets, index, in_use = {}, {}, {}, {}
    for k, v in dp.policy.items():
        if v.ranges and v.ranges not in in_use:
            in_use[v.ranges] = _decode_range_set(dp.ranges.lookup(v.ranges))
        if k.gen != gen:
            continue
        key = (k.local_id, k.remote_id, k.dport, k.proto, k.dir)
        policy[key] = (v.action, v.rule_id)
        if v.ranges:
            sets[key] = in_use[v.ranges]
            index[key] = v.ranges
    return policy, {"sets": sets, "index": index, "in_use": in_use}


def sync_policy(dp, entries: Iterable[PolicyEntry], gen: int | None = None, layout: tuple | None = None) -> dict:
    """Makes one generation (default: the live one) of the policy maps
    express exactly `entries`, adding and changing before deleting."""
    gen = _gen(dp, gen)
    want_policy, want_sets = layout if layout is not None else layout_policy(entries)
    if len(want_policy) > dp.policy.max_entries // 2:
        raise MapError(f"dp_policy_v3 is full: {len(want_policy)} entries wanted, room for "
                       f"{dp.policy.max_entries // 2} per generation")
    cur_policy, cur = read_policy(dp, gen)
    cur_sets, cur_index = cur["sets"], cur["index"]

    # Reuse the index of an identical set already in place (sets are never
    # rewritten while referenced, so two generations may share one); new
    # sets go to indices that no entry of either generation references.
    by_content = {content: idx for idx, content in sorted(cur["in_use"].items(), reverse=True)}
    free = (i for i in range(1, dp.ranges.max_entries) if i not in cur["in_use"])
    index, new_sets = {}, []
    for key, rs in want_sets.items():
        if cur_sets.get(key) == rs:
            index[key] = cur_index[key]
            continue
        if rs in by_content:
            index[key] = by_content[rs]
            continue
        try:
            idx = next(free)
        except StopIteration:
            raise MapError(f"dp_ranges_v3 is full: capacity {dp.ranges.max_entries - 1} range sets") from None
        index[key] = idx
        by_content[rs] = idx
        new_sets.append((idx, _range_set(rs)))

    upserts = []
    for key, (action, rule) in want_policy.items():
        val = abi.PolicyVal(rule_id=rule, action=action, ranges=index.get(key, 0))
        if cur_policy.get(key) != (action, rule) or cur_index.get(key, 0) != val.ranges:
            upserts.append((_policy_key(key, gen), val))
    removed = [_policy_key(k, gen) for k in cur_policy if k not in want_policy]

    for idx, s in new_sets:
        dp.ranges.update(idx, s)
    if upserts:
        dp.policy.update_batch(upserts)
    if removed:
        dp.policy.delete_batch(removed)
    return {"written": len(upserts), "deleted": len(removed), "range_sets": len(new_sets)}


# --- whole states ------------------------------------------------------------------

def check_capacity(dp, identities: Mapping, entries: Iterable[PolicyEntry], rules_max: int | None = None,
                   layout: tuple | None = None) -> list[str]:
    """What would not fit, one line per map naming the counts; empty if all fits.
    Nothing is written."""
    problems = []
    identities = _normalize_identities(identities)
    entries = list(entries)
    try:
        policy, sets = layout if layout is not None else layout_policy(entries)
    except MapError as e:
        return [str(e)]
    room = dp.ipcache.max_entries // 2
    if len(identities) > room:
        problems.append(f"dp_ipcache_v3: {len(identities)} prefixes wanted, room for {room} per generation "
                        f"(capacity {dp.ipcache.max_entries}, two generations)")
    room = dp.policy.max_entries // 2
    if len(policy) > room:
        problems.append(f"dp_policy_v3: {len(policy)} entries wanted, room for {room} per generation "
                        f"(capacity {dp.policy.max_entries}, two generations)")
    room = (dp.ranges.max_entries - 1) // 2
    if len(sets) > room:
        problems.append(f"dp_ranges_v3: {len(sets)} port-range sets wanted, room for {room} per generation")
    if not _is_lpm(dp):
        try:
            _plens_for(identities)
        except MapError as e:
            problems.append(str(e))
    rules_max = rules_max or dp.rules.max_entries
    top = max((e.rule_id for e in entries), default=0)
    if top >= rules_max:
        problems.append(f"dp_rules_v3: rule id {top} does not fit in {rules_max} counters")
    return problems


@dataclasses.dataclass
class ApplyResult:
    generation: int          # the generation now live
    epoch: int               # the conntrack epoch now current
    written: int             # map updates into the generation that went live
    deleted: int
    seconds: float


def apply_state(dp, identities: Mapping, entries: Iterable[PolicyEntry], bump_epoch: bool = True,
                audit_default: bool = False, layout: tuple | None = None) -> ApplyResult:
    """Makes packets be judged by exactly this state, all at once.

    The idle generation is written, then made live by one atomic update, then
    the epoch is bumped so that established flows meet the new state at
    their next packet. Finally the generation that went idle is rewritten
    too, so the next apply starts from two equal generations and writes
    only differences. Nothing is written when the state does not fit; a
    failure part-way leaves the live generation untouched."""
    import time

    t0 = time.monotonic()
    entries = list(entries)
    identities = _normalize_identities(identities)
    layout = layout if layout is not None else layout_policy(entries)
    problems = check_capacity(dp, identities, entries, layout=layout)
    if problems:
        raise MapError("; ".join(problems))
    live = active_generation(dp)
    idle = 1 - live
    a = sync_identities(dp, identities, gen=idle)
    b = sync_policy(dp, entries, gen=idle, layout=layout)
    set_active_generation(dp, idle, audit_default)
    epoch = dp.bump_epoch() if bump_epoch else dp.read_config().epoch
    seconds = time.monotonic() - t0
    sync_identities(dp, identities, gen=live)
    sync_policy(dp, entries, gen=live, layout=layout)
    return ApplyResult(generation=idle, epoch=epoch, written=a["written"] + b["written"],
                       deleted=a["deleted"] + b["deleted"], seconds=seconds)
