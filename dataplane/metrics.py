"""Prometheus metrics of the agent and the controller (docs/metrics.md).

The datapath's counters are read from the BPF maps at scrape time by custom
collectors: nothing is copied or incremented in Python, so a scrape shows
exactly what the kernel counted. Every name starts with `dataplane_`,
counters end in `_total`, units are base units, and no label takes an
unbounded value (no addresses, no ports): rules, reasons, directions, maps
and hosts are bounded by the policy, the code and the fleet.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from loader import abi

log = logging.getLogger("dataplane.metrics")

PREFIX = "dataplane"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("zt-dataplane")
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()
DIRECTIONS = (abi.Direction.INGRESS, abi.Direction.EGRESS)

# Map attribute -> metric label (the map's role, not its versioned pin name).
MAP_LABELS = {"ipcache": "ipcache", "plens": "prefix_lengths", "gen": "generation", "policy": "policy",
              "ranges": "port_ranges", "ct": "conntrack", "frag": "fragments", "config": "config",
              "rules": "rule_counters", "reasons": "reason_counters", "stats": "stats"}

STAT_METRICS = {
    abi.Stat.EVENTS_LOST: ("events_lost_total",
                           "Verdict events dropped because the ring buffer was full (the packets were not affected)"),
    abi.Stat.EVENTS_SAMPLED_OUT: ("events_sampled_out_total", "Allowed new flows not reported because of sampling"),
    abi.Stat.CT_CREATED: ("conntrack_created_total", "Conntrack entries created"),
    abi.Stat.CT_REJUDGED: ("conntrack_rejudged_total",
                           "Established flows judged again after a policy or identity change"),
    abi.Stat.CT_EXPIRED: ("conntrack_expired_total", "Conntrack entries found past their timeout"),
    abi.Stat.CT_INSERT_FAILED: ("conntrack_insert_failed_total",
                                "Allowed flows that could not be tracked (passed without state)"),
    abi.Stat.FRAG_TRACKED: ("fragments_tracked_total", "First fragments recorded for their later fragments"),
}


def _name(n: str) -> str:
    return f"{PREFIX}_{n}"


def _counter(name, doc, labels=()):
    # prometheus_client appends _total itself; pass the name without it.
    return CounterMetricFamily(_name(name.removesuffix("_total")), doc, labels=list(labels))


class DatapathCollector:
    """Agent metrics, read from the maps of one datapath at each scrape.

    names_fn() -> flows.Names of the state in force; agent_fn() -> dict with
    mode, connected (fleet), applied_at (Unix s), flows_received,
    flow_clients, flows_client_lost, flows_upload_lost (optional),
    conntrack_gc_deleted, conntrack_gc_errors."""

    def __init__(self, dp, names_fn, agent_fn, host: str):
        self.dp = dp
        self.names_fn = names_fn
        self.agent_fn = agent_fn
        self.host = host

    def describe(self):
        return []   # names are only known at collect time; no duplicate check needed

    def collect(self):
        t0 = time.monotonic()
        names = self.names_fn()
        agent = self.agent_fn()
        yield from self._rules(names)
        yield from self._reasons()
        yield from self._stats()
        yield from self._maps()
        yield from self._policy(names, agent)
        yield from self._agent(agent)
        g = GaugeMetricFamily(_name("metrics_read_duration_seconds"), "Time to read the datapath for this scrape")
        g.add_metric([], time.monotonic() - t0)
        yield g

    def _rules(self, names):
        packets = _counter("rule_packets_total", "Packets counted under the rule that decided their flow "
                           "(action audit: would have been denied)", ("rule", "action", "direction"))
        octets = _counter("rule_bytes_total", "Bytes counted under the rule that decided their flow",
                          ("rule", "action", "direction"))
        rules = self.dp.maps["rules"]
        for rule_id in sorted(set(names.rules) | {0}):
            if rule_id >= rules.max_entries:
                continue
            per_cpu = rules.lookup(rule_id)
            rule, action = names.rule(rule_id), names.action(rule_id) or "none"
            for d in DIRECTIONS:
                labels = [rule, action, d.name.lower()]
                packets.add_metric(labels, sum(c.dir[d].packets for c in per_cpu))
                octets.add_metric(labels, sum(c.dir[d].bytes for c in per_cpu))
        yield packets
        yield octets

    def _reasons(self):
        from dataplane.flows import reason_name

        counts = self.dp.reason_counters()
        dropped = _counter("dropped_packets_total", "Packets dropped, by reason", ("reason",))
        dropped_b = _counter("dropped_bytes_total", "Bytes dropped, by reason", ("reason",))
        passed = _counter("passed_packets_total", "Packets passed, by reason", ("reason",))
        passed_b = _counter("passed_bytes_total", "Bytes passed, by reason", ("reason",))
        for r in abi.Reason:
            if r == abi.Reason.NONE:
                continue
            pk, by = counts.get(r, (0, 0))
            if int(r) >= abi.REASON_FIRST_DROP:
                dropped.add_metric([reason_name(r)], pk)
                dropped_b.add_metric([reason_name(r)], by)
            else:
                passed.add_metric([reason_name(r)], pk)
                passed_b.add_metric([reason_name(r)], by)
        yield from (dropped, dropped_b, passed, passed_b)

    def _stats(self):
        stats = self.dp.stat_counters()
        for stat, (name, doc) in STAT_METRICS.items():
            c = _counter(name, doc)
            c.add_metric([], stats.get(stat, 0))
            yield c

    def _maps(self):
        entries = GaugeMetricFamily(_name("map_entries"), "Entries in a hash map of the datapath", labels=["map"])
        capacity = GaugeMetricFamily(_name("map_capacity"), "Capacity (max entries) of a map of the datapath",
                                     labels=["map"])
        ct = None
        for row, attr in zip(self.dp.map_summary(), _map_attrs()):
            if attr not in MAP_LABELS:      # the event ring: bytes, not entries
                continue
            label = MAP_LABELS[attr]
            capacity.add_metric([label], row["capacity"])
            if row["entries"] is not None:
                entries.add_metric([label], row["entries"])
                if attr == "ct":
                    ct = row["entries"]
        yield entries
        yield capacity
        g = GaugeMetricFamily(_name("conntrack_entries"), "Flows in the conntrack table")
        g.add_metric([], ct or 0)
        yield g

    def _policy(self, names, agent):
        from loader import tables

        g = GaugeMetricFamily(_name("policy_revision"),
                              "State revision in force (fleet: the controller's; standalone: applies so far)")
        g.add_metric([], names.revision)
        yield g
        g = GaugeMetricFamily(_name("policy_rules"), "Rules of the state in force")
        g.add_metric([], len(names.rules))
        yield g
        g = GaugeMetricFamily(_name("policy_audit_mode"), "1 when the policy in force is in audit mode")
        g.add_metric([], 1 if names.audit_default else 0)
        yield g
        g = GaugeMetricFamily(_name("policy_generation"), "Live policy generation (0 or 1)")
        g.add_metric([], tables.active_generation(self.dp))
        yield g
        g = GaugeMetricFamily(_name("policy_epoch"), "Conntrack epoch: bumped by every change that can revoke")
        g.add_metric([], self.dp.read_config().epoch)
        yield g
        if agent.get("applied_at"):
            g = GaugeMetricFamily(_name("policy_applied_timestamp_seconds"),
                                  "Unix time the state in force was applied")
            g.add_metric([], agent["applied_at"])
            yield g

    def _agent(self, agent):
        # datapath_instance, not instance: Prometheus owns the instance label (the target).
        info = InfoMetricFamily(_name("agent"), "The agent", labels=["host", "datapath_instance", "mode", "version",
                                                                      "identity_lookup"])
        info.add_metric([self.host, self.dp.instance, agent.get("mode", ""), VERSION,
                         getattr(getattr(self.dp, "options", None), "identity", "")], {})
        yield info
        if "connected" in agent:
            g = GaugeMetricFamily(_name("agent_controller_connected"), "1 while the agent's Sync stream is up")
            g.add_metric([], 1 if agent["connected"] else 0)
            yield g
        for key, name, doc in (
                ("flows_received", "flows_received_total", "Verdict events read from the ring buffer"),
                ("flows_client_lost", "flows_client_lost_total",
                 "Flows dropped for flow-stream clients that read too slowly"),
                ("flows_upload_lost", "flows_upload_lost_total",
                 "Flows not sent to the controller because the uplink was behind"),
                ("conntrack_gc_deleted", "conntrack_gc_deleted_total",
                 "Expired conntrack entries deleted by the agent's collector"),
                ("conntrack_gc_errors", "conntrack_gc_errors_total",
                 "Conntrack collection passes that failed (retried at the next interval)")):
            if key in agent:
                c = _counter(name, doc)
                c.add_metric([], agent[key])
                yield c
        if "flow_clients" in agent:
            g = GaugeMetricFamily(_name("flow_clients"), "Flow-stream clients following")
            g.add_metric([], agent["flow_clients"])
            yield g


def _map_attrs():
    from loader.instance import MAP_SPECS

    return [s.attr for s in MAP_SPECS]


class ControllerCollector:
    """Controller metrics from its live state; core is a controller.ControllerCore."""

    def __init__(self, core, flows_fn=None):
        self.core = core
        self.flows_fn = flows_fn or (lambda: {})

    def describe(self):
        return []

    def collect(self):
        core = self.core
        s = core.state
        streams = core.stream_statuses()
        g = GaugeMetricFamily(_name("controller_agents_connected"), "Agents with a Sync stream to this controller")
        g.add_metric([], len(streams))
        yield g
        lag = GaugeMetricFamily(_name("controller_agent_revision_lag"),
                                "State revisions an agent connected here is behind", labels=["host"])
        for host, applied in sorted(streams.items()):
            lag.add_metric([host], max(0, s.revision - applied))
        yield lag
        g = GaugeMetricFamily(_name("controller_hosts"), "Hosts declared in the inventory")
        g.add_metric([], len(s.inventory().hosts))
        yield g
        g = GaugeMetricFamily(_name("controller_sessions_active"), "User sessions open and not expired")
        g.add_metric([], core.active_sessions())
        yield g
        g = GaugeMetricFamily(_name("controller_state_revision"), "State revision (policy, inventory, sessions)")
        g.add_metric([], s.revision)
        yield g
        g = GaugeMetricFamily(_name("controller_policy_revision"), "Active policy revision")
        g.add_metric([], s.active_policy)
        yield g
        g = GaugeMetricFamily(_name("controller_leader"), "1 while this controller is the leader")
        g.add_metric([], 1 if core.leader else 0)
        yield g
        flows = self.flows_fn()
        if flows:
            c = _counter("controller_flows_received_total", "Flows received from agents")
            c.add_metric([], flows.get("received", 0))
            yield c
            c = _counter("controller_flows_client_lost_total", "Flows dropped for observers that read too slowly")
            c.add_metric([], flows.get("client_lost", 0))
            yield c
            c = _counter("controller_flows_agent_lost_total", "Flows agents reported they could not send")
            c.add_metric([], flows.get("agent_lost", 0))
            yield c
        info = InfoMetricFamily(_name("controller"), "The controller", labels=["name", "store", "version"])
        info.add_metric([core.name, core.store.name.split(":", 1)[0], VERSION], {})
        yield info


def api_latency_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(_name("controller_api_request_duration_seconds"), "Controller API calls, by method and code",
                     ["method", "code"], registry=registry,
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


def new_registry() -> CollectorRegistry:
    """A registry with the standard process_* and python_* collectors."""
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

    registry = CollectorRegistry()
    for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(c)
    return registry


class MetricsServer:
    """The /metrics HTTP endpoint for a registry."""

    def __init__(self, registry: CollectorRegistry, address: str):
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            port_n = int(port)
        except ValueError:
            from loader.errors import DataplaneError

            raise DataplaneError(f"--metrics {address!r}: want HOST:PORT") from None
        try:
            self._server, self._thread = start_http_server(port_n, addr=host, registry=registry)
        except OSError as e:
            from loader.errors import DataplaneError

            raise DataplaneError(f"--metrics {address}: cannot listen: {e.strerror}") from None
        self.port = self._server.server_port
        self.address = f"{host}:{self.port}"
        log.info("metrics on http://%s/metrics", self.address if ":" not in host else f"[{host}]:{self.port}")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


