"""The agent's own gRPC server on a local unix socket: Agent.Status,
Agent.GetFlows, grpc.health.v1 and server reflection (so grpcurl works
against it)."""

from __future__ import annotations

import os
from concurrent import futures
from pathlib import Path

import grpc

from dataplane.v1 import agent_pb2, agent_pb2_grpc


# Following clients each hold a server thread: bounded well below the pool,
# so Status and health calls always find one.
MAX_FLOW_FOLLOWERS = 16


class _Servicer(agent_pb2_grpc.AgentServicer):
    def __init__(self, status_fn, instance: str, hub=None):
        self.status_fn = status_fn
        self.instance = instance
        self.hub = hub

    def GetFlows(self, request, context):
        from dataplane.flows import FilterError, stream_flows

        if self.hub is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this agent keeps no flows (no datapath)")
        if request.follow and self.hub.clients >= MAX_FLOW_FOLLOWERS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{MAX_FLOW_FOLLOWERS} flow clients are following already; try again later")
        try:
            return stream_flows(self.hub, request, context)
        except FilterError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def Status(self, request, context):
        s = self.status_fn()
        return agent_pb2.AgentStatus(instance=self.instance, **{k: v for k, v in s.items()
                                                              if k in agent_pb2.AgentStatus.DESCRIPTOR.fields_by_name})


def socket_path(instance: str, run_dir: str = "/run/dataplane") -> str:
    return os.path.join(run_dir, instance, "agent.sock")


def serve_status(instance: str, status_fn, path: str | None = None, hub=None) -> grpc.Server:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    path = path or socket_path(instance)
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.path.exists(path):
        os.unlink(path)
    # A following flow client holds a thread for as long as it follows.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), maximum_concurrent_rpcs=64)
    agent_pb2_grpc.add_AgentServicer_to_server(_Servicer(status_fn, instance, hub), server)
    h = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    names = [agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    h.set("", health_pb2.HealthCheckResponse.SERVING)
    h.set(names[0], health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    os.chmod(path, 0o600)   # root only: the socket tells what a host enforces
    return server
