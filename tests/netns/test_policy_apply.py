"""`dataplane policy apply` against a loaded datapath: a good policy goes
live and is shown by `policy show`, `identity list` and `bpf policy list`;
a bad one (unparsable, unknown field, bad CIDR, bad inventory, too big for
the maps) is refused with one located error line and leaves the running
enforcement exactly as it was: the live generation, the epoch, and both
generations of the policy map, range sets and ipcache. Identity and rule
numbers survive a reordered inventory, an added endpoint and reordered
rules, across processes."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from dataplane.agent import STATE_ROOT as WORKSPACE_ROOT
from dataplane.compiler import Compiler
from dataplane.identity import Allocator, render
from dataplane.inventory import load_inventory
from dataplane.policy import load_policy
from dataplane.source import load as load_source
from loader import tables
from loader.compile import BuildOptions
from loader.instance import Datapath
from tests.conftest import require_root
from tests.netns.helpers import ROOT, cli, instance_name, leftovers, unload_if_present

EXAMPLE_POLICY = ROOT / "examples" / "policy.yaml"
EXAMPLE_INVENTORY = ROOT / "examples" / "inventory.yaml"
HOST = "db-host"
POLICY_MAX = 64        # room for 32 policy entries per generation
# The example policy compiled for db-host (tests/unit/golden/example/expected-db-host.json).
DB_HOST_RULES = {"hosts-scrape-workloads", "api-to-db", "engineers-query-db", "partner-never-data"}
DB_HOST_ENTRIES = 7


# --- fixtures and helpers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def dp():
    require_root()
    name = instance_name("papply")
    assert not leftovers(name)
    datapath = Datapath(name)
    try:
        assert datapath.load(BuildOptions(pin_dir=datapath.pin_dir, policy_max=POLICY_MAX)) == "loaded"
        assert datapath.policy.max_entries == POLICY_MAX
        yield datapath
    finally:
        unload_if_present(name)
    assert not leftovers(name), leftovers(name)
    assert not os.path.exists(os.path.join(WORKSPACE_ROOT, name)), "a workspace was made outside --state-dir"


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="dp-policy-apply-"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


def apply(dp, policy, inventory, ws: Path, host: str = HOST):
    return cli("policy", "apply", policy, "-i", inventory, "--host", host, "--state-dir", ws, instance=dp.instance)


def show(dp, ws: Path, *args):
    return cli(*args, "--state-dir", ws, instance=dp.instance)


def show_json(dp, ws: Path, *args):
    out = show(dp, ws, *args, "-o", "json")
    assert out.returncode == 0, f"{args}: exit {out.returncode}: {out.stderr}"
    return json.loads(out.stdout)


def applied_ok(out) -> None:
    assert out.returncode == 0, f"apply failed: {out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr


def enforcement(dp) -> dict:
    """Everything packets are judged by, both generations."""
    return {
        "live": tables.active_generation(dp),
        "audit_default": tables.live_audit_default(dp),
        "epoch": dp.read_config().epoch,
        "policy": {g: tables.read_policy(dp, g) for g in (0, 1)},
        "ipcache": {g: tables.read_identities(dp, g) for g in (0, 1)},
        "plens": {i: (p.count, [p.e[j].prefixlen for j in range(p.count)])
                  for i, p in ((i, dp.plens.lookup(i)) for i in range(4)) if p is not None},
    }


def workspace_files(ws: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(ws.iterdir()) if p.is_file()}


def line_of(text: str, needle: str) -> int:
    (n,) = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return n


def one_error_line(out) -> str:
    assert out.returncode != 0, f"expected a failure; stdout: {out.stdout}"
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{out.stderr}"
    assert lines[0].startswith("dataplane: error: "), lines[0]
    return lines[0]


def compiled_locally(ws: Path, policy=EXAMPLE_POLICY, inventory=EXAMPLE_INVENTORY):
    """The state apply should have made live, compiled here with the
    workspace's numbering (without saving anything)."""
    compiler = Compiler(load_policy(policy), load_inventory(inventory), Allocator(ws / "identities.json"),
                        Allocator(ws / "rules.json", first=1))
    return compiler.compile(HOST)


@pytest.fixture(scope="module")
def good(dp, scratch):
    """The example policy applied for db-host; yields its workspace."""
    ws = scratch / "ws-good"
    out = apply(dp, EXAMPLE_POLICY, EXAMPLE_INVENTORY, ws)
    applied_ok(out)
    assert f"as host {HOST}: {DB_HOST_ENTRIES} entries" in out.stdout, out.stdout
    return ws


# --- a good apply ------------------------------------------------------------------------

def test_apply_makes_the_compiled_state_live(dp, good):
    before = enforcement(dp)
    out = apply(dp, EXAMPLE_POLICY, EXAMPLE_INVENTORY, good)
    applied_ok(out)
    after = enforcement(dp)
    assert after["live"] == 1 - before["live"], "apply did not switch generations"
    assert after["epoch"] == before["epoch"] + 1, "apply did not bump the epoch"
    assert f"generation {after['live']} live, epoch {after['epoch']}" in out.stdout, out.stdout

    state = compiled_locally(good)
    want_policy, want_sets = tables.layout_policy(state.entries)
    for gen in (0, 1):   # the idle generation is brought up to date too
        assert tables.read_identities(dp, gen) == state.identities
        policy, ranges = tables.read_policy(dp, gen)
        assert policy == {k: tuple(v) for k, v in want_policy.items()}
        assert ranges["sets"] == want_sets
    assert len(state.entries) == DB_HOST_ENTRIES
    assert not after["audit_default"]


def test_policy_show_names_the_rules(dp, good):
    applied_ok(apply(dp, EXAMPLE_POLICY, EXAMPLE_INVENTORY, good))
    names = [r.name for r in load_policy(EXAMPLE_POLICY).rules]

    out = show(dp, good, "policy", "show")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"host {HOST}, applied "), out.stdout
    assert "mode enforce" in out.stdout
    for name in names:
        assert name in out.stdout, f"rule {name} missing from `policy show`:\n{out.stdout}"

    record = show_json(dp, good, "policy", "show")
    assert record["host"] == HOST
    assert list(record["rules"].values()) == names
    assert record["generation"] == tables.active_generation(dp)
    assert record["epoch"] == dp.read_config().epoch
    assert record["counts"]["entries"] == DB_HOST_ENTRIES


def test_identity_list_shows_labels_and_prefixes(dp, good):
    applied_ok(apply(dp, EXAMPLE_POLICY, EXAMPLE_INVENTORY, good))
    rows = show_json(dp, good, "identity", "list")
    by_labels = {r["labels"]: r for r in rows}
    assert len(by_labels) == len(rows), "two identities with one label set"

    def row(labels: str) -> dict:
        assert labels in by_labels, f"no identity {labels!r} in {sorted(by_labels)}"
        return by_labels[labels]

    me = row("kind=host name=db-host zone=core")
    assert me["identity"] == 1 and me["local"] and me["prefixes"] == ["10.80.0.4/32"]
    db = row("app=db env=prod kind=workload tier=data")
    assert db["identity"] >= 256 and db["local"] and db["prefixes"] == ["10.80.0.41/32"]
    web = row("app=web env=prod kind=workload tier=frontend")
    assert not web["local"] and web["prefixes"] == ["10.80.0.21/32", "fd80::21/128"]
    alice = row("device.compliant=true device.id=laptop-alice device.managed=true device.os=linux "
                "group=engineering kind=user user=alice")
    assert alice["prefixes"] == ["10.80.0.11/32", "fd80::11/128"]
    assert row("kind=network name=partner trust=partner")["prefixes"] == ["10.80.0.128/25"]

    # Every prefix in the live ipcache is listed under its identity.
    listed = {(p, r["identity"]) for r in rows for p in r["prefixes"]}
    assert listed == {(str(n), i) for n, i in tables.read_identities(dp).items()}


def test_bpf_policy_list_shows_rule_names(dp, good):
    applied_ok(apply(dp, EXAMPLE_POLICY, EXAMPLE_INVENTORY, good))
    record = show_json(dp, good, "policy", "show")
    rows = show_json(dp, good, "bpf", "policy", "list")
    assert len(rows) == DB_HOST_ENTRIES, rows
    assert {r["rule_name"] for r in rows} == DB_HOST_RULES
    for r in rows:
        assert record["rules"][str(r["rule"])] == r["rule_name"], r
    deny = [r for r in rows if r["rule_name"] == "partner-never-data"]
    assert len(deny) == 1 and deny[0]["action"] == "deny" and deny[0]["port"] == "any", deny
    audit = [r for r in rows if r["rule_name"] == "engineers-query-db"]
    assert len(audit) == 1 and audit[0]["action"] == "audit" and audit[0]["port"] == 5432, audit


# --- bad inputs change nothing -----------------------------------------------------------

def _bad_yaml(d: Path):
    text = EXAMPLE_POLICY.read_text().replace("  - name: web-to-api\n    action: allow\n",
                                              "  - name: web-to-api\n    action: allow: yes\n")
    path = d / "policy.yaml"
    path.write_text(text)
    return path, EXAMPLE_INVENTORY, f"{path}:{line_of(text, 'action: allow: yes')}: ", "not valid YAML or JSON"


def _unknown_field(d: Path):
    text = EXAMPLE_POLICY.read_text().replace("  - name: api-to-db\n", "  - name: api-to-db\n    colour: blue\n")
    path = d / "policy.yaml"
    path.write_text(text)
    return path, EXAMPLE_INVENTORY, f"{path}:{line_of(text, 'colour: blue')}: ", "unknown field 'colour' in a rule"


def _bad_cidr(d: Path):
    text = EXAMPLE_POLICY.read_text().replace("{cidr: 10.80.0.128/25}", "{cidr: 10.80.0.129/25}")
    path = d / "policy.yaml"
    path.write_text(text)
    return path, EXAMPLE_INVENTORY, f"{path}:{line_of(text, '10.80.0.129/25')}: ", "has host bits set"


def _bad_inventory(d: Path):
    text = EXAMPLE_INVENTORY.read_text().replace("    host: api-host\n", "    host: cache-host\n")
    path = d / "inventory.yaml"
    path.write_text(text)
    return (EXAMPLE_POLICY, path, f"{path}:{line_of(text, 'host: cache-host')}: ",
            "endpoint host 'cache-host' is not in hosts")


TOO_MANY = 40   # distinct remote identities for db-1: 40 policy entries > POLICY_MAX / 2


def _too_big(d: Path):
    rules = [f"  - name: block-{i}\n    action: deny\n    from: [{{cidr: 198.18.{i}.0/24}}]\n"
             f"    to: [{{workload: {{app: db}}}}]\n    ports: [tcp/5432]\n" for i in range(TOO_MANY)]
    path = d / "policy.yaml"
    path.write_text("apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n" + "".join(rules))
    return (path, EXAMPLE_INVENTORY, "dataplane: error: ",
            f"dp_policy_v3: {TOO_MANY} entries wanted, room for {POLICY_MAX // 2} per generation "
            + f"(capacity {POLICY_MAX}, two generations)")


BAD = {"unparsable-yaml": _bad_yaml, "unknown-field": _unknown_field, "bad-cidr": _bad_cidr,
       "bad-inventory": _bad_inventory, "too-big-for-the-maps": _too_big}


@pytest.mark.parametrize("case", list(BAD))
def test_a_refused_apply_changes_nothing(dp, good, tmp_path, case):
    policy, inventory, located, words = BAD[case](tmp_path)
    before, ws_before = enforcement(dp), workspace_files(good)
    assert before["policy"][before["live"]][0], "nothing was live before the bad apply"

    out = apply(dp, policy, inventory, good)
    line = one_error_line(out)
    if located != "dataplane: error: ":
        assert line.startswith(f"dataplane: error: {located}"), line
    assert words in line, f"{words!r} not in {line!r}"
    assert out.stdout == "", out.stdout

    assert enforcement(dp) == before, "a refused apply changed the datapath"
    assert workspace_files(good) == ws_before, "a refused apply changed the workspace"


def test_the_big_policy_is_valid_and_counted_right(tmp_path):
    """The control for the capacity case: the policy is refused for its
    size alone (it compiles without a warning) to the count the message
    gives."""
    policy, inventory, _, _ = _too_big(tmp_path)
    compiler = Compiler(load_policy(policy), load_inventory(inventory), Allocator(None), Allocator(None, first=1))
    state = compiler.compile(HOST)
    assert not state.warnings
    layout, _ = tables.layout_policy(state.entries)
    assert len(layout) == TOO_MANY > POLICY_MAX // 2


# --- numbering survives reordering and growth --------------------------------------------

def _shuffled_inventory(d: Path, extra: bool) -> Path:
    data, _ = load_source(EXAMPLE_INVENTORY)
    rng = random.Random(7)
    for section in ("hosts", "endpoints", "sessions", "networks"):
        items = list(data[section])
        while len(items) > 1 and items == data[section]:
            rng.shuffle(items)
        data[section] = items
    data = dict(reversed(list(data.items())))
    if extra:
        data["endpoints"].insert(1, {"name": "cache-1", "host": HOST, "address": "10.80.0.42",
                                     "labels": {"app": "cache", "env": "prod", "tier": "data"}})
    path = d / "inventory.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def _reversed_rules(d: Path) -> Path:
    data, _ = load_source(EXAMPLE_POLICY)
    data["rules"] = list(reversed(data["rules"]))
    data.pop("tests")   # they refer to the example inventory; apply does not run them anyway
    path = d / "policy.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def _numbers(ws: Path, name: str) -> dict:
    return json.loads((ws / name).read_text())["numbers"]


def test_numbers_survive_reordering_and_a_new_endpoint(dp, scratch, tmp_path):
    ws = scratch / "ws-numbering"
    applied_ok(apply(dp, EXAMPLE_POLICY, EXAMPLE_INVENTORY, ws))
    ids_before, rules_before = _numbers(ws, "identities.json"), _numbers(ws, "rules.json")
    listed_before = {r["labels"]: r["identity"] for r in show_json(dp, ws, "identity", "list")}
    ipcache_before = tables.read_identities(dp)
    assert len(ids_before) == 9 and len(rules_before) == 8

    # Same inventory, every list shuffled and one endpoint more, in a new process.
    inventory = _shuffled_inventory(tmp_path, extra=True)
    out = apply(dp, EXAMPLE_POLICY, inventory, ws)
    applied_ok(out)
    ids_after, rules_after = _numbers(ws, "identities.json"), _numbers(ws, "rules.json")
    assert {k: ids_after.get(k) for k in ids_before} == ids_before, "an identity changed its number"
    (new_key,) = set(ids_after) - set(ids_before)
    assert '"app":"cache"' in new_key
    assert ids_after[new_key] == max(ids_before.values()) + 1
    assert rules_after == rules_before

    listed_after = {r["labels"]: r["identity"] for r in show_json(dp, ws, "identity", "list")}
    assert {k: listed_after.get(k) for k in listed_before} == listed_before
    assert listed_after["app=cache env=prod kind=workload tier=data"] == ids_after[new_key]
    ipcache_after = tables.read_identities(dp)
    assert {n: ipcache_after.get(n) for n in ipcache_before} == ipcache_before
    cache_prefix = ipaddress.ip_network("10.80.0.42/32")
    assert set(ipcache_after) - set(ipcache_before) == {cache_prefix}
    assert ipcache_after[cache_prefix] == ids_after[new_key]

    # The rules in another order: every rule keeps its id, in the maps too.
    policy = _reversed_rules(tmp_path)
    applied_ok(apply(dp, policy, inventory, ws))
    assert _numbers(ws, "rules.json") == rules_before
    assert _numbers(ws, "identities.json") == ids_after
    record = show_json(dp, ws, "policy", "show")
    assert {name: int(i) for i, name in record["rules"].items()} == rules_before
    live_rules = {r["rule_name"]: r["rule"] for r in show_json(dp, ws, "bpf", "policy", "list")}
    assert live_rules and all(rules_before[name] == i for name, i in live_rules.items()), live_rules


def test_the_shuffled_inventory_is_the_same_inventory(tmp_path):
    """The control for the test above: the shuffled file differs in order
    only (and in the one added endpoint)."""
    original = load_inventory(EXAMPLE_INVENTORY)
    shuffled = load_inventory(_shuffled_inventory(tmp_path, extra=False))
    assert [e.name for e in shuffled.endpoints] != [e.name for e in original.endpoints]
    assert [h.name for h in shuffled.hosts] != [h.name for h in original.hosts]

    def summary(items) -> list:
        return sorted((getattr(x, "name", None) or x.id, render(x.identity_labels()),
                       getattr(x, "addresses", None) or x.cidrs) for x in items)

    for section in ("hosts", "endpoints", "sessions", "networks"):
        assert summary(getattr(shuffled, section)) == summary(getattr(original, section)), section
