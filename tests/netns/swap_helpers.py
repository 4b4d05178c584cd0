"""Pieces of the policy-swap test: two policies and two inventories over one
server workload and four client addresses, the topology they run on, the
traffic tool's command lines and an event collector.

Flows, all from the client namespace to the server workload 10.210.0.1:

  A  10.210.0.11  udp/7001 (a new flow per datagram, and one long flow) and
                   tcp/7500 (one connection): allowed by both states, by different
                   rules: P1 names the exact ports, P2 port ranges; the
                   address is workload {app: alpha, ver: v1} in I1 and
                   {app: alpha, ver: v2} in I2, and each policy explicitly
                   denies the other label set, so a judgement that mixed the
                   two states would drop A.
  B  10.210.0.12  udp/7201  denied by both: P1 denies it explicitly (and
                   allows another port), P2 has no rule (default deny).
  C  10.210.0.13  udp/7301  allowed by P1 only.
  D  10.210.0.14  udp/7401  allowed by P2 only (P1 denies it explicitly).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from dataplane import source
from dataplane.inventory import Inventory, parse_inventory
from dataplane.lab import Lab
from dataplane.policy import Policy, parse_policy
from loader.events import EventReader, FlowEvent

HERE = Path(__file__).resolve().parent
TRAFFIC = HERE / "swap_traffic.py"

SERVER_HOST = "srv"
SERVER = "10.210.0.1"
CLIENTS = {"A": "10.210.0.11", "B": "10.210.0.12", "C": "10.210.0.13", "D": "10.210.0.14"}
DECOY = "10.210.0.91"            # holds the label set A does not have, so both exist in both states
UDP_PORTS = {"A": 7001, "B": 7201, "C": 7301, "D": 7401}
TCP_PORT_A = 7500
# UDP flows in the sender's order: (name, client, a new source port per datagram).
# A-new makes every datagram a new flow, judged by policy whenever it
# arrives; A-est is one flow that conntrack carries, judged again after
# every swap (the epoch changes).
UDP_FLOWS = (("A-new", "A", True), ("A-est", "A", False), ("B", "B", False), ("C", "C", False),
             ("D", "D", False))

_INVENTORY = """\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - name: srv
    labels: {{zone: core}}
  - name: clients
    labels: {{zone: edge}}
endpoints:
  - name: svc
    host: srv
    address: 10.210.0.1
    labels: {{app: svc}}
  - name: alpha
    host: clients
    address: 10.210.0.11
    labels: {{app: alpha, ver: {a_ver}}}
  - name: alpha-other
    host: clients
    address: 10.210.0.91
    labels: {{app: alpha, ver: {decoy_ver}}}
  - name: bravo
    host: clients
    address: 10.210.0.12
    labels: {{app: bravo}}
  - name: charlie
    host: clients
    address: 10.210.0.13
    labels: {{app: charlie}}
  - name: delta
    host: clients
    address: 10.210.0.14
    labels: {{app: delta}}
"""

P1 = """\
apiVersion: zt-dataplane/v1
kind: Policy
metadata: {name: swap-p1}
rules:
  - name: p1-alpha-udp
    action: allow
    from: [{workload: {app: alpha, ver: v1}}]
    to: [{workload: {app: svc}}]
    ports: [udp/7001]
  - name: p1-alpha-tcp
    action: allow
    from: [{workload: {app: alpha, ver: v1}}]
    to: [{workload: {app: svc}}]
    ports: [{protocol: tcp, port: 7500}]
  - name: p1-alpha-v2-never
    action: deny
    from: [{workload: {ver: v2}}]
    to: [{workload: {app: svc}}]
  - name: p1-bravo-deny
    action: deny
    from: [{workload: {app: bravo}}]
    to: [{workload: {app: svc}}]
    ports: [udp/7201]
  - name: p1-bravo-other-port
    action: allow
    from: [{workload: {app: bravo}}]
    to: [{workload: {app: svc}}]
    ports: [udp/7202]
  - name: p1-charlie
    action: allow
    from: [{workload: {app: charlie}}]
    to: [{workload: {app: svc}}]
    ports: [udp/7301]
  - name: p1-delta-deny
    action: deny
    from: [{workload: {app: delta}}]
    to: [{workload: {app: svc}}]
    ports: [udp/7401]
"""

P2 = """\
apiVersion: zt-dataplane/v1
kind: Policy
metadata: {name: swap-p2}
rules:
  - name: p2-alpha-udp-range
    action: allow
    from: [{workload: {ver: v2, app: alpha}}]
    to: [{workload: {app: svc}}]
    ports: [udp/7000-7009]
  - name: p2-alpha-tcp-range
    action: allow
    from: [{workload: {ver: v2, app: alpha}}]
    to: [{workload: {app: svc}}]
    ports: [{protocol: tcp, port: 7500, endPort: 7599}]
  - name: p2-alpha-v1-never
    action: deny
    from: [{workload: {ver: v1}}]
    to: [{workload: {app: svc}}]
  - name: p2-delta-range
    action: allow
    from: [{workload: {app: delta}}]
    to: [{workload: {app: svc}}]
    ports: [udp/7400-7499]
"""

RULES_A_UDP = ("p1-alpha-udp", "p2-alpha-udp-range")
RULES_A_TCP = ("p1-alpha-tcp", "p2-alpha-tcp-range")


def inventory_text(state: int) -> str:
    return _INVENTORY.format(a_ver=f"v{state}", decoy_ver=f"v{3 - state}")


def load_sources(state: int) -> tuple[Policy, Inventory]:
    data, where = source.loads(P1 if state == 1 else P2, f"swap-p{state}.yaml")
    policy = parse_policy(data, where)
    data, where = source.loads(inventory_text(state), f"swap-inventory-{state}.yaml")
    return policy, parse_inventory(data, where)


# --- topology ----------------------------------------------------------------------

def _ip(*args: str) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"ip {' '.join(args)}: {out.stderr}"
    return out.stdout


def mac_of(ns: str, ifname: str) -> str:
    return json.loads(_ip("-n", ns, "-j", "link", "show", "dev", ifname))[0]["address"]


def build_topology(lab: Lab) -> dict:
    """Client and server namespaces joined by one veth pair, IPv4 only, with
    permanent neighbour entries both ways so that no ARP resolution happens
    while packets are counted."""
    client_ns, server_ns = lab.ns("c"), lab.ns("s")
    client_if, server_if = lab.link(client_ns, server_ns, [f"{a}/24" for a in CLIENTS.values()],
                                    [f"{SERVER}/24"])
    for ns, ifname in ((client_ns, client_if), (server_ns, server_if)):
        lab.run(ns, ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"], check=True)
    client_mac, server_mac = mac_of(client_ns, client_if), mac_of(server_ns, server_if)
    _ip("-n", client_ns, "neigh", "replace", SERVER, "lladdr", server_mac, "dev", client_if, "nud", "permanent")
    for addr in CLIENTS.values():
        _ip("-n", server_ns, "neigh", "replace", addr, "lladdr", client_mac, "dev", server_if, "nud", "permanent")
    return {"client_ns": client_ns, "server_ns": server_ns, "client_if": client_if, "server_if": server_if}


def neighbours_settled(ns: str, ifname: str, addrs) -> bool:
    """Every address has a PERMANENT neighbour entry on the interface."""
    rows = json.loads(_ip("-n", ns, "-j", "neigh", "show", "dev", ifname))
    state = {r["dst"]: r.get("state", []) for r in rows}
    return all("PERMANENT" in state.get(a, []) for a in addrs)


# --- traffic -------------------------------------------------------------------------

def traffic_cmd(*args) -> list[str]:
    return [sys.executable, "-u", str(TRAFFIC), *map(str, args)]


def receiver_cmd(out: Path) -> list[str]:
    args = ["receive", "--tcp", TCP_PORT_A, "--out", out]
    for port in UDP_PORTS.values():
        args += ["--udp", port]
    return traffic_cmd(*args)


def sender_cmd(out: Path, rate: float, tcp_interval: float) -> list[str]:
    args = ["send", "--rate", rate, "--tcp", f"{CLIENTS['A']}:{SERVER}:{TCP_PORT_A}", "--tcp-interval",
            tcp_interval, "--out", out]
    for _, client, fresh in UDP_FLOWS:
        args += ["--flow", f"{CLIENTS[client]}:{SERVER}:{UDP_PORTS[client]}" + (":fresh" if fresh else "")]
    return traffic_cmd(*args)


# --- events ----------------------------------------------------------------------------

class EventCollector:
    """Reads the datapath's verdict events on a thread of its own until
    stopped; every drop and audit is reported, so with no events lost this
    is every dropped packet."""

    def __init__(self, dp):
        self.events: list[FlowEvent] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._reader = EventReader(dp.events.fd, self.events.append)
        self._reader.drain()
        self.events.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._reader.poll(50)
            self._reader.drain()
        except BaseException as e:  # reported by stop()
            self._error = e

    def stop(self) -> list[FlowEvent]:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "event reader did not stop"
        self._reader.close()
        if self._error is not None:
            raise self._error
        return list(self.events)

    def close(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._reader.close()
