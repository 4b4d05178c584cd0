"""No partial apply: fuzzed policy and inventory files go through the path
the agent applies files by (dataplane.agent: load_sources, compile_for,
apply_compiled, as Agent.reconcile calls them) into the real maps.

A document the path refuses must raise a located SourceError (every
problem one FILE:LINE line), or a CapacityError for a state that does not
fit, and leave every map the state lives in (ipcache, policy, ranges, gen,
plens, config) byte for byte as it was; the same file through
Agent.reconcile must be reported with its location and change nothing
either. A document the path accepts must be live afterwards, both
generations holding exactly what the compiled state says (ipcache
identities and expiries, the policy layout and its port-range sets, the
policy mode), and becomes the snapshot the next refusals are held to.

Documents come from tests/unit/fuzz_policies.py (valid, mutated, text
and byte mutations, hostile YAML), with a state too large for the maps
every few cases. Size: DATAPLANE_FUZZ_APPLY refused documents; seed:
DATAPLANE_FUZZ_SEED.
"""

from __future__ import annotations

import logging
import os
import re
import time

from dataplane import agent
from dataplane.source import SourceError
from loader import tables
from tests.reliability import record, size
from tests.unit import fuzz_policies as fz

SEED = os.environ.get("DATAPLANE_FUZZ_SEED", "20261205")
REFUSALS = size("DATAPLANE_FUZZ_APPLY", 150)
HOST = "h0"                                 # the generator's first host (the examples' hosts are others)
STATE_MAPS = ("ipcache", "policy", "ranges", "gen", "plens", "config")


def snapshot(dp) -> dict:
    """Every map the state lives in, as raw bytes."""
    return {name: sorted((bytes(k), bytes(v)) for k, v in dp.maps[name].items()) for name in STATE_MAPS}


def agent_apply(dp, ws: agent.Workspace, policy_path, inventory_path):
    """What Agent.reconcile does with the files, without catching anything."""
    policy, inventory = agent.load_sources(str(policy_path), str(inventory_path))
    _, state = agent.compile_for(policy, inventory, HOST, ws)
    agent.apply_compiled(dp, state, ws, {"policy": str(policy_path), "inventory": str(inventory_path)})
    return state


def assert_maps_hold(dp, state, what: str) -> None:
    """Both generations hold exactly the compiled state; its mode is live."""
    wanted = state.ipcache()
    want_policy, want_sets = tables.layout_policy(state.entries)
    for gen in (0, 1):
        got = tables.read_ipcache(dp, gen)
        assert {n: ident for n, (ident, _) in got.items()} == \
            {n: (v[0] if isinstance(v, tuple) else v) for n, v in wanted.items()}, f"{what}: ipcache gen {gen}"
        for net, v in wanted.items():
            expires = v[1] if isinstance(v, tuple) else 0
            assert abs(got[net][1] - expires) <= 2, f"{what}: {net} expires {got[net][1]}, want {expires}"
        policy, cur = tables.read_policy(dp, gen)
        assert policy == want_policy, f"{what}: policy gen {gen}"
        assert cur["sets"] == want_sets, f"{what}: port ranges gen {gen}"
    assert tables.live_audit_default(dp) == state.audit_default, what


def too_big(index: int) -> fz.Case:
    """A valid document whose state does not fit: more port ranges for one
    (local, remote, protocol) than a range set holds, or (hash ipcache) more
    distinct prefix lengths than the datapath probes."""
    if index % 2:
        ports = ", ".join(f"tcp/{1000 + 10 * i}-{1005 + 10 * i}" for i in range(40))
        rules = f"  - {{name: many-ranges, action: allow, from: [{{entity: any}}], to: [{{entity: host}}], " \
                f"ports: [{ports}]}}\n"
    else:
        peers = ", ".join(f"{{cidr: {'128.0.0.0' if p == 1 else '10.0.0.0'}/{p}}}" for p in range(1, 33))
        peers += ", " + ", ".join(f"{{cidr: 'fd00::/{p}'}}" for p in range(16, 129, 8))
        rules = f"  - {{name: many-lengths, action: allow, from: [{peers}], to: [{{entity: host}}]}}\n"
    policy = f"apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n{rules}".encode()
    inventory = b"apiVersion: zt-dataplane/v1\nkind: Inventory\nhosts: [{name: h0, address: 10.99.0.1}]\n"
    return fz.Case(SEED, index, "too-big", "state larger than the maps", policy, inventory)


def test_refused_documents_leave_the_maps_untouched(dp, tmp_path, caplog):
    ws = agent.Workspace(dp.instance, str(tmp_path / "state"))
    ppath, ipath = tmp_path / "policy.yaml", tmp_path / "inventory.yaml"
    ppath.write_bytes(fz.EXAMPLE_POLICY)
    ipath.write_bytes(fz.EXAMPLE_INVENTORY)
    state = agent_apply(dp, ws, ppath, ipath)
    assert state.entries and state.identities
    assert_maps_hold(dp, state, "the examples")
    before = snapshot(dp)
    runner = agent.Agent(dp, agent.AgentOptions(policy=str(ppath), inventory=str(ipath), interfaces=[],
                                                state_dir=str(tmp_path / "state"), host=HOST))
    counts = {"documents": 0, "located_errors": 0, "capacity_refusals": 0, "valid_applied": 0,
              "reconcile_refusals": 0, "by_kind": {}}
    t0 = time.monotonic()
    index = 0
    while counts["located_errors"] + counts["capacity_refusals"] < REFUSALS:
        c = too_big(index) if index % 25 == 24 else fz.case(SEED, index)
        index += 1
        ppath.write_bytes(c.policy)
        ipath.write_bytes(c.inventory)
        counts["documents"] += 1
        where = f"seed {SEED} case {c.index} ({c.family}: {c.what})"
        try:
            state = agent_apply(dp, ws, ppath, ipath)
        except SourceError as e:
            bad = fz.located_problems(e, {str(ppath): c.policy, str(ipath): c.inventory})
            assert bad is None, f"{where}: {bad}\n{c.show()}"
            assert snapshot(dp) == before, f"{where}: a refused document changed the maps\n{c.show()}"
            counts["located_errors"] += 1
            kind = fz.error_kind(e.problems[0])
            counts["by_kind"][kind] = counts["by_kind"].get(kind, 0) + 1
        except agent.CapacityError as e:
            assert "\n" not in str(e) and "nothing was changed" in str(e), f"{where}: {e}"
            assert snapshot(dp) == before, f"{where}: a state too large changed the maps\n{c.show()}"
            counts["capacity_refusals"] += 1
        else:
            assert_maps_hold(dp, state, where)
            before = snapshot(dp)
            counts["valid_applied"] += 1
            continue
        # The agent itself, on the same files: reported with the location, nothing changed.
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="dataplane.agent"):
            assert runner.reconcile(force=True) is False, where
        logged = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
        assert len(logged) == 1 and "\n" not in logged[0], f"{where}: {logged}"
        assert c.family == "too-big" or re.search(r"(policy|inventory)\.yaml:\d+: ", logged[0]), f"{where}: {logged}"
        assert snapshot(dp) == before, f"{where}: the agent changed the maps on a refused document"
        counts["reconcile_refusals"] += 1
    counts["seed"] = SEED
    counts["duration_s"] = round(time.monotonic() - t0, 2)
    record("policy_fuzz_apply", counts)
    assert counts["valid_applied"] >= REFUSALS // 10, counts       # the interleaved valid documents went live
    assert counts["capacity_refusals"] >= 1, counts
