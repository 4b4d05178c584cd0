"""fleet tier fixtures: a temporary work directory, a PKI made by
`dataplane certs init`, a controller process with a SQLite store and mutual
TLS, and an admin client. Each module gets its own; after a module
everything it started is stopped and removed, and the teardown fails if
anything remains (processes, pins, /run/dataplane, namespaces, temporary
directories). Measurements tests record are repeated in the run summary."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import require_root
from tests.fleet.helpers import (ALICE_ADDR, APP_ADDR, APP_SERVICE_PORTS, B_ENDPOINTS, B_HOST_ADDR, C_HOST_ADDR,
                                 DB_ADDR, DB_SERVICE_PORTS, FLEET_INVENTORY, Admin, AgentProcess, Controller, Fleet,
                                 Registry, instance_name, make_pki, new_lab, remove_instance, start_tcp_servers)

AGENT_HOSTS = ["A", "B", "C", "h1", "h2", "ghost"]

_MEASUREMENTS: list[str] = []


@pytest.fixture
def measurement(request):
    """Call with a line of text; it is printed now and in the run summary."""

    def record(text: str) -> None:
        line = f"{request.node.nodeid}: {text}"
        print(line)
        _MEASUREMENTS.append(line)

    return record


def pytest_terminal_summary(terminalreporter):
    if _MEASUREMENTS:
        terminalreporter.section("fleet measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def registry():
    """What the module started; checked to be gone once its fixtures are torn down."""
    require_root()
    reg = Registry()
    yield reg
    remaining = reg.leftovers()
    assert not remaining, "left behind:\n" + "\n".join(remaining)


@pytest.fixture(scope="module")
def workdir(registry):
    d = registry.tmpdir("work")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(workdir):
    """ca.pem, controller.pem, agent-<host>.pem for AGENT_HOSTS, admin-ops.pem."""
    return make_pki(workdir / "pki", AGENT_HOSTS)


@pytest.fixture(scope="module")
def controller(registry, workdir, pki):
    ctl = Controller(registry, workdir, f"sqlite://{workdir / 'controller.db'}", pki).start()
    yield ctl
    ctl.stop()


@pytest.fixture(scope="module")
def admin(controller, pki):
    return Admin(controller.address, pki)


# --- three hosts on one segment, an agent process each ---------------------------------------

@pytest.fixture(scope="module")
def fleet(registry, workdir, pki, controller, admin):
    """Namespaces A (alice's device), B (the application host) and C (the
    database host) on one bridge; an agent process per host, each with its
    own datapath instance, connected to the controller; echo servers on B
    and C; the inventory and the base policy pushed through the CLI."""
    lab = new_lab(registry)
    agents: dict[str, AgentProcess] = {}
    try:
        fabric = lab.switch("fabric")
        ns = {h: lab.ns(h.lower()) for h in ("A", "B", "C")}
        ifs = {"A": lab.plug(fabric, ns["A"], [f"{ALICE_ADDR}/24"]),
               "B": lab.plug(fabric, ns["B"], [f"{APP_ADDR}/24", f"{B_HOST_ADDR}/24"]),
               "C": lab.plug(fabric, ns["C"], [f"{DB_ADDR}/24", f"{C_HOST_ADDR}/24"])}
        start_tcp_servers(lab, ns["B"], "0.0.0.0", APP_SERVICE_PORTS)
        start_tcp_servers(lab, ns["C"], "0.0.0.0", DB_SERVICE_PORTS)

        (workdir / "inventory.yaml").write_text(FLEET_INVENTORY)
        admin.ok("inventory", "push", workdir / "inventory.yaml")
        f = Fleet(lab, workdir, controller, admin, ns, agents)
        f.push_policy()

        (workdir / "endpoints-B.yaml").write_text(B_ENDPOINTS)
        extra = {"A": {}, "B": {"endpoints": workdir / "endpoints-B.yaml", "addresses": [B_HOST_ADDR]},
                 "C": {"addresses": [C_HOST_ADDR]}}
        for host in ("A", "B", "C"):
            agents[host] = AgentProcess(registry, workdir, host, controller.address, pki, ifs[host], ns[host],
                                        instance_name(host.lower()), **extra[host]).start()
        for agent in agents.values():
            agent.wait_started()
        admin.wait_in_sync(agents)
        yield f
    finally:
        for agent in agents.values():
            agent.stop()
        for agent in agents.values():
            remove_instance(agent.instance)
        lab.close()
