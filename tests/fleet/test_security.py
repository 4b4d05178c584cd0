"""Who may talk to the controller and to an agent, and what they may do:
mutual TLS refuses clients without a certificate, with one from another CA
or with an expired one; certificate roles keep agents out of the admin API
and admins out of agent streams; an agent certificate speaks only for its
own host. Health and reflection answer. The agent's local socket and the
datapath's pins are root's alone."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dataplane import certs
from dataplane.lab import wait_for
from dataplane.v1 import controller_pb2 as pb
from loader.instance import PIN_ROOT
from tests.fleet.helpers import (SYNC_TIMEOUT, AgentProcess, SyncCall, call_refusal, channel, controller_stub,
                                 instance_name, new_lab, read_pem, remove_instance, sync_refusal)

INVENTORY = """\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {name: h1}
  - {name: h2}
endpoints:
  - {name: web-1, host: h1, address: 10.232.0.10, labels: {app: web}}
"""
POLICY = """\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: staff-to-web
    action: allow
    from: [{user: {group: staff}}]
    to: [{workload: {app: web}}]
    ports: [tcp/443]
"""
HOSTILE_POLICY = POLICY.replace("tcp/443", "any")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"]


@pytest.fixture(scope="module")
def setup(registry, workdir, pki, controller, admin):
    """Inventory, policy and a session on the controller; an agent for h1
    (its own datapath, attached in a namespace) connected to it."""
    (workdir / "inventory.yaml").write_text(INVENTORY)
    admin.ok("inventory", "push", workdir / "inventory.yaml")
    (workdir / "policy.yaml").write_text(POLICY)
    admin.push_policy(workdir / "policy.yaml")
    admin.ok("session", "open", "--user", "bob", "--group", "staff", "--address", "10.232.0.50", "--id", "bob-1")
    lab = new_lab(registry)
    agent = None
    try:
        a, b = lab.ns("a"), lab.ns("b")
        _, ifname = lab.link(a, b, ["10.232.0.50/24"], ["10.232.0.10/24"])
        agent = AgentProcess(registry, workdir, "h1", controller.address, pki, ifname, b,
                             instance_name("sec")).start()
        agent.wait_started()
        admin.wait_in_sync(["h1"])
        yield agent
    finally:
        if agent:
            agent.stop()
            remove_instance(agent.instance)
        lab.close()


def admin_channel(controller, pki) -> grpc.Channel:
    ca = (pki / "ca.pem").read_bytes()
    return channel(controller.address, ca, *read_pem(pki, "admin-ops"))


def controller_state(controller, pki) -> tuple:
    """Everything a refused call must not have changed."""
    with admin_channel(controller, pki) as ch:
        stub = controller_stub(ch)
        revs = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=15).revisions
        sessions = stub.ListSessions(pb.ListSessionsRequest(), timeout=15).sessions
        status = stub.FleetStatus(pb.FleetStatusRequest(), timeout=15)
        endpoints = stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=15).endpoints
    return ([(r.number, r.active, r.digest) for r in revs],
            [(s.id, tuple(s.addresses), tuple(sorted(s.device.items()))) for s in sessions],
            status.revision, status.policy_revision, sorted(a.host for a in status.agents),
            sorted((e.name, e.host, tuple(e.addresses)) for e in endpoints))


def attempts(ch: grpc.Channel, host: str) -> list[grpc.RpcError]:
    """An admin write, an admin read and an agent stream over one channel,
    each expected to be refused."""
    stub = controller_stub(ch)
    return [call_refusal(stub.ApplyPolicy, pb.ApplyPolicyRequest(text=HOSTILE_POLICY, comment="hostile")),
            call_refusal(stub.ListPolicies, pb.ListPoliciesRequest()),
            sync_refusal(ch, pb.Hello(host=host))]


def assert_handshake_refused(errors: list[grpc.RpcError]) -> None:
    for e in errors:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())


def test_no_client_certificate_refused(setup, controller, pki):
    before = controller_state(controller, pki)
    with channel(controller.address, (pki / "ca.pem").read_bytes()) as ch:
        assert_handshake_refused(attempts(ch, "h2"))
    assert controller_state(controller, pki) == before


def test_certificate_from_another_ca_refused(setup, controller, pki):
    before = controller_state(controller, pki)
    other = certs.Authority.create()
    ca = (pki / "ca.pem").read_bytes()
    for cn, role in (("ops", "admin"), ("h2", "agent")):
        with channel(controller.address, ca, *other.issue(cn, role)) as ch:
            assert_handshake_refused(attempts(ch, "h2"))
    assert controller_state(controller, pki) == before


def test_expired_certificate_refused(setup, controller, pki):
    before = controller_state(controller, pki)
    ca = certs.Authority.load(pki)
    now = dt.datetime.now(dt.timezone.utc)
    for cn, role in (("ops", "admin"), ("h2", "agent")):
        cert, key = ca.issue(cn, role, not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1))
        with channel(controller.address, (pki / "ca.pem").read_bytes(), cert, key) as ch:
            assert_handshake_refused(attempts(ch, "h2"))
    # The same CA's valid certificate for the same name is accepted: the expiry is what refused it.
    cert, key = ca.issue("ops", "admin")
    with channel(controller.address, (pki / "ca.pem").read_bytes(), cert, key) as ch:
        assert controller_stub(ch).ListPolicies(pb.ListPoliciesRequest(), timeout=15).revisions
    assert controller_state(controller, pki) == before


def test_agent_certificate_cannot_administer(setup, controller, pki):
    before = controller_state(controller, pki)
    with channel(controller.address, (pki / "ca.pem").read_bytes(), *read_pem(pki, "agent-h2")) as ch:
        stub = controller_stub(ch)
        calls = [
            (stub.ApplyPolicy, pb.ApplyPolicyRequest(text=HOSTILE_POLICY, comment="from an agent")),
            (stub.RollbackPolicy, pb.RollbackRequest(number=1)),
            (stub.ApplyInventory, pb.ApplyInventoryRequest(text=INVENTORY.replace("h2", "h3"))),
            (stub.OpenSession, pb.OpenSessionRequest(session=pb.Session(
                user="mallory", groups=["staff"], addresses=["10.232.0.66"]))),
            (stub.UpdatePosture, pb.UpdatePostureRequest(id="bob-1", device={"managed": "true"})),
            (stub.RevokeSession, pb.RevokeSessionRequest(id="bob-1")),
            (stub.ListSessions, pb.ListSessionsRequest()),
            (stub.FleetStatus, pb.FleetStatusRequest()),
        ]
        for fn, request in calls:
            e = call_refusal(fn, request)
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, (type(request).__name__, e.code(), e.details())
            assert "admin certificate" in e.details() and "agent" in e.details(), e.details()
    after = controller_state(controller, pki)
    assert after == before
    assert ("bob-1", ("10.232.0.50",), ()) in after[1]


def test_agent_certificate_speaks_for_its_own_host_only(setup, controller, pki):
    before = controller_state(controller, pki)
    ca = (pki / "ca.pem").read_bytes()
    with channel(controller.address, ca, *read_pem(pki, "agent-h1")) as ch:
        e = sync_refusal(ch, pb.Hello(host="h2", addresses=["10.232.0.99"],
                                      endpoints=[pb.Endpoint(name="evil", addresses=["10.232.0.98"])]))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED, (e.code(), e.details())
    assert "'h1'" in e.details() and "'h2'" in e.details(), e.details()
    assert controller_state(controller, pki) == before

    # h2's own certificate opens h2's stream: the snapshot of h2's state.
    with channel(controller.address, ca, *read_pem(pki, "agent-h2")) as ch:
        call = SyncCall(ch, pb.Hello(host="h2"))
        try:
            first = call.first()
        finally:
            call.close()
    assert first.WhichOneof("msg") == "snapshot" and first.snapshot.host == "h2", first


def test_admin_certificate_cannot_open_agent_stream(setup, controller, pki):
    before = controller_state(controller, pki)
    with admin_channel(controller, pki) as ch:
        for host in ("h1", "h2", "ops"):
            e = sync_refusal(ch, pb.Hello(host=host))
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, (e.code(), e.details())
            assert "agent certificate" in e.details(), e.details()
    assert controller_state(controller, pki) == before


def test_health_and_reflection(setup, controller, pki):
    with admin_channel(controller, pki) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "dataplane.v1.Controller", "dataplane.v1.AgentSync"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=15)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, (service, r)
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=15)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"dataplane.v1.Controller", "dataplane.v1.AgentSync", "grpc.health.v1.Health"} <= names, names
    # Health without a client certificate is refused like everything else.
    with channel(controller.address, (pki / "ca.pem").read_bytes()) as ch:
        e = call_refusal(health_pb2_grpc.HealthStub(ch).Check, health_pb2.HealthCheckRequest())
        assert e.code() == grpc.StatusCode.UNAVAILABLE


def _as_nobody(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(NOBODY + [code, *args], capture_output=True, text=True, timeout=60)


def test_agent_local_socket_root_only_and_answers(setup, admin):
    agent = setup
    path = agent.socket_path
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, oct(st.st_mode)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) & 0o077 == 0

    assert wait_for(lambda: agent.local_status().connected, timeout=SYNC_TIMEOUT)
    s = agent.local_status()
    revision = admin.status()["revision"]
    assert (s.host, s.instance, s.mode) == ("h1", agent.instance, "fleet"), s
    assert s.revision == revision and s.digest and s.entries > 0 and s.prefixes > 0, s
    with grpc.insecure_channel(f"unix:{path}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "dataplane.v1.Agent"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=15)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, (service, r)

    # Another user cannot connect to it.
    out = _as_nobody("import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])", path)
    assert out.returncode != 0 and "PermissionError" in out.stderr, out.stderr


def test_datapath_pins_root_only(setup):
    pin_dir = os.path.join(PIN_ROOT, setup.instance)
    names = sorted(os.listdir(pin_dir))
    assert any(n.startswith("prog_") for n in names) and any(n.startswith("dp_") for n in names), names
    loose = []
    for name in names:
        st = os.stat(os.path.join(pin_dir, name))
        if stat.S_IMODE(st.st_mode) != 0o600 or st.st_uid != 0:
            loose.append(f"{name}: {oct(stat.S_IMODE(st.st_mode))} uid {st.st_uid}")
    assert not loose, "pins not root-only:\n" + "\n".join(loose)
    assert stat.S_IMODE(os.stat(pin_dir).st_mode) & 0o022 == 0
    out = _as_nobody("import sys; open(sys.argv[1], 'rb')", os.path.join(pin_dir, "prog_tc_egress"))
    assert out.returncode != 0 and "PermissionError" in out.stderr, out.stderr
