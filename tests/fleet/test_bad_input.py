"""Operator and environment mistakes against the controller: each is
refused with one clear line (or a precise gRPC status) and changes nothing.
A malformed policy names its lines and creates no revision; an agent for a
host the inventory does not declare is refused with NOT_FOUND; a push based
on a stale revision is ABORTED; an agent claiming a revision the controller
never made is refused with FAILED_PRECONDITION; a controller whose etcd
cannot be reached exits at once with one line, and one whose etcd goes away
refuses writes while it keeps serving reads."""

from __future__ import annotations

import logging
import re
import signal
import threading

import grpc
import pytest

from dataplane import certs
from dataplane.fleet_agent import FleetAgent, FleetOptions
from dataplane.lab import wait_for
from dataplane.v1 import controller_pb2 as pb
from tests.fleet.helpers import (Admin, Controller, Etcd, SyncCall, channel, dataplane, free_port, one_line_error,
                                 read_pem, sync_refusal)

INVENTORY = """\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {name: h1}
  - {name: h2}
endpoints:
  - {name: web-1, host: h1, address: 10.233.0.10, labels: {app: web}}
"""
POLICY = """\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: staff-to-web
    action: allow
    from: [{{user: {{group: staff}}}}]
    to: [{{workload: {{app: web}}}}]
    ports: [tcp/{port}]
"""

# Malformed policies and the lines the error must name.
MALFORMED = {
    "yaml-syntax": ("""\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: web
    action: allow
    from: [{user: {group: staff}}]
    to: [{workload: {app: web}}
    ports: [tcp/443]
""", [8]),
    "port-out-of-range": ("""\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: web
    action: allow
    from: [{user: {group: staff}}]
    to: [{workload: {app: web}}]
    ports: [tcp/70000]
""", [8]),
    "unknown-action": ("""\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: web
    action: maybe
    from: [{user: {group: staff}}]
    to: [{workload: {app: web}}]
""", [5]),
    "duplicate-rule-and-unknown-field": ("""\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: web
    action: allow
    from: [{user: {group: staff}}]
    to: [{workload: {app: web}}]
    ports: [tcp/443]
  - name: web
    action: allow
    from: [{user: {group: staff}}]
    to: [{workload: {app: web}}]
    ports: [tcp/444]
    colour: blue
""", [9, 14]),
}


@pytest.fixture(scope="module")
def state(workdir, admin):
    """The inventory and two policy revisions (the second active)."""
    (workdir / "inventory.yaml").write_text(INVENTORY)
    admin.ok("inventory", "push", workdir / "inventory.yaml")
    for port in (443, 8443):
        (workdir / f"policy-{port}.yaml").write_text(POLICY.format(port=port))
        admin.push_policy(workdir / f"policy-{port}.yaml")
    return workdir


def snapshot(admin: Admin) -> tuple:
    s = admin.status()
    return admin.revisions(), s["revision"], sorted(s["agents"]), admin.json("fleet", "endpoints")


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_policy_refused_with_its_lines(state, admin, case):
    text, lines = MALFORMED[case]
    path = state / f"bad-{case}.yaml"
    path.write_text(text)
    before = snapshot(admin)
    line = one_line_error(admin.run("policy", "push", path))
    assert "ApplyPolicy: INVALID_ARGUMENT: " in line, line
    assert sorted(int(n) for n in re.findall(r"\bpolicy:(\d+):", line)) == lines, line
    assert snapshot(admin) == before


def test_unknown_host_refused(state, controller, pki, admin, caplog):
    before = snapshot(admin)
    ca = (pki / "ca.pem").read_bytes()
    # A valid agent certificate for a host the inventory does not declare.
    with channel(controller.address, ca, *read_pem(pki, "agent-ghost")) as ch:
        e = sync_refusal(ch, pb.Hello(host="ghost", addresses=["10.233.0.99"],
                                      endpoints=[pb.Endpoint(name="ghost-1", addresses=["10.233.0.98"])]))
    assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
    assert e.details() == "unknown host 'ghost': declare it in the inventory first", e.details()

    # The agent logs the refusal as an error (its stream logic runs here without a datapath).
    caplog.set_level(logging.INFO, logger="dataplane.agent")
    agent = FleetAgent(None, FleetOptions(controllers=[controller.address], host="ghost",
                                          tls=certs.Credentials(pki, "agent-ghost"),
                                          state_dir=str(state / "ghost-state")))

    def refused():
        return [r for r in caplog.records if "NOT_FOUND" in r.getMessage()]

    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        assert wait_for(refused, timeout=30), [r.getMessage() for r in caplog.records]
    finally:
        agent.stop()
        runner.join(timeout=30)
    assert not runner.is_alive()
    message = refused()[0]
    assert message.levelno == logging.ERROR
    assert "unknown host 'ghost'" in message.getMessage() and "inventory" in message.getMessage()
    assert snapshot(admin) == before
    assert "ghost" not in admin.status()["agents"]


def test_stale_revision_refused(state, admin):
    before = snapshot(admin)
    revs = before[0]
    active = next(r["revision"] for r in revs if r["active"])
    stale = next(r["revision"] for r in revs if not r["active"])
    path = state / "policy-9443.yaml"
    path.write_text(POLICY.format(port=9443))

    line = one_line_error(admin.run("policy", "push", path, "--expect-revision", stale))
    assert "ABORTED" in line and "stale revision" in line, line
    assert f"policy revision {active} is active, not {stale}" in line, line
    assert snapshot(admin) == before

    # Based on the active revision, the same push goes through.
    assert admin.push_policy(path, "--expect-revision", active) == max(r["revision"] for r in revs) + 1


def test_agent_claiming_a_newer_revision_refused(state, controller, pki, admin):
    before = snapshot(admin)
    current = before[1]
    with channel(controller.address, (pki / "ca.pem").read_bytes(), *read_pem(pki, "agent-h1")) as ch:
        e = sync_refusal(ch, pb.Hello(host="h1", revision=current + 5, digest="0" * 32,
                                      addresses=["10.233.0.1"]))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.code(), e.details())
        assert f"revision {current + 5}" in e.details() and "newer" in e.details(), e.details()
        # Claiming the controller's own revision, the same host is served.
        call = SyncCall(ch, pb.Hello(host="h1", revision=current, addresses=["10.233.0.1"]))
        try:
            assert call.first().WhichOneof("msg") == "snapshot"
        finally:
            call.close()
    assert snapshot(admin)[0] == before[0]


def test_etcd_unreachable_at_start(workdir, pki):
    port = free_port()       # nothing listens there
    out = dataplane("controller", "--listen", "127.0.0.1:0", "--store", f"etcd://127.0.0.1:{port}",
                    "--tls-dir", pki, timeout=60)
    line = one_line_error(out)
    assert "etcd unreachable" in line and f"127.0.0.1:{port}" in line, line


def test_etcd_store_serves_and_refuses_writes_when_etcd_goes(registry, workdir, pki):
    etcd = Etcd(registry, workdir)
    ctl = Controller(registry, workdir, etcd.url, pki, name="etcd-ctl")
    try:
        ctl.start()
        admin = Admin(ctl.address, pki)
        assert wait_for(lambda: admin.status()["leader"], timeout=30), "the only controller never led"
        (workdir / "etcd-inventory.yaml").write_text(INVENTORY)
        admin.ok("inventory", "push", workdir / "etcd-inventory.yaml")
        (workdir / "etcd-policy.yaml").write_text(POLICY.format(port=443))
        assert admin.push_policy(workdir / "etcd-policy.yaml") == 1

        # A restarted controller finds the revision in etcd.
        assert ctl.stop() == 0
        ctl.start()
        assert [r["revision"] for r in admin.revisions()] == [1]

        # etcd goes away: writes are refused with one line, reads are served.
        etcd.stop()
        assert wait_for(lambda: admin.run("policy", "push", workdir / "etcd-policy.yaml").returncode != 0,
                        timeout=30)
        line = one_line_error(admin.run("policy", "push", workdir / "etcd-policy.yaml"))
        assert "UNAVAILABLE" in line, line
        assert [r["revision"] for r in admin.revisions()] == [1]
        assert ctl.proc.running()
    finally:
        ctl.stop(signal.SIGTERM)
        etcd.stop()
    assert "Traceback" not in ctl.proc.text(), ctl.proc.describe()
