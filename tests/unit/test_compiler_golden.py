"""Golden files for the policy compiler.

Each directory under tests/unit/golden/ is one case: policy.yaml,
inventory.yaml and expected-<host>.json for every host of the inventory,
holding CompiledState.to_json_text() for that host. Cases compile with
fresh in-memory numbering and a fixed `now`, so the files are exact.

After an intended change to the compiler, rewrite the files with

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_compiler_golden.py

read the diff (git diff tests/unit/golden) as carefully as new code, and run
again without UPDATE_GOLDEN. A run that rewrites files fails on purpose, so
an update left switched on cannot pass unnoticed.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import shutil
from pathlib import Path

import pytest

from dataplane.compiler import Compiler
from dataplane.explain import Explainer
from dataplane.identity import Allocator
from dataplane.inventory import load_inventory, parse_inventory
from dataplane.policy import load_policy, parse_policy
from dataplane.source import loads

GOLDEN = Path(__file__).resolve().parent / "golden"
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
TCP = 6


def compiler_for(case_dir: Path, now: dt.datetime = NOW) -> tuple[Compiler, list[str]]:
    policy = load_policy(case_dir / "policy.yaml")
    inventory = load_inventory(case_dir / "inventory.yaml")
    compiler = Compiler(policy, inventory, Allocator(None), Allocator(None, first=1), now=now)
    return compiler, [h.name for h in inventory.hosts]


def compile_case(case_dir: Path) -> dict[str, str]:
    """host -> the golden-file text of its compiled state."""
    compiler, hosts = compiler_for(case_dir)
    return {host: compiler.compile(host).to_json_text() for host in hosts}


def check_case(case_dir: Path, update: bool) -> list[str]:
    """Problems with one case, each readable on its own (a unified diff for
    a changed host). With update, the expected files are rewritten (and
    stale ones removed) and each rewrite is reported as a problem."""
    compiled = compile_case(case_dir)
    wanted = {f"expected-{host}.json" for host in compiled}
    problems = []
    for stale in sorted(p for p in case_dir.glob("expected-*.json") if p.name not in wanted):
        if update:
            stale.unlink()
            problems.append(f"{stale}: removed (no such host in the inventory any more)")
        else:
            problems.append(f"{stale}: no host of that name in {case_dir / 'inventory.yaml'}")
    for host, text in compiled.items():
        path = case_dir / f"expected-{host}.json"
        expected = path.read_text() if path.exists() else None
        if expected == text:
            continue
        if update:
            path.write_text(text)
            problems.append(f"{path}: rewritten")
        elif expected is None:
            problems.append(f"{path}: missing; create it with UPDATE_GOLDEN=1 and check it by hand")
        else:
            diff = difflib.unified_diff(expected.splitlines(keepends=True), text.splitlines(keepends=True),
                                        fromfile=f"{path} (expected)", tofile=f"compiled for host {host}")
            problems.append("".join(diff))
    return problems


def test_there_are_cases():
    assert len(CASES) >= 8, CASES
    for case in CASES:
        for name in ("policy.yaml", "inventory.yaml"):
            assert (GOLDEN / case / name).is_file(), f"{case}: {name} missing"


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    update = os.environ.get("UPDATE_GOLDEN") == "1"
    problems = check_case(GOLDEN / case, update)
    if problems and update:
        pytest.fail(f"UPDATE_GOLDEN=1 rewrote the golden files of case {case!r}; review them with "
                    f"`git diff {GOLDEN / case}` and run again without UPDATE_GOLDEN:\n" + "\n".join(problems),
                    pytrace=False)
    if problems:
        pytest.fail(f"case {case!r} compiles differently from its golden files (if the change is intended, "
                    f"see this module's docstring):\n" + "\n".join(problems), pytrace=False)


def test_the_example_case_is_the_shipped_example():
    """golden/example holds copies of examples/: when those change, the
    case must be updated (and checked) with them."""
    examples = GOLDEN.parents[2] / "examples"
    for name in ("policy.yaml", "inventory.yaml"):
        assert (GOLDEN / "example" / name).read_text() == (examples / name).read_text(), \
            f"examples/{name} changed; copy it to {GOLDEN / 'example'} and update the golden files"


# --- the mechanism itself ----------------------------------------------------------------

@pytest.fixture
def case_copy(tmp_path):
    dst = tmp_path / "workloads_three_hosts"
    shutil.copytree(GOLDEN / "workloads_three_hosts", dst)
    return dst


def test_a_changed_expectation_fails_with_a_unified_diff(case_copy):
    path = case_copy / "expected-h2.json"
    path.write_text(path.read_text().replace("tcp/8080 allow web-to-api", "tcp/8081 allow web-to-api"))
    problems = check_case(case_copy, update=False)
    assert len(problems) == 1, problems
    diff = problems[0]
    assert diff.startswith(f"--- {path} (expected)\n+++ compiled for host h2\n"), diff
    assert '-  "256 259 ingress tcp/8081 allow web-to-api"' in diff
    assert '+  "256 259 ingress tcp/8080 allow web-to-api"' in diff


def test_a_missing_or_stale_expectation_is_named(case_copy):
    (case_copy / "expected-h3.json").unlink()
    (case_copy / "expected-h9.json").write_text("{}\n")
    problems = check_case(case_copy, update=False)
    assert any(p.startswith(f"{case_copy / 'expected-h3.json'}: missing") for p in problems), problems
    assert any(p.startswith(f"{case_copy / 'expected-h9.json'}: no host of that name") for p in problems), problems


def test_update_rewrites_and_still_reports(case_copy):
    path = case_copy / "expected-h1.json"
    good = path.read_text()
    path.write_text("stale\n")
    (case_copy / "expected-h9.json").write_text("{}\n")
    problems = check_case(case_copy, update=True)
    assert problems == [f"{case_copy / 'expected-h9.json'}: removed (no such host in the inventory any more)",
                        f"{path}: rewritten"]
    assert path.read_text() == good
    assert not (case_copy / "expected-h9.json").exists()
    assert check_case(case_copy, update=False) == []


@pytest.mark.parametrize("case", CASES)
def test_compiling_is_deterministic(case):
    """Fresh numbering gives the same numbers whatever order the hosts are
    compiled in; the golden files depend on it."""
    compiler, hosts = compiler_for(GOLDEN / case)
    backwards = {host: compiler.compile(host).to_json_text() for host in reversed(hosts)}
    assert backwards == compile_case(GOLDEN / case)


# --- verdicts where prefixes overlap -----------------------------------------------------
#
# The ipcache resolves an address to the identity of its longest prefix. A
# CIDR named by a rule therefore takes its addresses away from whatever
# shorter prefix covered them before: the rules that selected the shorter
# prefix must still cover those addresses, or adding a rule about one
# subnet silently changes the verdict for flows that rule never mentions.

def _explainer(policy_text: str, inventory_text: str, now: dt.datetime = NOW) -> Explainer:
    policy = parse_policy(*loads(policy_text, "policy.yaml"))
    inventory = parse_inventory(*loads(inventory_text, "inventory.yaml"))
    return Explainer(Compiler(policy, inventory, Allocator(None), Allocator(None, first=1), now=now))


OVERLAP_INVENTORY = """\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {name: h1, address: 10.80.0.2}
endpoints:
  - {name: web-1, host: h1, address: 10.80.0.21, labels: {app: web}}
  - {name: db-1, host: h1, address: 10.80.0.41, labels: {app: db}}
networks:
  - {name: partner, cidrs: [10.80.0.128/25], labels: {trust: partner}}
sessions:
  - {user: alice, device: {managed: true}, address: 10.20.0.1}
  - {user: bob, device: {managed: false}, address: 10.20.0.2}
"""

OVERLAP_POLICY = """\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: partners-to-web
    action: allow
    from: [{network: {trust: partner}}]
    to: [{workload: {app: web}}]
    ports: [tcp/443]
  - name: world-to-web
    action: allow
    from: [{entity: world}]
    to: [{workload: {app: web}}]
    ports: [tcp/80]
  - name: some-never-db
    action: deny
    from: [{cidr: 10.80.0.192/26}, {cidr: 203.0.113.0/24}]
    to: [{workload: {app: db}}]
"""


def test_overlap_control_without_the_narrower_cidrs():
    """Without the deny rule the flows below are allowed: the baseline for
    the two tests after it."""
    policy = OVERLAP_POLICY.split("  - name: some-never-db")[0]
    ex = _explainer(policy, OVERLAP_INVENTORY)
    assert ex.explain("10.80.0.200", "workload:web-1", TCP, 443).verdict == "allow"
    assert ex.explain("203.0.113.9", "workload:web-1", TCP, 80).verdict == "allow"


def test_a_cidr_inside_a_named_network_stays_part_of_it():
    ex = _explainer(OVERLAP_POLICY, OVERLAP_INVENTORY)
    # The deny rule does what it says...
    assert ex.explain("10.80.0.200", "workload:db-1", TCP, 5432).verdict == "deny"
    # ...and 10.80.0.200 is still a partner address for partners-to-web.
    assert ex.explain("10.80.0.130", "workload:web-1", TCP, 443).verdict == "allow"
    got = ex.explain("10.80.0.200", "workload:web-1", TCP, 443)
    assert got.verdict == "allow", got.judgements


def test_a_cidr_outside_the_inventory_is_still_world():
    ex = _explainer(OVERLAP_POLICY, OVERLAP_INVENTORY)
    assert ex.explain("203.0.113.9", "workload:db-1", TCP, 5432).verdict == "deny"
    assert ex.explain("198.18.0.1", "workload:web-1", TCP, 80).verdict == "allow"
    got = ex.explain("203.0.113.9", "workload:web-1", TCP, 80)
    assert got.verdict == "allow", got.judgements


def test_posture_conditions_hold_for_entity_any():
    """`from: entity any` with a posture condition: everyone, but users only
    from devices that satisfy it. The condition must not vanish with the
    wildcard."""
    policy = """\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: anyone-managed-to-web
    action: allow
    from: [{entity: any}]
    to: [{workload: {app: web}}]
    ports: [tcp/443]
    conditions:
      posture: {managed: true}
"""
    ex = _explainer(policy, OVERLAP_INVENTORY)
    assert ex.explain("user:alice", "workload:web-1", TCP, 443).verdict == "allow"
    assert ex.explain("workload:db-1", "workload:web-1", TCP, 443).verdict == "allow"
    got = ex.explain("user:bob", "workload:web-1", TCP, 443)
    assert got.verdict == "deny", got.judgements
