"""Policy fuzzing: random and mutated policy and inventory documents give
either a located error (every problem one line naming FILE:LINE) or a valid,
self-consistent compile; never a traceback.

The fuzz itself runs in a child process under a memory limit, each case
under a time limit (tests/unit/fuzz_policies.py), so that a YAML bomb fails
its case rather than the machine. Sizes: DATAPLANE_FUZZ_POLICIES cases
(`make soak` raises it), seed DATAPLANE_FUZZ_SEED, one case alone with
DATAPLANE_FUZZ_CASE. A failure prints the seed, the case and the documents.

Then one test per bug the fuzzer found, each fixed in the parsers or the
compiler: deep nesting, recursive aliases, alias bombs, non-ASCII digits in
ports, integers too long to print, times past the end of the calendar in
UTC, IPv6 zone ids, and session ends beyond the datapath's u32 seconds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.compiler import EXPIRES_MAX, Compiler
from dataplane.identity import Allocator
from dataplane.inventory import Inventory, Session, parse_inventory
from dataplane.policy import parse_policy
from dataplane.source import MAX_ALIAS_NODES, MAX_DEPTH, SourceError, loads
from tests.reliability import record, size
from tests.unit import fuzz_policies as fz

ROOT = Path(__file__).resolve().parents[2]
SEED = os.environ.get("DATAPLANE_FUZZ_SEED", "20261205")
CASES = size("DATAPLANE_FUZZ_POLICIES", 1000)
ONLY = os.environ.get("DATAPLANE_FUZZ_CASE")
P, I = "policy.yaml", "inventory.yaml"


def problems(text: str, parse=parse_policy, name: str = P) -> list[str]:
    with pytest.raises(SourceError) as e:
        parse(*loads(text, name))
    return e.value.problems


def one_rule(ports: str = "[tcp/443]", src: str = "[{entity: any}]", extra: str = "") -> str:
    return ("apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n"     # 1-3
            "  - name: r\n    action: allow\n"                         # 4-5
            f"    from: {src}\n    to: [{{workload: {{app: web}}}}]\n"  # 6-7
            f"    ports: {ports}\n" + extra)                           # 8


def inventory(sessions: str = "", endpoints: str = "") -> str:
    return ("apiVersion: zt-dataplane/v1\nkind: Inventory\n"           # 1-2
            "hosts: [{name: h1, address: 10.0.0.1}]\n"                 # 3
            "endpoints:\n  - {name: w, host: h1, address: 10.0.0.2, labels: {app: web}}\n" + endpoints +  # 4-5
            ("sessions:\n" + sessions if sessions else ""))


def compile_state(policy_text: str, inventory_text: str, now=fz.NOW, inv=None):
    pol = parse_policy(*loads(policy_text, P))
    inv = inv or parse_inventory(*loads(inventory_text, I))
    return Compiler(pol, inv, Allocator(None), Allocator(None, first=1), now).compile("h1")


# --- the fuzz -----------------------------------------------------------------------------

def _report(failures: list) -> str:
    shown = "\n\n".join(f"case {f['case']}: {f['kind']}\n{f['detail']}\n{f['document']}" for f in failures[:5])
    replay = f"DATAPLANE_FUZZ_SEED={SEED} DATAPLANE_FUZZ_CASE={failures[0]['case']}"
    return f"{len(failures)} failing cases (seed {SEED}); replay one with {replay}\n\n{shown}"


@pytest.mark.timeout(max(600, CASES))
def test_fuzzed_documents_give_a_located_error_or_a_valid_compile(tmp_path):
    cmd = [sys.executable, "-m", "tests.unit.fuzz_policies", "--seed", SEED, "--cases", str(CASES),
           "--workdir", str(tmp_path)] + (["--case", ONLY] if ONLY else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        current = (tmp_path / "current").read_text().strip() if (tmp_path / "current").exists() else "?"
        pytest.fail(f"the fuzz process died (exit {proc.returncode}) in seed {SEED} case {current}; replay with "
                    f"DATAPLANE_FUZZ_SEED={SEED} DATAPLANE_FUZZ_CASE={current}\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = summary.pop("failures")
    record("policy_fuzz", {"documents": summary["documents"], "valid_compiles": summary["valid_compiles"],
                           "located_errors": summary["located_errors"],
                           "capacity_refusals": summary["capacity_refusals"], "by_kind": summary["by_kind"],
                           "by_family": summary["by_family"], "tracebacks": summary["tracebacks"],
                           "failures": len(failures), "seed": SEED, "duration_s": summary["duration_s"]})
    assert not failures, _report(failures)
    assert summary["documents"] == (1 if ONLY else CASES)
    if not ONLY:
        # Both outcomes are exercised, and the valid generator's documents all compile.
        assert summary["valid_compiles"] > CASES // 10 and summary["located_errors"] > CASES // 4
        assert set(summary["by_family"]["valid"]) == {"compiled"}


def _truncations(raw: bytes, count: int):
    """count lengths spread over 0..len(raw), or every length when count covers them."""
    if count >= len(raw) + 1:
        return range(len(raw) + 1)
    return sorted({round(i * len(raw) / (count - 1)) for i in range(count)})


SMALL_POLICY = one_rule("[tcp/443, {protocol: udp, port: 53, endPort: 60}, icmp]", extra=(
    "    valid: {notBefore: 2030-01-01T00:00:00Z, notAfter: '2031-01-01T00:00:00+02:00'}\n"
    "  - {name: d, action: deny, from: [{cidr: 'fd00::/64'}], to: [{entity: host}]}\n")).encode()
SMALL_INVENTORY = inventory("  - {user: alice, groups: [eng], address: 'fd00::5', expires: 2099-01-01T00:00:00Z}\n",
                            ).encode()


@pytest.mark.parametrize("which", ["small policy", "small inventory", "example policy", "example inventory"])
def test_truncation_at_every_length(which, tmp_path):
    """A document cut anywhere: a located error or, where the cut leaves a
    valid document, a valid compile. The small documents are cut at every
    length; the examples at every length under `make soak` and at evenly
    spread lengths otherwise."""
    pol, inv = (SMALL_POLICY, SMALL_INVENTORY) if which.startswith("small") else \
        (fz.EXAMPLE_POLICY, fz.EXAMPLE_INVENTORY)
    target = pol if which.endswith("policy") else inv
    lengths = _truncations(target, len(target) + 1 if which.startswith("small") else max(100, CASES // 5))
    results = {}
    for n in lengths:
        c = fz.Case(SEED, n, "truncated", f"{which} cut at {n}", target[:n] if target is pol else pol,
                    target[:n] if target is inv else inv)
        out = fz.judge(c, tmp_path)
        assert out.result in ("compiled", "located"), f"{out.kind}: {out.detail}\n{c.show()}"
        results[out.result] = results.get(out.result, 0) + 1
    assert results.get("located") and results.get("compiled")   # the whole document, at least, compiles
    record(f"policy_fuzz_truncation_{which.replace(' ', '_')}", {"lengths": len(lengths), **results})


# --- the oracle itself can fail -----------------------------------------------------------

def test_the_oracle_refuses_unlocated_and_multi_line_problems():
    files = {P: b"a\nb\n"}
    assert fz.located_problems(SourceError([f"{P}:2: bad"]), files) is None
    assert fz.located_problems(SourceError([f"{P}: bad"]), files)              # no line
    assert fz.located_problems(SourceError([f"{P}:9: bad"]), files)            # past the end
    assert fz.located_problems(SourceError([f"{P}:1: bad\nworse"]), files)     # two lines
    assert fz.located_problems(SourceError(["other.yaml:1: bad"]), files)      # another file


def test_the_oracle_reports_any_other_exception(tmp_path, monkeypatch):
    def broken(path):
        raise ValueError("invalid literal for int()")

    monkeypatch.setattr(fz, "load_policy", broken)
    out = fz.judge(fz.case(SEED, 0), tmp_path)
    assert (out.result, out.kind) == ("FAILURE", "ValueError") and "invalid literal" in out.detail


def test_a_case_replays_identically():
    assert fz.case(SEED, 17) == fz.case(SEED, 17)
    assert fz.case(SEED, 17) != fz.case(SEED, 18)


# --- a. deep nesting ----------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 450, 1000, 100_000])
def test_deep_nesting_is_a_located_error(depth):
    for text in ("[" * depth + "]" * depth, "rules:\n" + "".join(f"{'  ' * i}- \n" for i in range(min(depth, 3000))),
                 "{a: " * depth + "1" + "}" * depth):
        assert problems(text)[0].startswith(f"{P}:") and "nested more than" in problems(text)[0]


def test_nesting_a_document_needs_is_accepted():
    text = "rules: []\nmetadata:\n  description: " + "[" * (MAX_DEPTH - 3) + "]" * (MAX_DEPTH - 3) + "\n"
    data, _ = loads(text, P)
    assert data["metadata"]["description"] == eval("[" * (MAX_DEPTH - 3) + "]" * (MAX_DEPTH - 3))


def test_depth_built_from_aliases_is_bounded_too():
    lines = ["a0: &a0 [" + "[" * 40 + "]" * 40 + "]"]
    lines += [f"a{i}: &a{i} " + "[" * 20 + f"*a{i - 1}" + "]" * 20 for i in range(1, 6)]
    assert "nested more than" in problems("\n".join(lines) + "\n")[0]


# --- b. recursive aliases ----------------------------------------------------------------------

@pytest.mark.parametrize("text,line", [("a: &a [*a]\n", 1), ("x: 1\na: &a {b: *a}\n", 2),
                                       ("rules: &r\n  - name: x\n    from: *r\n", 3)])
def test_a_recursive_alias_is_a_located_error(text, line):
    assert problems(text) == [f"{P}:{line}: an alias refers to a node that contains it"]


# --- c. alias bombs ---------------------------------------------------------------------------------

def test_an_alias_bomb_is_a_located_error():
    assert problems(fz._laughs(9, 10)) == [f"{P}:6: aliases unfold to more than {MAX_ALIAS_NODES} nodes"]


def test_modest_aliases_still_work():
    text = ("apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n"
            "  - {name: a, action: allow, from: &any [{entity: any}], to: &web [{workload: {app: web}}]}\n"
            "  - {name: b, action: deny, from: *any, to: *web, ports: [udp/53]}\n")
    policy = parse_policy(*loads(text, P))
    assert policy.rules[0].sources == policy.rules[1].sources


# --- d. non-ASCII digits in ports ---------------------------------------------------------------

@pytest.mark.parametrize("port", ["²/80", "tcp/²", "tcp/٨٠", "tcp/８０", "tcp/ 80", "tcp/8_0", "tcp/+80", "tcp/80-٩٠"])
def test_ports_take_ascii_digits_only(port):
    (problem,) = problems(one_rule(f"['{port}']"))
    assert problem.startswith(f"{P}:8: ") and repr(port) in problem


def test_ascii_ports_still_parse():
    rule = parse_policy(*loads(one_rule("[tcp/0080, '47', udp/1-65535, 'tcp/" + "0" * 50 + "443']"), P)).rules[0]
    assert [(p.proto, p.lo, p.hi) for p in rule.ports] == [(6, 80, 80), (47, 0, 65535), (17, 1, 65535), (6, 443, 443)]
    assert "out of range" in problems(one_rule("['tcp/" + "9" * 5000 + "']"))[0]


# --- e. integers too long to print ------------------------------------------------------------

@pytest.mark.parametrize("number", ["9" * 5000, "0x" + "f" * 5000, "0b" + "1" * 20000, "-" + "9" * 4400, "9" * 101])
@pytest.mark.parametrize("where", ["port", "label", "name", "group"])
def test_an_absurd_integer_is_a_located_error(number, where):
    if where == "port":
        msgs = problems(one_rule(f"[{{protocol: tcp, port: {number}}}]"))
        line = 8
    elif where == "label":
        msgs = problems(inventory().replace("app: web", f"app: {number}"), parse_inventory, I)
        line = 5
    elif where == "name":
        msgs = problems(one_rule() + f"metadata: {{name: {number}}}\n")
        line = 9
    else:
        msgs = problems(inventory(f"  - {{user: u, address: 10.0.0.9, groups: [{number}]}}\n"), parse_inventory, I)
        line = 7
    assert msgs == [f"{(P if where in ('port', 'name') else I)}:{line}: a number of "
                    f"{len(number.lstrip('-'))} characters is too long (at most 100); quote it if it is a name"]


def test_a_long_but_sane_integer_is_a_label_value():
    inv = parse_inventory(*loads(inventory().replace("app: web", "app: 12345678901234567890123"), I))
    assert inv.endpoints[0].labels["app"] == "12345678901234567890123"


# --- f. times past the end of the calendar in UTC ---------------------------------------------

@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-14:00", "9999-12-31T20:00:00-05:00",
                                   "0001-01-01T00:00:00+14:00"])
def test_a_time_outside_the_calendar_in_utc_is_a_located_error(value):
    assert problems(one_rule(extra=f"    valid: {{notBefore: '{value}'}}\n")) == [
        f"{P}:9: notBefore: {value!r} is outside the calendar in UTC (years 1-9999)"]
    assert problems(inventory(f"  - {{user: u, address: 10.0.0.9, expires: '{value}'}}\n"), parse_inventory, I) == [
        f"{I}:7: expires: {value!r} is outside the calendar in UTC (years 1-9999)"]


def test_the_last_time_in_utc_still_compiles():
    state = compile_state(one_rule(extra="    valid: {notBefore: '9999-12-31T23:59:59Z'}\n"), inventory(
        "  - {user: u, address: 10.0.0.9, expires: '9999-12-31T23:59:59+14:00'}\n"))
    assert state.next_change == dt.datetime(9999, 12, 31, 9, 59, 59, tzinfo=dt.timezone.utc)
    assert json.loads(state.to_json_text())["expires"] == {"10.0.0.9/32": "9999-12-31T09:59:59+00:00"}


def test_a_session_record_past_the_calendar_compiles_without_overflow():
    """Sessions opened through the controller skip the file parser: the
    compiler clamps their end to the calendar's last instant (earlier)."""
    end = dt.datetime.fromisoformat("9999-12-31T23:59:59-14:00")
    inv = parse_inventory(*loads(inventory(), I))
    inv = Inventory(inv.hosts, inv.endpoints, (Session("s", "u", (), {}, (ipaddress.ip_address("10.0.0.9"),), end,
                                                       "session s"),), inv.networks, inv.file)
    state = compile_state(one_rule(), "", inv=inv)
    assert state.next_change == dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    assert "9999-12-31T23:59:59.999999+00:00" in state.to_json_text()
    assert state.ipcache(wall_now=fz.NOW, mono_now=5)[ipaddress.ip_network("10.0.0.9/32")][1] == EXPIRES_MAX


# --- g. IPv6 zone ids ----------------------------------------------------------------------------

def test_a_zone_id_in_an_address_is_a_located_error():
    msgs = problems(inventory("  - {user: u, address: 'fd00::2%eth0'}\n  - {user: v, address: 'fd00::2%eth1'}\n"),
                    parse_inventory, I)
    assert msgs == [f"{I}:7: session address: 'fd00::2%eth0' has a zone id (%eth0); the datapath keys addresses "
                    f"without one",
                    f"{I}:8: session address: 'fd00::2%eth1' has a zone id (%eth1); the datapath keys addresses "
                    f"without one"]
    assert "zone id" in problems(inventory(endpoints="  - {name: x, host: h1, address: 'fe80::1%1'}\n"),
                                 parse_inventory, I)[0]


@pytest.mark.parametrize("cidr", ["fd00::%eth0/64", "fd00::2%eth0/128"])
def test_a_zone_id_in_a_cidr_is_a_located_error(cidr):
    assert problems(one_rule(src=f"[{{cidr: '{cidr}'}}]")) == [
        f"{P}:6: cidr: bad CIDR {cidr!r} (a zone id has no place in a prefix)"]


def test_a_zone_id_in_a_test_end_is_a_located_error():
    text = one_rule() + "tests:\n  - {from: 'fd00::2%eth0', to: 10.0.0.2, port: tcp/443, expect: allow}\n"
    assert problems(text)[0].startswith(f"{P}:10: 'fd00::2%eth0' is not an address")


def test_v4_mapped_addresses_stay_their_own_v6_key():
    state = compile_state(one_rule(), inventory("  - {user: u, address: '::ffff:10.0.0.9'}\n"))
    assert ipaddress.ip_network("::ffff:10.0.0.9/128") in state.identities
    assert ipaddress.ip_network("10.0.0.9/32") not in state.identities


# --- h. session ends beyond the u32 expires_s --------------------------------------------------

MONO = 10 ** 6


@pytest.mark.parametrize("end", [
    (fz.NOW + dt.timedelta(seconds=EXPIRES_MAX + 1 - MONO)).strftime("%Y-%m-%dT%H:%M:%SZ"),   # one past the field
    (fz.NOW + dt.timedelta(seconds=2 ** 32 - MONO)).strftime("%Y-%m-%dT%H:%M:%SZ"),           # would wrap to 0: never
    (fz.NOW + dt.timedelta(seconds=2 ** 32 + 5 - MONO)).strftime("%Y-%m-%dT%H:%M:%SZ"),       # would wrap to 5: at once
    "2200-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_an_expiry_beyond_the_u32_field_is_clamped_not_wrapped(end):
    state = compile_state(one_rule(), inventory(f"  - {{user: u, address: 10.0.0.9, expires: '{end}'}}\n"))
    net = ipaddress.ip_network("10.0.0.9/32")
    exact = MONO + math.ceil((dt.datetime.fromisoformat(end.replace("Z", "+00:00")) - fz.NOW).total_seconds())
    assert exact > EXPIRES_MAX
    assert state.ipcache(wall_now=fz.NOW, mono_now=MONO)[net] == (state.identities[net], EXPIRES_MAX)


def test_an_expiry_that_fits_is_exact():
    state = compile_state(one_rule(), inventory("  - {user: u, address: 10.0.0.9, expires: '2100-01-01T00:00:00Z'}\n"))
    net = ipaddress.ip_network("10.0.0.9/32")
    exact = 7 + math.ceil((dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc) - fz.NOW).total_seconds())
    assert exact < EXPIRES_MAX
    assert state.ipcache(wall_now=fz.NOW, mono_now=7)[net][1] == exact


def test_fleet_host_views_clamp_the_same_way():
    """Fleet agents convert the host view's RFC 3339 ends themselves (dataplane.fleet.HostView)."""
    from dataplane.fleet import HostView

    end = (fz.NOW + dt.timedelta(seconds=2 ** 32 + 5 - MONO)).strftime("%Y-%m-%dT%H:%M:%SZ")
    state = compile_state(one_rule(), inventory(f"  - {{user: u, address: 10.0.0.9, expires: '{end}'}}\n"))
    view = HostView.of(state, 1)
    assert view.loader_ipcache(wall_now=fz.NOW, mono_now=MONO)[ipaddress.ip_network("10.0.0.9/32")][1] == EXPIRES_MAX


# --- lone surrogates ----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["value", "key"])
def test_a_lone_surrogate_is_a_located_error(where):
    """A "\\ud800" escape makes a string no output can encode: once it reached
    `policy explain` through a label value and ended in a traceback."""
    if where == "value":
        text = inventory().replace("app: web", 'app: "we\\ud800b"')
        line = next(i for i, l in enumerate(text.splitlines(), 1) if "ud800" in l)
        got = problems(text, parse_inventory, I)
    else:
        text = one_rule(extra='    "x\\udc00": 1\n')
        line = 9
        got = problems(text)
    assert got == [f"{I if where == 'value' else P}:{line}: not valid Unicode text: a lone surrogate "
                   f"(\\u{'d800' if where == 'value' else 'dc00'}) at character {3 if where == 'value' else 2}"]


def test_escaped_non_ascii_text_still_loads():
    data, _ = loads('name: "caf\\u00e9 \\U0001F600"\n', P)
    assert data == {"name": "café \U0001F600"}
