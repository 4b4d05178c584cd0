"""The committed gRPC stubs are exactly what the .proto files generate."""

from scripts.gen_proto import ROOT, generate


def test_committed_stubs_match_the_protos(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for f in fresh:
        committed = ROOT / f.relative_to(tmp_path)
        assert committed.exists(), f"{committed.relative_to(ROOT)} is missing: run scripts/gen_proto.py"
        assert committed.read_bytes() == f.read_bytes(), \
            f"{committed.relative_to(ROOT)} differs from its .proto: run scripts/gen_proto.py and commit"


def test_the_services_are_there():
    from dataplane.v1 import agent_pb2_grpc, controller_pb2_grpc

    assert hasattr(controller_pb2_grpc, "ControllerServicer")
    assert hasattr(controller_pb2_grpc, "AgentSyncServicer")
    assert hasattr(agent_pb2_grpc, "AgentServicer")
