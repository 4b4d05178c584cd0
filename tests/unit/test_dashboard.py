"""The Grafana dashboard and docs/metrics.md agree with the metrics the code
can produce (no kernel: the names are read from dataplane/metrics.py's
source). A real scrape is compared against the docs elsewhere (netns tier)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dataplane.flows import FIELDS, reason_name
from loader import abi

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "dataplane.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
METRICS_PY = ROOT / "dataplane" / "metrics.py"

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_IN_EXPR = re.compile(r"\bdataplane_[A-Za-z0-9_]*[A-Za-z0-9]")
DOC_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*([^|]*?)\s*\|")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))      # panels nested in a collapsed row
    return out


def documented_metrics() -> dict[str, str]:
    """{metric name: type} from the tables of docs/metrics.md: rows whose
    first cell is a backticked dataplane_ name; the second cell is the type."""
    out = {}
    for line in METRICS_DOC.read_text().splitlines():
        m = DOC_ROW.match(line)
        if m and m.group(1).startswith("dataplane_"):
            name, kind = m.group(1), m.group(2).strip()
            assert name not in out, f"{name} documented twice in {METRICS_DOC.name}"
            out[name] = kind
    return out


def code_metrics() -> dict[str, str]:
    """{metric name as exposed: type}, read from dataplane/metrics.py's source."""
    src = METRICS_PY.read_text()
    prefix = re.search(r'^PREFIX\s*=\s*"([a-z_]+)"', src, re.MULTILINE).group(1)
    out: dict[str, str] = {}

    def add(name: str, kind: str) -> None:
        full = f"{prefix}_{name}"
        assert out.get(full, kind) == kind, f"{full} is both {out[full]} and {kind}"
        out[full] = kind

    # Counters built by _counter("NAME", ...): prometheus_client exposes NAME_total.
    for name in re.findall(r'_counter\(\s*"([a-z0-9_]+)"', src):
        add(name if name.endswith("_total") else f"{name}_total", "counter")
    # Counters whose name comes from a table: STAT_METRICS entries, and the
    # (key, "NAME_total", doc) tuples the agent's loop passes to _counter(name, ...).
    # Every string literal ending in _total is one of those.
    for name in re.findall(r'"([a-z][a-z0-9_]*_total)"', src):
        add(name, "counter")
    stat_block = re.search(r"^STAT_METRICS\s*=\s*\{(.*?)^\}", src, re.MULTILINE | re.DOTALL).group(1)
    stat_names = re.findall(r'\(\s*"([a-z0-9_]+)"', stat_block)
    assert stat_names, "no STAT_METRICS entries found"
    for name in stat_names:
        add(name if name.endswith("_total") else f"{name}_total", "counter")
    for name in re.findall(r'GaugeMetricFamily\(\s*_name\(\s*"([a-z0-9_]+)"\s*\)', src):
        add(name, "gauge")
    for name in re.findall(r'InfoMetricFamily\(\s*_name\(\s*"([a-z0-9_]+)"\s*\)', src):
        add(f"{name}_info", "info")
    for name in re.findall(r'\bHistogram\(\s*_name\(\s*"([a-z0-9_]+)"\s*\)', src):
        add(name, "histogram")
    return out


def _expr_metrics(expr: str) -> set[str]:
    return set(METRIC_IN_EXPR.findall(expr))


# --- the dashboard ------------------------------------------------------------------

def test_dashboard_is_grafana_json(dashboard):
    assert dashboard["schemaVersion"] == 39
    assert dashboard["title"] and dashboard["uid"]
    assert any(i["name"] == "DS_PROMETHEUS" and i["pluginId"] == "prometheus"
               for i in dashboard.get("__inputs", []))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    host = variables["host"]
    query = host["query"]["query"] if isinstance(host["query"], dict) else host["query"]
    assert query == "label_values(dataplane_agent_info, host)"


def test_every_panel_has_title_layout_and_queries(dashboard):
    panels = _panels(dashboard)
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p.get("title"), p
        pos = p.get("gridPos")
        assert pos and {"x", "y", "w", "h"} <= set(pos), f"{p['title']}: no gridPos"
        assert 0 <= pos["x"] and pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        targets = p.get("targets") or []
        assert any(t.get("expr", "").strip() for t in targets), f"{p['title']}: no query"
        for t in targets:
            assert t.get("expr", "").strip(), f"{p['title']}: target {t.get('refId')} has an empty expr"
            assert t.get("refId"), p["title"]
        for ds in [p.get("datasource")] + [t.get("datasource") for t in targets]:
            if ds is not None:
                assert ds["uid"] == "${DS_PROMETHEUS}", p["title"]


def test_panels_do_not_overlap(dashboard):
    cells = {}
    for p in _panels(dashboard):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_dashboard_covers_the_main_views(dashboard):
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    for wanted in ("dataplane_rule_packets_total", "dataplane_dropped_packets_total", 'action="audit"',
                   "dataplane_passed_packets_total", "dataplane_map_entries", "dataplane_map_capacity",
                   "dataplane_conntrack_entries", "dataplane_events_lost_total", "dataplane_policy_revision",
                   "dataplane_controller_agents_connected", "dataplane_controller_agent_revision_lag",
                   "dataplane_controller_sessions_active", "histogram_quantile(0.5", "histogram_quantile(0.99",
                   "dataplane_controller_api_request_duration_seconds_bucket"):
        assert wanted in exprs, wanted


def test_every_metric_the_dashboard_queries_is_documented(dashboard):
    documented = documented_metrics()
    for p in _panels(dashboard):
        for t in p["targets"]:
            for name in _expr_metrics(t["expr"]):
                if name in documented:
                    continue
                base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
                assert base is not None and documented.get(base) == "histogram", \
                    f"panel {p['title']!r} queries {name}, which docs/metrics.md does not document"


# --- the docs against the code -------------------------------------------------------

def test_code_metric_names_are_found():
    """Guards the source parsing below: it must see every kind of metric."""
    code = code_metrics()
    assert {"dataplane_rule_packets_total", "dataplane_events_lost_total", "dataplane_flows_received_total",
            "dataplane_map_entries", "dataplane_agent_info", "dataplane_controller_info",
            "dataplane_controller_api_request_duration_seconds"} <= set(code)
    assert all(n.startswith("dataplane_") for n in code)
    assert all(n.endswith("_total") for n, kind in code.items() if kind == "counter")
    assert not any(n.endswith("_total") for n, kind in code.items() if kind != "counter")


def test_documented_metrics_are_exactly_those_the_code_produces():
    documented = documented_metrics()
    code = code_metrics()
    missing = sorted(set(code) - set(documented))
    unknown = sorted(set(documented) - set(code))
    assert not missing, f"metrics the code produces but docs/metrics.md does not document: {missing}"
    assert not unknown, f"metrics docs/metrics.md documents but the code does not produce: {unknown}"
    wrong = {n: (documented[n], code[n]) for n in code if documented[n] != code[n]}
    assert not wrong, f"documented type differs from the code's (doc, code): {wrong}"


def test_every_reason_label_value_is_documented():
    text = METRICS_DOC.read_text()
    rows = {m.group(1) for m in re.finditer(r"^\|\s*([a-z0-9_]+)\s*\|\s*(?:passed|dropped)\s*\|", text, re.MULTILINE)}
    values = {reason_name(r) for r in abi.Reason if r != abi.Reason.NONE}
    assert values == rows, f"undocumented: {sorted(values - rows)}; unknown: {sorted(rows - values)}"


def test_every_filter_field_is_documented():
    text = METRICS_DOC.read_text()
    rows = {m.group(1) for m in re.finditer(r"^\|\s*([a-z][a-z-]*)\s*\|[^|]*\|[^|]*\|\s*$", text, re.MULTILINE)}
    assert set(FIELDS) <= rows, f"filter fields missing from docs/metrics.md: {sorted(set(FIELDS) - rows)}"
