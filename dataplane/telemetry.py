"""What an agent runs beside applying state, in both modes: the flow
stream (an EventPump feeding a FlowHub, served by Agent.GetFlows and sent to
the controller in fleet mode), the Prometheus endpoint (DatapathCollector)
and the conntrack collector that deletes expired flows (loader/ctgc.py)."""

from __future__ import annotations

import logging

from dataplane.flows import EventPump, FlowHub
from dataplane.metrics import DatapathCollector, MetricsServer, new_registry
from loader.ctgc import ConntrackCollector

log = logging.getLogger("dataplane.agent")


class Telemetry:
    def __init__(self, dp, host: str, names_fn, agent_fn, metrics: str | None = None, history: int = 8192,
                 client_queue: int = 4096, ct_gc_interval: float = 10.0):
        self.hub = FlowHub(history=history, client_queue=client_queue)
        self.pump = EventPump(dp, self.hub, names_fn)
        self._agent_fn = agent_fn
        self.ct_gc = ConntrackCollector(dp, interval=ct_gc_interval)
        self.registry = new_registry()
        self.registry.register(DatapathCollector(dp, names_fn, self.agent_stats, host))
        self.metrics = MetricsServer(self.registry, metrics) if metrics else None

    def agent_stats(self) -> dict:
        return {**self._agent_fn(), "flows_received": self.pump.received, "flows_client_lost": self.hub.client_lost,
                "flow_clients": self.hub.clients, "conntrack_gc_deleted": self.ct_gc.deleted,
                "conntrack_gc_errors": self.ct_gc.errors}

    def start(self) -> "Telemetry":
        self.pump.start()
        self.ct_gc.start()
        return self

    def stop(self) -> None:
        self.pump.stop()
        self.ct_gc.stop()
        if self.metrics:
            self.metrics.stop()
