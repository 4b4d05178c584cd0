"""Bad policies and inventories: every problem is reported as FILE:LINE and
a message naming what is wrong, all problems of a file at once, and the
command line turns them into one `dataplane: error:` line each, with a
non-zero exit and no traceback.

The first part calls the parsers; the second runs `dataplane policy
validate` (and `policy test`) in a subprocess on the same kinds of input.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from dataplane.inventory import load_inventory, parse_inventory
from dataplane.policy import load_policy, parse_policy
from dataplane.source import SourceError, loads

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / ".venv" / "bin" / "dataplane"

P = "policy.yaml"
I = "inventory.yaml"


def policy_problems(text: str, name: str = P) -> list[str]:
    with pytest.raises(SourceError) as e:
        parse_policy(*loads(text, name))
    return e.value.problems


def inventory_problems(text: str, name: str = I) -> list[str]:
    with pytest.raises(SourceError) as e:
        parse_inventory(*loads(text, name))
    return e.value.problems


def one_rule(extra: str = "", *, action: str = "allow", src: str = "[{workload: {app: web}}]",
             dst: str = "[{workload: {app: api}}]") -> str:
    """A policy with one rule; its lines are numbered as below, `extra`
    (rule fields, indented by four) starting at line 8."""
    text = (f"apiVersion: zt-dataplane/v1\n"     # 1
            f"kind: Policy\n"                     # 2
            f"rules:\n"                           # 3
            f"  - name: web-to-api\n"             # 4
            f"    action: {action}\n"             # 5
            f"    from: {src}\n"                  # 6
            f"    to: {dst}\n")                   # 7
    return text + textwrap.indent(textwrap.dedent(extra), "    ")


GOOD_INVENTORY = """\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {name: h1, address: 10.0.0.1}
  - {name: h2, address: 10.0.0.2}
endpoints:
  - {name: web-1, host: h1, address: 10.0.1.1, labels: {app: web}}
  - {name: api-1, host: h2, address: 10.0.2.1, labels: {app: api}}
"""


def test_the_helpers_build_valid_documents():
    policy = parse_policy(*loads(one_rule("ports: [tcp/8080]\n"), P))
    assert [r.name for r in policy.rules] == ["web-to-api"]
    assert policy.rules[0].where == f"{P}:4"
    inventory = parse_inventory(*loads(GOOD_INVENTORY, I))
    assert [e.name for e in inventory.endpoints] == ["web-1", "api-1"]


# --- unknown fields ----------------------------------------------------------------------

def test_unknown_field_at_the_top_level():
    text = "apiVersion: zt-dataplane/v1\nkind: Policy\ncolour: blue\nrules: []\n"
    assert policy_problems(text) == [
        f"{P}:3: unknown field 'colour' in the policy (known: apiVersion, kind, metadata, mode, rules, tests)"]


def test_unknown_field_in_a_rule():
    assert policy_problems(one_rule("prots: [tcp/8080]\n")) == [
        f"{P}:8: unknown field 'prots' in a rule "
        + "(known: action, conditions, description, from, name, ports, to, valid)"]


def test_unknown_field_in_a_port():
    text = one_rule("""\
        ports:
          - {protocol: tcp, port: 8080}
          - {protocol: tcp, port: 8443, end: 8450}
        """)
    assert policy_problems(text) == [f"{P}:10: unknown field 'end' in a port (known: endPort, port, protocol)"]


def test_unknown_field_in_an_inventory_endpoint():
    text = GOOD_INVENTORY + "  - name: db-1\n    host: h2\n    address: 10.0.2.2\n    lables: {app: db}\n"
    assert inventory_problems(text) == [
        f"{I}:12: unknown field 'lables' in an endpoint (known: address, addresses, host, labels, name)"]


# --- wrong types -------------------------------------------------------------------------

def test_rules_not_a_list():
    text = "apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n  name: web-to-api\n  action: allow\n"
    assert policy_problems(text) == [f"{P}:4: rules must be a list, not a mapping"]


def test_port_as_letters_in_the_short_form():
    assert policy_problems(one_rule("ports: [tcp/https]\n")) == [
        f"{P}:8: 'tcp/https': ports must be numbers, as in tcp/443 or udp/1000-2000"]


def test_port_as_letters_in_the_long_form():
    """A word where a number belongs is a type error, and the message says
    so (not that the word is out of range)."""
    problems = policy_problems(one_rule("ports: [{protocol: tcp, port: https}]\n"))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{P}:8: port must be a number") and "'https'" in problems[0], problems
    assert "number" in problems[0], problems
    assert "out of range" not in problems[0], problems


def test_labels_as_a_list_in_the_inventory():
    text = GOOD_INVENTORY.replace("labels: {app: api}", "labels: [app, api]")
    assert inventory_problems(text) == [f"{I}:8: endpoint labels must be a mapping"]


def test_selector_as_a_list_in_the_policy():
    assert policy_problems(one_rule(dst="[{workload: [app, api]}]")) == [
        f"{P}:7: workload selector must be a mapping of label requirements, not a list"]


def test_session_groups_must_be_names():
    text = GOOD_INVENTORY + "sessions:\n  - user: alice\n    groups: [eng, {name: ops}]\n    address: 10.9.0.1\n"
    problems = inventory_problems(text)
    assert len(problems) == 1 and problems[0].startswith(f"{I}:11: "), problems
    assert "group" in problems[0], problems


# --- CIDRs -------------------------------------------------------------------------------

def test_cidr_with_host_bits_set():
    assert policy_problems(one_rule(src="[{cidr: 10.1.2.3/16}]")) == [
        f"{P}:6: cidr: bad CIDR '10.1.2.3/16' (10.1.2.3/16 has host bits set)"]


def test_cidr_garbage():
    assert policy_problems(one_rule(src="[{cidr: ten.0.0.0/8}]")) == [
        f"{P}:6: cidr: bad CIDR 'ten.0.0.0/8' ('ten.0.0.0/8' does not appear to be an IPv4 or IPv6 network)"]


def test_network_cidr_with_host_bits_set_in_the_inventory():
    text = GOOD_INVENTORY + "networks:\n  - name: partner\n    cidrs: [192.0.2.0/24, 198.51.100.7/24]\n"
    assert inventory_problems(text) == [
        f"{I}:11: network cidr: bad CIDR '198.51.100.7/24' (198.51.100.7/24 has host bits set)"]


# --- ports -------------------------------------------------------------------------------

@pytest.mark.parametrize("ports, message", [
    ("[tcp/0]", "'tcp/0': port out of range (1-65535)"),
    ("[tcp/65536]", "'tcp/65536': port out of range (1-65535)"),
    ("[udp/1-65536]", "'udp/1-65536': port out of range (1-65535)"),
    ("[{protocol: tcp, port: 0}]", "port 0 is out of range (1-65535)"),
    ("[{protocol: tcp, port: 65536}]", "port 65536 is out of range (1-65535)"),
    ("[{protocol: udp, port: 1000, endPort: 65536}]", "endPort 65536 is out of range (1-65535)"),
])
def test_port_out_of_range(ports, message):
    assert policy_problems(one_rule(f"ports: {ports}\n")) == [f"{P}:8: {message}"]


def test_end_port_below_port():
    text = one_rule("""\
        ports:
          - {protocol: udp, port: 2000, endPort: 1000}
          - udp/3000-2999
        """)
    assert policy_problems(text) == [f"{P}:9: endPort 1000 is below port 2000",
                                     f"{P}:10: 'udp/3000-2999': end port 2999 is below port 3000"]


def test_a_port_range_missing_its_end_is_refused():
    """'tcp/443-' is a range with no end, not port 443."""
    problems = policy_problems(one_rule("ports: [tcp/443-]\n"))
    assert len(problems) == 1 and problems[0].startswith(f"{P}:8: 'tcp/443-'"), problems


# --- names, versions, actions, protocols, peers ------------------------------------------

def test_duplicate_rule_name_names_the_first():
    text = one_rule() + "  - name: web-to-api\n    action: deny\n    from: [{entity: any}]\n    to: [{entity: any}]\n"
    assert policy_problems(text) == [f"{P}:8: duplicate rule name 'web-to-api' (first at line 4)"]


@pytest.mark.parametrize("version", ["zt-dataplane/v2", "v1"])
def test_bad_api_version(version):
    text = f"apiVersion: {version}\nkind: Policy\nrules: []\n"
    assert policy_problems(text) == [f"{P}:1: apiVersion {version!r} is not supported (this is zt-dataplane/v1)"]


def test_missing_api_version_is_one_problem():
    assert policy_problems("kind: Policy\nrules: []\n") == [f"{P}:1: missing apiVersion (this is zt-dataplane/v1)"]


def test_wrong_kind():
    assert policy_problems("apiVersion: zt-dataplane/v1\nkind: Inventory\nrules: []\n") == [
        f"{P}:2: kind must be 'Policy' here, not 'Inventory'"]


@pytest.mark.parametrize("action", ["permit", "Allow"])
def test_unknown_action(action):
    assert policy_problems(one_rule(action=action)) == [
        f"{P}:5: action {action!r} is not one of allow, deny, audit"]


def test_unknown_protocol():
    text = one_rule("""\
        ports:
          - {protocol: gre}
          - ftp/21
        """)
    assert policy_problems(text) == [
        f"{P}:9: protocol 'gre' is not one of tcp, udp, icmp, icmpv6, sctp, any or a number 0-255",
        f"{P}:10: 'ftp/21': unknown protocol 'ftp' (want tcp/443, udp/1000-2000, icmp, any)"]


def test_unknown_peer_kind():
    assert policy_problems(one_rule(src="[{workload: {app: web}}, {pod: {app: web}}]")) == [
        f"{P}:6: unknown peer kind 'pod' (known: user, workload, host, network, selector, cidr, entity)"]


def test_unknown_entity():
    assert policy_problems(one_rule(dst="[{entity: everyone}]")) == [
        f"{P}:7: entity 'everyone' is not one of any, world, host"]


# --- validity windows --------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("yesterday", "notBefore: 'yesterday' is not an RFC 3339 time such as 2026-12-31T00:00:00Z"),
    ("2026-13-01T00:00:00Z", "notBefore: '2026-13-01T00:00:00Z' is not an RFC 3339 time such as 2026-12-31T00:00:00Z"),
    ("2026-06-01T00:00:00", "notBefore: '2026-06-01T00:00:00' has no time zone (add Z or an offset)"),
])
def test_bad_time_in_valid(value, message):
    text = one_rule(f"valid:\n  notBefore: {value}\n")
    assert policy_problems(text) == [f"{P}:9: {message}"]


@pytest.mark.parametrize("not_after", ["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"])
def test_not_after_must_follow_not_before(not_after):
    text = one_rule(f"valid:\n  notBefore: 2026-02-01T00:00:00Z\n  notAfter: {not_after}\n")
    assert policy_problems(text) == [f"{P}:10: notAfter must be after notBefore"]


# --- the inventory -----------------------------------------------------------------------

def test_duplicate_endpoint_name():
    text = GOOD_INVENTORY + "  - {name: web-1, host: h2, address: 10.0.2.9}\n"
    assert inventory_problems(text) == [f"{I}:9: duplicate endpoint name 'web-1' (first at line 7)"]


def test_endpoint_on_an_unknown_host():
    text = GOOD_INVENTORY + "  - {name: db-1, host: h3, address: 10.0.3.1}\n"
    assert inventory_problems(text) == [f"{I}:9: endpoint host 'h3' is not in hosts"]


def test_one_address_claimed_by_two_endpoints():
    text = GOOD_INVENTORY + "  - {name: api-2, host: h2, addresses: [10.0.2.2, 10.0.1.1]}\n"
    assert inventory_problems(text) == [f"{I}:9: address 10.0.1.1 of endpoint api-2 already belongs to endpoint web-1"]


def test_an_endpoint_address_may_not_be_a_hosts():
    text = GOOD_INVENTORY + "  - {name: api-2, host: h2, address: 10.0.0.2}\n"
    assert inventory_problems(text) == [f"{I}:9: address 10.0.0.2 of endpoint api-2 already belongs to host h2"]


# --- files: YAML syntax, empty, JSON -----------------------------------------------------

def test_invalid_yaml_syntax_reports_the_line(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(one_rule().replace("    action: allow\n", "    action: allow: now\n"))
    with pytest.raises(SourceError) as e:
        load_policy(path)
    assert e.value.problems == [f"{path}:5: not valid YAML or JSON: mapping values are not allowed here"]


def test_duplicate_key_is_located():
    assert policy_problems(one_rule("action: deny\n")) == [f"{P}:8: duplicate key 'action'"]


@pytest.mark.parametrize("content", ["", "\n\n", "# nothing here yet\n"])
def test_an_empty_file(tmp_path, content):
    path = tmp_path / "policy.yaml"
    path.write_text(content)
    with pytest.raises(SourceError) as e:
        load_policy(path)
    assert e.value.problems == [f"{path}:1: the file is empty"]


def test_an_empty_inventory_file(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text("")
    with pytest.raises(SourceError) as e:
        load_inventory(path)
    assert e.value.problems == [f"{path}:1: the file is empty"]


def test_a_missing_file(tmp_path):
    with pytest.raises(SourceError) as e:
        load_policy(tmp_path / "nope.yaml")
    assert e.value.problems == [f"{tmp_path / 'nope.yaml'}: no such file"]


JSON_POLICY = {
    "apiVersion": "zt-dataplane/v1",
    "kind": "Policy",
    "rules": [{"name": "web-to-api", "action": "allow",
               "from": [{"workload": {"app": "web"}}], "to": [{"workload": {"app": "api"}}],
               "ports": [{"protocol": "tcp", "port": 8080}, "udp/53"]}],
}


def test_a_json_policy_parses(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(JSON_POLICY, indent=2))
    policy = load_policy(path)
    assert [r.name for r in policy.rules] == ["web-to-api"]
    assert [p.text() for p in policy.rules[0].ports] == ["tcp/8080", "udp/53"]
    assert policy.rules[0].where == f"{path}:5"


def test_a_json_policy_on_one_line_parses(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(JSON_POLICY))
    assert [r.name for r in load_policy(path).rules] == ["web-to-api"]


def test_a_json_policy_indented_with_tabs_parses(tmp_path):
    """Tabs are JSON whitespace (json.dump(indent='\\t'), jq --tab)."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(JSON_POLICY, indent="\t"))
    assert [r.name for r in load_policy(path).rules] == ["web-to-api"]


def test_a_json_syntax_error_is_located(tmp_path):
    path = tmp_path / "policy.json"
    text = json.dumps(JSON_POLICY, indent=2).replace('"action": "allow",', '"action": "allow"')
    path.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if '"from"' in l)
    with pytest.raises(SourceError) as e:
        load_policy(path)
    assert e.value.problems == [f"{path}:{line}: not valid YAML or JSON: expected ',' or '}}', but got '<scalar>'"]


def test_a_json_value_error_is_located(tmp_path):
    path = tmp_path / "policy.json"
    doc = json.loads(json.dumps(JSON_POLICY))
    doc["rules"][0]["ports"][0]["port"] = 70000
    text = json.dumps(doc, indent=2)
    path.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "70000" in l)
    with pytest.raises(SourceError) as e:
        load_policy(path)
    assert e.value.problems == [f"{path}:{line}: port 70000 is out of range (1-65535)"]


def test_every_problem_is_reported_at_once():
    text = one_rule("""\
        ports: [tcp/0, {protocol: gre}]
        valid: {notBefore: soon}
        """, action="permit", src="[{cidr: 10.0.0.1/8}]")
    assert policy_problems(text) == [
        f"{P}:5: action 'permit' is not one of allow, deny, audit",
        f"{P}:6: cidr: bad CIDR '10.0.0.1/8' (10.0.0.1/8 has host bits set)",
        f"{P}:8: 'tcp/0': port out of range (1-65535)",
        f"{P}:8: protocol 'gre' is not one of tcp, udp, icmp, icmpv6, sctp, any or a number 0-255",
        f"{P}:9: notBefore: 'soon' is not an RFC 3339 time such as 2026-12-31T00:00:00Z",
    ]


# --- the command line --------------------------------------------------------------------

def run_cli(*args, state_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args), "--state-dir", str(state_dir)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)


JSON_SYNTAX_ERROR = """\
{
  "apiVersion": "zt-dataplane/v1",
  "rules": [
    {"name": "a" "action": "allow"}
  ]
}
"""

JSON_VALUE_ERROR = """\
{
  "apiVersion": "zt-dataplane/v1",
  "rules": [
    {"name": "a", "action": "allow", "from": [{"entity": "any"}],
     "to": [{"entity": "any"}], "ports": ["tcp/99999"]}
  ]
}
"""

# name -> (policy text or bytes, inventory text or None, [(file, line, words), ...]);
# file is "policy" or "inventory".
CLI_CASES = {
    "unknown-top-level-field": (
        "apiVersion: zt-dataplane/v1\nkind: Policy\ncolour: blue\nrules: []\n", None,
        [("policy", 3, "unknown field 'colour' in the policy")]),
    "unknown-rule-field": (one_rule("prots: [tcp/8080]\n"), None, [("policy", 8, "unknown field 'prots' in a rule")]),
    "unknown-port-field": (one_rule("ports: [{protocol: tcp, port: 1, end: 2}]\n"), None,
                           [("policy", 8, "unknown field 'end' in a port")]),
    "unknown-endpoint-field": (
        one_rule(), GOOD_INVENTORY + "  - {name: db-1, host: h2, address: 10.0.2.2, lables: {app: db}}\n",
        [("inventory", 9, "unknown field 'lables' in an endpoint")]),
    "rules-not-a-list": ("apiVersion: zt-dataplane/v1\nrules: web-to-api\n", None,
                         [("policy", 2, "rules must be a list, not a string")]),
    "port-letters": (one_rule("ports: [tcp/https]\n"), None, [("policy", 8, "'tcp/https': ports must be numbers")]),
    "labels-as-a-list": (one_rule(), GOOD_INVENTORY.replace("labels: {app: web}", "labels: [app, web]"),
                         [("inventory", 7, "endpoint labels must be a mapping")]),
    "cidr-host-bits": (one_rule(src="[{cidr: 10.1.2.3/16}]"), None, [("policy", 6, "has host bits set")]),
    "cidr-garbage": (one_rule(src="[{cidr: garbage}]"), None, [("policy", 6, "bad CIDR 'garbage'")]),
    "port-zero": (one_rule("ports: [{protocol: tcp, port: 0}]\n"), None,
                  [("policy", 8, "port 0 is out of range (1-65535)")]),
    "port-65536": (one_rule("ports: [tcp/65536]\n"), None, [("policy", 8, "'tcp/65536': port out of range")]),
    "end-port-below-port": (one_rule("ports: [{protocol: udp, port: 2000, endPort: 1000}]\n"), None,
                            [("policy", 8, "endPort 1000 is below port 2000")]),
    "duplicate-rule-name": (
        one_rule() + "  - {name: web-to-api, action: deny, from: [{entity: any}], to: [{entity: any}]}\n", None,
        [("policy", 8, "duplicate rule name 'web-to-api' (first at line 4)")]),
    "bad-api-version": ("apiVersion: zt-dataplane/v9\nrules: []\n", None,
                        [("policy", 1, "apiVersion 'zt-dataplane/v9' is not supported")]),
    "unknown-action": (one_rule(action="permit"), None, [("policy", 5, "action 'permit' is not one of")]),
    "unknown-protocol": (one_rule("ports: [{protocol: gre}]\n"), None, [("policy", 8, "protocol 'gre' is not one of")]),
    "unknown-peer-kind": (one_rule(src="[{pod: {app: web}}]"), None, [("policy", 6, "unknown peer kind 'pod'")]),
    "bad-time": (one_rule("valid: {notBefore: yesterday}\n"), None,
                 [("policy", 8, "'yesterday' is not an RFC 3339 time")]),
    "not-after-before-not-before": (
        one_rule("valid:\n  notBefore: 2026-02-01T00:00:00Z\n  notAfter: 2026-01-01T00:00:00Z\n"), None,
        [("policy", 10, "notAfter must be after notBefore")]),
    "duplicate-endpoint": (one_rule(), GOOD_INVENTORY + "  - {name: api-1, host: h1, address: 10.0.1.9}\n",
                           [("inventory", 9, "duplicate endpoint name 'api-1' (first at line 8)")]),
    "endpoint-unknown-host": (one_rule(), GOOD_INVENTORY + "  - {name: db-1, host: h3, address: 10.0.3.1}\n",
                              [("inventory", 9, "endpoint host 'h3' is not in hosts")]),
    "address-claimed-twice": (one_rule(), GOOD_INVENTORY + "  - {name: api-2, host: h2, address: 10.0.2.1}\n",
                              [("inventory", 9, "endpoint api-2 already belongs to endpoint api-1")]),
    "yaml-syntax": (one_rule().replace("    action: allow\n", "    action: allow: now\n"), None,
                    [("policy", 5, "not valid YAML or JSON")]),
    "yaml-syntax-in-inventory": (one_rule(), GOOD_INVENTORY.replace("  - {name: h2,", "  - {name: h2,,"),
                                 [("inventory", 5, "not valid YAML or JSON")]),
    "empty-policy": ("", None, [("policy", 1, "the file is empty")]),
    "empty-inventory": (one_rule(), "", [("inventory", 1, "the file is empty")]),
    "json-syntax": (JSON_SYNTAX_ERROR, None, [("policy", 4, "not valid YAML or JSON")]),
    "json-value": (JSON_VALUE_ERROR, None, [("policy", 5, "'tcp/99999': port out of range")]),
    "control-character": (one_rule("description: \"bell \x07 here\"\n"), None,
                          [("policy", 8, "not valid YAML or JSON")]),
    "not-utf-8": (one_rule().encode() + b"    description: caf\xe9\n", None, [("policy", 8, "UTF-8")]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_validate_reports_located_errors(case, tmp_path):
    policy, inventory, expected = CLI_CASES[case]
    files = {"policy": tmp_path / "policy.yaml", "inventory": tmp_path / "inventory.yaml"}
    if isinstance(policy, bytes):
        files["policy"].write_bytes(policy)
    else:
        files["policy"].write_text(policy)
    args = ["policy", "validate", files["policy"]]
    if inventory is not None:
        files["inventory"].write_text(inventory)
        args += ["-i", files["inventory"]]
    out = run_cli(*args, state_dir=tmp_path / "state")
    assert out.returncode != 0, f"exit 0 for a bad input; stdout: {out.stdout!r}"
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stdout == "", out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == len(expected), f"expected {len(expected)} error line(s):\n{out.stderr}"
    for line, (which, lineno, words) in zip(lines, expected):
        prefix = f"dataplane: error: {files[which]}:{lineno}: "
        assert line.startswith(prefix), f"{line!r} does not start with {prefix!r}"
        assert words in line, f"{words!r} not in {line!r}"
    assert not (tmp_path / "state").exists(), "validate wrote to the workspace"


UNMATCHED = one_rule("ports: [tcp/8080]\n", dst="[{workload: {app: api}}, {workload: {app: nothing}}]")


def test_a_selector_matching_nothing_is_a_located_warning(tmp_path):
    (tmp_path / "policy.yaml").write_text(UNMATCHED)
    (tmp_path / "inventory.yaml").write_text(GOOD_INVENTORY)
    out = run_cli("policy", "validate", tmp_path / "policy.yaml", "-i", tmp_path / "inventory.yaml",
                  state_dir=tmp_path / "state")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [
        f"warning: {tmp_path / 'policy.yaml'}:7: rule 'web-to-api': workload {{app eq nothing}} matches no identity"]
    assert out.stdout == f"{tmp_path / 'policy.yaml'}: valid: 1 rules, 0 tests, 1 warnings\n"


def test_a_selector_matching_nothing_is_a_warning_without_an_inventory_too(tmp_path):
    (tmp_path / "policy.yaml").write_text(UNMATCHED)
    out = run_cli("policy", "validate", tmp_path / "policy.yaml", state_dir=tmp_path / "state")
    assert out.returncode == 0, out.stderr
    warnings = out.stderr.splitlines()
    assert len(warnings) == 3 and all(w.startswith(f"warning: {tmp_path / 'policy.yaml'}:") for w in warnings), \
        warnings


FAILING_TEST = one_rule("ports: [tcp/8080]\n") + """\
tests:
  - {from: {workload: web-1}, to: {workload: api-1}, port: tcp/8080, expect: allow}
  - name: api may call web
    from: {workload: api-1}
    to: {workload: web-1}
    port: tcp/80
    expect: allow
"""


def test_a_failing_test_fails_validate(tmp_path):
    (tmp_path / "policy.yaml").write_text(FAILING_TEST)
    (tmp_path / "inventory.yaml").write_text(GOOD_INVENTORY)
    out = run_cli("policy", "validate", tmp_path / "policy.yaml", "-i", tmp_path / "inventory.yaml",
                  state_dir=tmp_path / "state")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"dataplane: error: {tmp_path / 'policy.yaml'}:11: api may call web: "
                               f"expected allow, got deny"), lines[0]


def test_a_failing_test_fails_policy_test(tmp_path):
    (tmp_path / "policy.yaml").write_text(FAILING_TEST)
    (tmp_path / "inventory.yaml").write_text(GOOD_INVENTORY)
    out = run_cli("policy", "test", tmp_path / "policy.yaml", "-i", tmp_path / "inventory.yaml",
                  state_dir=tmp_path / "state")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "ok    workload:web-1 -> workload:api-1 tcp/8080 is allow", out.stdout
    assert lines[1].startswith(f"FAIL  {tmp_path / 'policy.yaml'}:11: api may call web: expected allow, got deny"), \
        out.stdout
    assert lines[-1] == "1 passed, 1 failed"


def test_passing_tests_pass(tmp_path):
    """The control for the two tests above: fix the expectation and both
    commands succeed."""
    (tmp_path / "policy.yaml").write_text(FAILING_TEST.replace("    expect: allow\n", "    expect: deny\n"))
    (tmp_path / "inventory.yaml").write_text(GOOD_INVENTORY)
    for verb in ("validate", "test"):
        out = run_cli("policy", verb, tmp_path / "policy.yaml", "-i", tmp_path / "inventory.yaml",
                      state_dir=tmp_path / "state")
        assert out.returncode == 0, (verb, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
