"""`make demo`: the sample entitlement policy (examples/policy.yaml) enforced
on a small network of namespaces, end to end, driven by a controller.

A controller (embedded SQLite store, mutual TLS with certificates made for
the occasion) holds the policy, the inventory and the users' sessions. Every
host in examples/inventory.yaml becomes a network namespace running its
workloads (echo servers) and its own agent process, which receives its
host's compiled state from the controller and enforces it with XDP and TC
programs on the host's interface. Users' laptops and the partner network
are namespaces too. All of them share one L2 segment (a bridge).

The demo sends real TCP traffic for every test in the policy and a few more
flows, checks each outcome against what `dataplane policy explain`
predicts, revokes a user's session at the controller while her connection
is open (every host cuts it), prints the fleet's status and the verdicts per
rule across all hosts, and removes everything it created. Exit status 0
means every check held. `--standalone` runs the agents from files instead,
without a controller (the session is then revoked by editing the inventory
file the agents watch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dataplane.agent import Workspace
from dataplane.compiler import Compiler
from dataplane.explain import Explainer
from dataplane.identity import Allocator
from dataplane.inventory import load_inventory
from dataplane.lab import Lab, wait_for
from dataplane.policy import PROTOCOL_NAMES, load_policy, parse_port_text
from dataplane.render import print_rows
from loader.instance import Datapath

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SERVICE_PORTS = [443, 8080, 5432, 9100]
EXTRA_CHECKS = [  # (from, to, port): flows beyond the policy's own tests
    ("user:alice", "workload:web-1", "tcp/443", 6),
    ("user:bob", "workload:db-1", "tcp/5432", 4),
    ("10.80.0.130", "workload:api-1", "tcp/8080", 4),
    ("workload:api-1", "workload:web-1", "tcp/443", 4),
    ("host:web-host", "workload:db-1", "tcp/9100", 4),   # entity host: only the host itself
]


def say(text: str = "") -> None:
    print(text, flush=True)


class Network:
    """The namespaces the inventory describes, on one bridge."""

    def __init__(self, lab: Lab, inventory):
        self.lab = lab
        self.ns_of_addr: dict[str, str] = {}
        self.host_ns: dict[str, str] = {}
        self.host_if: dict[str, str] = {}
        fabric = lab.switch("fabric")
        for h in inventory.hosts:
            ns = lab.ns(h.name)
            addrs = list(h.addresses) + [a for e in inventory.endpoints if e.host == h.name for a in e.addresses]
            self.host_if[h.name] = lab.plug(fabric, ns, [_cidr(a) for a in addrs])
            self.host_ns[h.name] = ns
            for a in addrs:
                self.ns_of_addr[str(a)] = ns
        for s in inventory.sessions:
            ns = lab.ns(s.id[:10])
            lab.plug(fabric, ns, [_cidr(a) for a in s.addresses])
            for a in s.addresses:
                self.ns_of_addr[str(a)] = ns
        for n in inventory.networks:
            for net in n.cidrs:
                addr = net.network_address + 2
                ns = lab.ns(n.name[:10])
                lab.plug(fabric, ns, [f"{addr}/24" if addr.version == 4 else f"{addr}/64"])
                self.ns_of_addr[str(addr)] = ns

    def probe(self, src: str, dst: str, proto: int, port: int) -> dict:
        kind = {6: "tcp", 17: "udp"}[proto]
        out = self.lab.run(self.ns_of_addr[src], [sys.executable, "-m", "dataplane.probe", kind, src, dst,
                                                  str(port), "1.0"])
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"ok": False, "error": out.stderr.strip()[-200:] or "no output"}


def _cidr(addr) -> str:
    return f"{addr}/24" if addr.version == 4 else f"{addr}/64"


class Controller:
    """A controller process on loopback with an embedded store and mTLS."""

    def __init__(self, workdir: Path):
        from dataplane import certs

        self.pki = workdir / "pki"
        self.hosts: list[str] = []
        self.workdir = workdir
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = workdir / "controller.log"
        certs.init(self.pki, ["localhost", "127.0.0.1"], [], ["demo"])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dataplane", "controller", "--listen", self.address,
             "--store", f"sqlite://{workdir / 'controller.db'}", "--tls-dir", str(self.pki)],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"), start_new_session=True, cwd=ROOT)
        if not wait_for(lambda: "listening" in self.log.read_text() or self.proc.poll() is not None, timeout=30) \
                or self.proc.poll() is not None:
            raise RuntimeError(f"the controller did not start: {self.log.read_text()[-400:]}")

    def agent_cert(self, host: str) -> None:
        from dataplane import certs

        certs.Authority.load(self.pki).issue_to(self.pki, f"agent-{host}", host, "agent", [host])

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "dataplane", *args, "--controller", self.address,
                              "--tls-dir", str(self.pki), "--as", "demo"], capture_output=True, text=True,
                             cwd=ROOT, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"dataplane {' '.join(args)}: {out.stderr.strip()}")
        return out

    def revoke(self, session_id: str) -> None:
        """RevokeSession over gRPC from this process, so timing starts at the call."""
        from dataplane import certs
        from dataplane.fleet_agent import channel_to
        from dataplane.v1 import controller_pb2 as pb
        from dataplane.v1 import controller_pb2_grpc as pb_grpc

        with channel_to(self.address, certs.Credentials(self.pki, "admin-demo")) as channel:
            pb_grpc.ControllerStub(channel).RevokeSession(pb.RevokeSessionRequest(id=session_id), timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agents:
    """One agent process per host, each with its own datapath instance:
    from the controller (fleet mode) or from the files (standalone)."""

    def __init__(self, net: Network, policy: Path, inventory: Path, workdir: Path,
                 controller: Controller | None = None):
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.workdir = workdir
        self.fleet = controller is not None
        for host, ns in net.host_ns.items():
            log = workdir / f"agent-{host}.log"
            self.logs[host] = log
            if controller:
                controller.agent_cert(host)
                source = ["--controller", controller.address, "--tls-dir", str(controller.pki)]
            else:
                source = ["--policy", str(policy), "--inventory", str(inventory)]
            self.procs[host] = subprocess.Popen(
                [sys.executable, "-m", "dataplane", "--instance", self.instance(host), "agent", *source,
                 "--interface", net.host_if[host], "--netns", ns, "--host", host,
                 "--state-dir", str(self.state_dir(host))],
                stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True, cwd=ROOT)

    @staticmethod
    def instance(host: str) -> str:
        return f"demo-{host}"

    def state_dir(self, host: str) -> Path:
        return self.workdir / f"state-{host}"

    def applied_count(self, host: str) -> int:
        text = self.logs[host].read_text()
        return text.count(" applied in ") if self.fleet else text.count("dataplane: INFO: applied:")

    def wait_applied(self, at_least: int, timeout: float) -> bool:
        for host, proc in self.procs.items():
            ok = wait_for(lambda: self.applied_count(host) >= at_least or proc.poll() is not None,
                          timeout=timeout, interval=0.05)
            if not ok or proc.poll() is not None:
                return False
        return True

    def describe_failure(self) -> str:
        return "; ".join(f"{h}: {self.logs[h].read_text().strip().splitlines()[-1:] or ['no output']}"
                         for h in self.procs)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def start_servers(lab: Lab, net: Network) -> None:
    for host, ns in net.host_ns.items():
        proc = lab.popen(ns, [sys.executable, "-m", "dataplane.probe", "serve-tcp", "::",
                              *map(str, SERVICE_PORTS)])
        if proc.stdout.readline().decode().strip() != "ready":
            raise RuntimeError(f"servers in {host} did not start: {proc.stderr.read().decode()[-300:]}")


def checks(policy, explainer: Explainer) -> list[dict]:
    out = []
    for t in policy.tests:
        out.append({"from": t.source, "to": t.destination, "proto": t.proto, "port": t.port,
                    "expect": t.expect.name.lower(), "family": 4})
    for src, dst, port, family in EXTRA_CHECKS:
        pr = parse_port_text(port)
        out.append({"from": src, "to": dst, "proto": pr.proto, "port": pr.lo, "expect": None, "family": family})
    return out


def run_checks(net: Network, explainer: Explainer, items: list[dict]) -> int:
    failures = 0
    for c in items:
        src, _ = explainer.resolve(c["from"], c["family"])
        dst, _ = explainer.resolve(c["to"], src.version)
        exp = explainer.explain(str(src), str(dst), c["proto"], c["port"])
        predicted = exp.verdict
        result = net.probe(str(src), str(dst), c["proto"], c["port"])
        passes = predicted in ("allow", "audit")
        ok = result["ok"] == passes and (c["expect"] is None or c["expect"] == predicted)
        failures += not ok
        deciding = ", ".join(f"{j.host} {j.direction[:2]}: {j.rule}" for j in exp.judgements)
        service = f"{PROTOCOL_NAMES.get(c['proto'], c['proto'])}/{c['port']}" + (" v6" if src.version == 6 else "")
        say(f"   {'ok  ' if ok else 'FAIL'} {c['from']:>15} -> {c['to']:<15} {service:<12} "
            f"{'passed ' if result['ok'] else 'blocked'} (explain: {predicted}; {deciding})")
    return failures


def revoke_session(net: Network, agents: Agents, inventory_path: Path, user_addr: str, dst: str,
                   port: int, controller: Controller | None = None) -> tuple[bool, float | None]:
    """Streams from a user's device, ends the user's session (at the
    controller, or by removing it from the inventory file the agents watch),
    and measures how long the established connection keeps flowing."""
    proc = net.lab.popen(net.ns_of_addr[user_addr], [sys.executable, "-m", "dataplane.probe", "stream",
                                                     user_addr, dst, str(port)])
    if proc.stdout.readline().decode().strip() != "connected":
        return False, None
    last_echo = None
    for _ in range(40):
        line = proc.stdout.readline().decode().split()
        if line and line[0] == "echo":
            last_echo = float(line[2])
    data = yaml.safe_load(inventory_path.read_text())
    gone = [s for s in data["sessions"] if user_addr in s.get("addresses", [s.get("address")])]
    before = {h: agents.applied_count(h) for h in agents.procs}
    if controller:
        edited_at = time.monotonic()
        controller.revoke(gone[0]["id"])
    else:
        data["sessions"] = [s for s in data["sessions"] if s not in gone]
        tmp = inventory_path.with_suffix(".new")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        edited_at = time.monotonic()
        os.replace(tmp, inventory_path)
    for raw in proc.stdout:
        line = raw.decode().split()
        if line and line[0] == "echo":
            last_echo = float(line[2])
        elif line and line[0] == "stalled":
            break
    proc.wait(timeout=10)
    applied = wait_for(lambda: all(agents.applied_count(h) > before[h] for h in agents.procs), timeout=5)
    return applied, None if last_echo is None else max(0.0, last_echo - edited_at)


def push_to(controller: Controller, policy: Path, inventory: Path, workdir: Path) -> None:
    """The inventory without its sessions, the policy, then each session
    opened through the session API as a ZTNA front door would."""
    data = yaml.safe_load(inventory.read_text())
    sessions = data.pop("sessions", [])
    declared = workdir / "declared-inventory.yaml"
    declared.write_text(yaml.safe_dump(data, sort_keys=False))
    controller.admin("inventory", "push", str(declared))
    controller.admin("policy", "push", str(policy))
    for s in sessions:
        args = ["session", "open", "--id", s["id"], "--user", s["user"]]
        for g in s.get("groups", []):
            args += ["--group", g]
        for k, v in s.get("device", {}).items():
            args += ["--device", str(v)] if k == "id" else ["--posture", f"{k}={str(v).lower()}"]
        for a in s.get("addresses", [s.get("address")]):
            args += ["--address", str(a)]
        if s.get("expires"):
            t = s["expires"]
            args += ["--expires", t.isoformat() if hasattr(t, "isoformat") else str(t)]
        controller.admin(*args)


def verdicts_per_rule(agents: Agents) -> list[dict]:
    per_rule: dict[str, dict] = {}
    for host in agents.procs:
        dp = Datapath(agents.instance(host)).adopt()
        names = Workspace(dp.instance, str(agents.state_dir(host))).read_applied()["rules"]
        for rule_id, (packets, _) in dp.rule_counters().items():
            name = names.get(str(rule_id), "default (no rule)") if rule_id else "default (no rule)"
            row = per_rule.setdefault(name, {"rule": name, "packets": 0, "hosts": set()})
            row["packets"] += packets
            row["hosts"].add(host)
        dp.close()
    rows = sorted(per_rule.values(), key=lambda r: r["rule"])
    for r in rows:
        r["hosts"] = sorted(r["hosts"])
    return rows


def show_flows(agents: Agents, controller: Controller | None) -> int:
    """The denied and audited flows the agents reported, as `dataplane
    observe` gives them (fleet-wide from the controller, or host by host),
    one line per kind (host, direction, identities, rule, reason). Returns 1
    when none came back: the checks above produced some."""
    import json

    from dataplane.cli import _flow_row
    from dataplane.v1 import flow_pb2
    from google.protobuf import json_format

    filters = ["--verdict", "deny,audit", "--last", "0", "-o", "json"]
    if controller:
        say("\n== denied and audited flows, fleet-wide (dataplane observe --controller ... --verdict deny,audit)")
        text = controller.admin("observe", *filters).stdout
    else:
        say("\n== denied and audited flows (dataplane --instance demo-HOST observe --verdict deny,audit)")
        text = "".join(subprocess.run([sys.executable, "-m", "dataplane", "--instance", agents.instance(host),
                                       "observe", *filters], capture_output=True, text=True, cwd=ROOT,
                                      timeout=30).stdout for host in agents.procs)
    seen, rows = set(), []
    for line in text.splitlines():
        if not line.strip().startswith("{") or '"lost"' in line[:10]:
            continue
        f = json_format.ParseDict(json.loads(line), flow_pb2.Flow())
        key = (f.host, f.direction, f.source_identity.id, f.destination_identity.id, f.verdict, f.rule, f.reason)
        if key not in seen:
            seen.add(key)
            rows.append(_flow_row(f))
    rows.sort(key=lambda r: r["time"])
    columns = ["time", "host", "source", "destination", "proto", "dir", "verdict", "rule", "reason"]
    print_rows([{c: r[c] for c in columns} for r in rows[:16]], "table")
    ok = len(rows) > 0
    say(f"   {'ok  ' if ok else 'FAIL'} {len(seen)} kinds of drops and audits, each with both identities, the "
        "rule and the reason")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=str(EXAMPLES / "policy.yaml"))
    parser.add_argument("--inventory", default=str(EXAMPLES / "inventory.yaml"))
    parser.add_argument("--standalone", action="store_true", help="agents from files, no controller")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="dataplane-demo-"))
    inventory_path = workdir / "inventory.yaml"       # the agents watch this copy
    shutil.copy(args.inventory, inventory_path)
    policy = load_policy(args.policy)
    inventory = load_inventory(inventory_path)
    failures = 0
    agents = controller = None
    with Lab("dpdemo") as lab:
        try:
            say(f"== {len(inventory.hosts)} hosts, {len(inventory.sessions)} user devices and "
                f"{len(inventory.networks)} partner network on one segment")
            net = Network(lab, inventory)
            start_servers(lab, net)
            for h in inventory.hosts:
                eps = ", ".join(f"{e.name} ({e.addresses[0]})" for e in inventory.endpoints if e.host == h.name)
                say(f"   {h.name:<9} {h.addresses[0]}  runs {eps}")

            if not args.standalone:
                say("== controller: embedded store, mutual TLS; inventory, policy and sessions pushed to it")
                controller = Controller(workdir)
                push_to(controller, Path(args.policy), inventory_path, workdir)
                say(f"   listening on {controller.address}; policy revision 1 active; "
                    f"{len(inventory.sessions)} sessions open")
            say(f"== one agent per host{', from the controller' if controller else ': ' + args.policy} "
                "(compiling the datapath takes a few seconds)")
            agents = Agents(net, Path(args.policy), inventory_path, workdir, controller)
            if not agents.wait_applied(1, timeout=180):
                raise RuntimeError(f"an agent did not apply the policy: {agents.describe_failure()}")
            for host in agents.procs:
                rec = Workspace(agents.instance(host), str(agents.state_dir(host))).read_applied()
                c = rec["counts"]
                say(f"   {host:<9} enforcing {c['entries']} entries for {len(rec['locals'])} local identities, "
                    f"{c['prefixes']} prefixes")

            explainer = Explainer(Compiler(policy, inventory, Allocator(None), Allocator(None, first=1)))
            say("== traffic, each outcome checked against `policy explain`")
            wait_for(lambda: net.probe("10.80.0.21", "10.80.0.31", 6, 8080)["ok"], timeout=10)
            failures += run_checks(net, explainer, checks(policy, explainer))

            say("== revoking alice's session while her connection to web-1 is open")
            applied, cut_after = revoke_session(net, agents, inventory_path, "10.80.0.11", "10.80.0.21", 443,
                                                controller)
            ok = applied and cut_after is not None and cut_after < (0.5 if controller else 2.0)
            failures += not ok
            shown = "n/a" if cut_after is None else f"{cut_after * 1000:.0f} ms"
            how = ("`dataplane session revoke` at the controller" if controller else
                   "inventory file edited (the agents check it every 0.5 s)")
            say(f"   {'ok  ' if ok else 'FAIL'} {how}; every agent re-applied; her established connection "
                f"stopped {shown} later")
            result = net.probe("10.80.0.11", "10.80.0.21", 6, 443)
            failures += result["ok"]
            say(f"   {'ok  ' if not result['ok'] else 'FAIL'} a new connection from her laptop is "
                f"{'refused' if not result['ok'] else 'still accepted'}")

            if controller:
                say("\n== fleet status")
                say("\n".join("   " + line for line in controller.admin("fleet", "status").stdout.splitlines()))
            say("\n== verdicts per rule, all hosts")
            print_rows(verdicts_per_rule(agents), "table")
            failures += show_flows(agents, controller)
        finally:
            if agents:
                agents.stop()
            if controller:
                controller.stop()
            for host in (agents.procs if agents else ()):
                dp = Datapath(agents.instance(host))
                if os.path.isdir(dp.pin_dir) or os.path.exists(dp.state_path):
                    dp.unload()
            shutil.rmtree(workdir, ignore_errors=True)
    say(f"\n{'all checks held' if not failures else f'{failures} check(s) failed'}; "
        "namespaces, agents, programs and pins removed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
