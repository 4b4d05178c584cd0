"""Differential test: `policy explain` against the kernel.

Each round generates a random inventory and policy as YAML (tests/bpf/
policygen.py), compiles it for one host, applies the compiled state with
loader.tables.apply_state (policy mode included) and then draws thousands
of new flows between addresses the inventory knows and addresses it does
not: the host's own addresses and workloads, other hosts' workloads, user
sessions (live and expired), addresses inside networks and inside the CIDRs
rules name, and unknown ones, IPv4 and IPv6, TCP, UDP and ICMP echo.

For every flow the explain path (dataplane.explain.Explainer, the code
behind `policy explain`) gives the judgement of the compiled host in the
flow's direction; when the flow's local end is not on that host in the
inventory (explain then has no judgement there), the same Explainer's model
for that host answers, with the drawn local end. The kernel judges the same
flow through xdp_ingress (local = destination) or tc_egress (local =
source), by BPF_PROG_TEST_RUN on the applied maps; its reason comes from the
reason counters, its verdict, rule and identities from the event (allow
sampling is 1), and the rule's counter must move. Everything must agree.

The seed is fixed; DP_EXPLAIN_SEED overrides it to explore. A failure
names the seed and round and leaves that round's YAML in the test's
temporary directory.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import random

from dataplane.compiler import Compiler
from dataplane.explain import Explainer
from dataplane.identity import Allocator
from loader import abi, tables
from loader.model import Model
from tests.bpf.packets import HOOK_ID, ICMP_OF, TCP_P, UDP_P, echo_frame, send, tcp_frame, udp_frame
from tests.bpf.policygen import NOW, draw_address, inside, make_world, port_form

SEED = os.environ.get("DP_EXPLAIN_SEED", "50412")
ROUNDS = 8
FLOWS_PER_ROUND = 1300            # 10,400 flows in all
AUDIT_ROUNDS = {2, 6}             # policies in `mode: audit`
IN, OUT = abi.Direction.INGRESS, abi.Direction.EGRESS
HOOK_OF = {IN: "xdp_ingress", OUT: "tc_egress"}
WORLD, HOST = abi.ReservedIdentity.WORLD, abi.ReservedIdentity.HOST

# (category, weight) for the far end; the near end is the compiled host's
# own address or workload most of the time, anything else otherwise.
REMOTE_CATEGORIES = (("remote_endpoint", 20), ("other_host", 6), ("local", 7), ("session", 20),
                     ("expired_session", 4), ("network", 15), ("cidr_peer", 12), ("unknown", 16))
FOREIGN_LOCAL_CATEGORIES = (("remote_endpoint", 4), ("session", 3), ("network", 2), ("cidr_peer", 1),
                            ("unknown", 2), ("other_host", 1))


def _pick(rng: random.Random, world, categories, family: int):
    names, weights = zip(*categories)
    while True:
        cat = rng.choices(names, weights)[0]
        addr = draw_address(rng, world, cat, family)
        if addr is not None:
            return cat, addr


def _aimed(rng: random.Random, world, state, prefixes: dict):
    """A flow aimed at one compiled entry: its identities, direction,
    protocol and the edges of its ports; None when it cannot be aimed."""
    e = rng.choice(state.entries)
    family = {1: 4, 58: 6}.get(e.proto) or rng.choice((4, 6))
    local_nets = [n for n in prefixes.get(e.local_id, ()) if n.version == family]
    if e.remote_id == 0:
        remote_nets = None
    elif e.remote_id == WORLD:
        remote_nets = world.pools["unknown"][family]
    else:
        remote_nets = [n for n in prefixes.get(e.remote_id, ()) if n.version == family]
    if not local_nets or remote_nets == []:
        return None
    local = inside(rng, rng.choice(local_nets))
    if remote_nets is None:
        _, remote = _pick(rng, world, REMOTE_CATEGORIES, family)
    else:
        remote = inside(rng, rng.choice(remote_nets))
    proto = {0: rng.choice((TCP_P, UDP_P, "icmp")), 1: "icmp", 58: "icmp"}.get(e.proto, e.proto)
    if (e.port_lo, e.port_hi) == tables.ANY_PORT:
        port = rng.choice(world.ports)
    else:
        port = rng.choice([p for p in (e.port_lo - 1, e.port_lo, e.port_lo, e.port_hi, e.port_hi + 1,
                                       (e.port_lo + e.port_hi) // 2) if 1 <= p <= 65535])
    return family, e.direction, "aimed", local, "aimed", remote, proto, port


def _draw_flow(rng: random.Random, world, state, prefixes: dict):
    aimed = _aimed(rng, world, state, prefixes) if state.entries and rng.random() < 0.4 else None
    if aimed is not None:
        family, direction, local_cat, local, remote_cat, remote, proto, port = aimed
    else:
        family = rng.choice((4, 6))
        direction = rng.choice((IN, OUT))
        if rng.random() < 0.72:
            local_cat, local = "local", draw_address(rng, world, "local", family)
        else:
            local_cat, local = _pick(rng, world, FOREIGN_LOCAL_CATEGORIES, family)
        remote_cat, remote = _pick(rng, world, REMOTE_CATEGORIES, family)
        proto = rng.choices((TCP_P, UDP_P, "icmp"), (4, 3, 2))[0]
        roll = rng.random()
        port = rng.choice(world.ports) if roll < 0.75 else (0 if roll < 0.77 else rng.randint(1, 65535))
    src, dst = (remote, local) if direction == IN else (local, remote)
    sport = rng.randint(1024, 65535)
    if proto == TCP_P:
        data = tcp_frame(family, str(src), str(dst), sport, port)
    elif proto == UDP_P:
        data = udp_frame(family, str(src), str(dst), sport, port)
    else:
        proto = ICMP_OF[family]
        data = echo_frame(family, str(src), str(dst), port)
        sport = port
    return {"family": family, "direction": direction, "local_cat": local_cat, "remote_cat": remote_cat,
            "src": src, "dst": dst, "proto": proto, "sport": sport, "port": port, "data": data}


def _explained(explainer: Explainer, host: str, f: dict) -> tuple[str, tuple]:
    """(which path answered, (passes, verdict, reason, rule id, local id, remote id))."""
    exp = explainer.explain(str(f["src"]), str(f["dst"]), f["proto"], f["port"])
    want_dir = f["direction"].name.lower()
    mine = [j for j in exp.judgements if j.host == host and j.direction == want_dir]
    if mine:
        (j,) = mine
        return "explain", (j.verdict != "deny", j.verdict, j.reason, j.rule_id, j.local["identity"],
                           j.remote["identity"])
    _, model = explainer.state(host)
    d = model.judge(f["src"], f["dst"], f["proto"], f["port"], f["direction"])
    return "host_model", (d.verdict != abi.Verdict.DENY, d.verdict.name.lower(), abi.Reason(d.reason).label,
                          d.rule_id, d.local_id, d.remote_id)


def _deciding_form(world, rule_names: dict, rule_id: int, proto: int, port: int) -> str:
    if rule_id == 0:
        return "default"
    rule = world.policy.rule(rule_names[rule_id])
    fitting = [pr for pr in rule.ports if pr.proto in (0, proto) and pr.lo <= port <= pr.hi]
    order = ("exact", "range", "any_port", "any_protocol")
    return min((port_form(pr) for pr in fitting), key=order.index, default="?")


def _kind_of(state, ident: int) -> str:
    if ident == WORLD:
        return "world"
    if ident == HOST:
        return "host"
    return state.labels.get(ident, {}).get("kind", "?")


def test_explain_agrees_with_the_kernel(dp, tap, tmp_path, capsys):
    dp.set_config(allow_sample=1)
    seen = collections.Counter()
    mismatches = []
    total = 0
    for rnd in range(ROUNDS):
        world = make_world(SEED, rnd, audit=rnd in AUDIT_ROUNDS)
        (tmp_path / f"policy-{rnd}.yaml").write_text(world.policy_text)
        (tmp_path / f"inventory-{rnd}.yaml").write_text(world.inventory_text)
        where = f"seed {SEED} round {rnd} (host {world.host}; YAML in {tmp_path})"

        compiler = Compiler(world.policy, world.inventory, Allocator(None), Allocator(None, first=1), NOW)
        state = compiler.compile(world.host)
        assert state.audit_default == world.audit, where
        tables.apply_state(dp, state.identities, state.entries, audit_default=state.audit_default)
        explainer = Explainer(compiler)
        st, model = explainer.state(world.host)
        # explain compiles the same state that was applied, and the live maps hold it.
        assert (st.entries, st.identities, st.audit_default) == (state.entries, state.identities,
                                                                state.audit_default), where
        live = Model.from_datapath(dp)
        assert (live.policy, live.range_sets, live.audit_default) == (model.policy, model.range_sets,
                                                                       model.audit_default), where
        assert tables.read_identities(dp) == {ipaddress.ip_network(n): i for n, i in state.identities.items()}, where
        dp.ct.clear()
        tap.take()
        rule_names = state.rule_names()
        rng = random.Random(f"{SEED}:{rnd}:flows")
        prefixes = collections.defaultdict(list)      # identity -> its ipcache prefixes
        for net, ident in state.identities.items():
            prefixes[ident].append(ipaddress.ip_network(net))

        for n in range(FLOWS_PER_ROUND):
            f = _draw_flow(rng, world, state, prefixes)
            path, want = _explained(explainer, world.host, f)
            hook = HOOK_OF[f["direction"]]
            rule_before = dp.rule_counter(want[3])
            out = send(dp, hook, f["data"])
            rule_moved = tuple(a - b for a, b in zip(dp.rule_counter(want[3]), rule_before))
            evs = tap.take()
            if out.passed:
                dp.ct.clear()              # the next flow must be new too
            total += 1
            got, flow_ok = None, False
            if len(evs) == 1:
                e = evs[0]
                got = (out.passed, e.verdict.name.lower(), out.reason.label, e.rule_id, e.local_id, e.remote_id)
                flow_ok = (e.src, e.dst, e.sport, e.dport, e.proto, e.direction, e.hook, e.reason) == (
                    f["src"], f["dst"], f["sport"], f["port"], f["proto"], f["direction"], HOOK_ID[hook], out.reason)
            if got != want or not flow_ok or rule_moved != (1, len(f["data"])):
                mismatches.append(
                    f"round {rnd} flow {n}: {hook} {f['src']}:{f['sport']} -> {f['dst']}:{f['port']} proto "
                    f"{f['proto']} (local {f['local_cat']}, remote {f['remote_cat']}): kernel {got} "
                    f"({len(evs)} events, event fields {'ok' if flow_ok else 'differ'}, rule {want[3]} counter "
                    f"moved {rule_moved}), {path} {want}")

            verdict, reason, rule_id = want[1], want[2], want[3]
            seen[path] += 1
            seen["aimed" if f["local_cat"] == "aimed" else "drawn"] += 1
            seen[hook] += 1
            seen[f"ipv{f['family']}"] += 1
            seen[{TCP_P: "tcp", UDP_P: "udp"}.get(f["proto"], "icmp")] += 1
            seen[f"verdict:{verdict}"] += 1
            if reason == "policy_default":
                seen["default_deny"] += 1
            elif reason == "audit" and rule_id == 0:
                seen["audit_default"] += 1
            elif reason == "audit":
                seen["audit_rule"] += 1
            elif reason == "policy_deny":
                seen["deny_rule"] += 1
            elif reason == "policy":
                seen["allow_rule"] += 1
            seen[f"form:{_deciding_form(world, rule_names, rule_id, f['proto'], f['port'])}"] += 1
            seen[f"remote:{_kind_of(state, want[5])}"] += 1
            seen[f"local:{_kind_of(state, want[4])}"] += 1
            if rule_id:
                rule = world.policy.rule(rule_names[rule_id])
                far = rule.sources if f["direction"] == IN else rule.destinations
                if any(p.kind == "entity" and p.entity == "any" for p in far):
                    seen["rule_remote_any"] += 1
                if rule.posture is not None:
                    seen["rule_with_posture"] += 1

    with capsys.disabled():
        print(f"\nexplain vs kernel: seed {SEED}: {total} flows compared in {ROUNDS} rounds, "
              f"{len(mismatches)} mismatches; {dict(sorted(seen.items()))}")
    assert not mismatches, (f"seed {SEED}: explain and the kernel disagree on {len(mismatches)} of {total} flows "
                            f"(YAML of each round in {tmp_path}):\n" + "\n".join(mismatches[:25]))

    # The draw must reach every outcome and every kind of decision, or agreeing means little.
    assert total >= 10_000, total
    floors = {
        "verdict:allow": 500, "verdict:audit": 500, "verdict:deny": 500,
        "allow_rule": 300, "audit_rule": 100, "deny_rule": 100, "default_deny": 300, "audit_default": 100,
        "explain": 2000, "host_model": 1000, "aimed": 2000, "drawn": 4000, "xdp_ingress": 3000, "tc_egress": 3000,
        "ipv4": 3000, "ipv6": 3000, "tcp": 2000, "udp": 2000, "icmp": 1000,
        "form:exact": 200, "form:range": 150, "form:any_port": 200, "form:any_protocol": 200,
        "rule_remote_any": 50, "rule_with_posture": 20,
        "remote:world": 300, "remote:user": 300, "remote:workload": 300, "remote:network": 200,
        "remote:cidr": 100, "remote:host": 100, "local:host": 500, "local:workload": 1000,
    }
    short = {k: seen[k] for k, floor in floors.items() if seen[k] < floor}
    assert not short, f"seed {SEED}: too few flows of some kinds {short} (floors {floors}); all: {dict(seen)}"
