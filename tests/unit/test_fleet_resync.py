"""A delta that does not fit the agent's last received state makes it
reconnect (resynchronise); it must then still say what its maps hold, so a
controller with the same state answers in_sync and nothing is applied
again (an apply would bump the epoch and re-judge every flow for nothing).

A stand-in controller on loopback speaks the real AgentSync protocol to a
datapath-less FleetAgent."""

from __future__ import annotations

import queue
import threading
from concurrent import futures

import grpc

from dataplane.fleet import HostView
from dataplane.fleet_agent import FleetAgent, FleetOptions
from dataplane.v1 import controller_pb2 as pb
from dataplane.v1 import controller_pb2_grpc as pb_grpc
from dataplane.v1 import state_pb2

S1 = HostView(1, "h1", {"10.0.0.1/32": (300, "")}, frozenset(), False, {}, {300: "app=web"}, [300])


class Controller(pb_grpc.AgentSyncServicer):
    def __init__(self):
        self.hellos: queue.Queue = queue.Queue()
        self.applied: queue.Queue = queue.Queue()
        self.sessions = 0

    def Sync(self, request_iterator, context):
        self.sessions += 1
        session = self.sessions
        hello = next(request_iterator).hello
        self.hellos.put(hello)

        def read():
            try:
                for m in request_iterator:
                    if m.WhichOneof("msg") == "applied":
                        self.applied.put((session, m.applied))
            except grpc.RpcError:
                pass                # the stream ended
        threading.Thread(target=read, daemon=True).start()
        if session == 1:
            yield pb.ControllerMessage(snapshot=S1.to_msg())
            self.applied.get(timeout=10)
            # A delta from a revision the agent never received: it cannot fit.
            yield pb.ControllerMessage(delta=state_pb2.HostDelta(from_revision=7, revision=8, digest=S1.digest()))
            context.abort(grpc.StatusCode.CANCELLED, "stream over")  # the agent ends it anyway
        elif hello.digest == S1.digest():
            yield pb.ControllerMessage(in_sync=pb.InSync(revision=2))
            self.applied.get(timeout=10)
        else:
            yield pb.ControllerMessage(snapshot=S1.to_msg())
            self.applied.get(timeout=10)


def test_resync_keeps_what_the_maps_hold(tmp_path):
    ctl = Controller()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AgentSyncServicer_to_server(ctl, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    agent = FleetAgent(None, FleetOptions(controllers=[f"127.0.0.1:{port}"], host="h1",
                                          state_dir=str(tmp_path)))
    applies = []
    agent.on_applied = lambda view, ms: applies.append(view.revision)
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        first = ctl.hellos.get(timeout=10)
        assert (first.revision, first.digest) == (0, "")
        second = ctl.hellos.get(timeout=10)          # after the delta that did not fit
        assert (second.revision, second.digest) == (1, S1.digest()), second
        session, ack = ctl.applied.get(timeout=10)
        assert (session, ack.revision, ack.error) == (2, 2, "")
        assert applies == [1], "the resynchronised agent applied the same state again"
        assert agent.view is not None and agent.view.revision == 2
    finally:
        agent.stop()
        server.stop(0)
        t.join(timeout=10)
