#!/usr/bin/env python3
"""Fleet latencies: how fast a controller's change reaches the agents.

    .venv/bin/python bench/fleet.py            # full run (a few minutes)
    .venv/bin/python bench/fleet.py --quick    # smoke run

(a) Policy propagation: one controller (SQLite store, mutual TLS) on
    loopback and N lightweight agents (asyncio tasks speaking the agent
    protocol without a datapath, see AioAgents; each with its own
    certificate, gRPC channel and Sync stream, each its own host in the
    inventory with one endpoint). For
    every policy change: the time from just before the ApplyPolicy call
    until the first agent and until the last of the N agents applied that
    revision, and the call's own latency.
(b) Revocation to the first dropped packet: a real agent process enforcing
    with its datapath on a veth in a namespace, a user session for a client
    address in another namespace, a steady UDP flow (one packet every ~1 ms)
    from the client to a port the session's identity may reach. The session
    is revoked through the controller; the figure is the time from just
    before the RevokeSession call to the first drop of that flow in the
    agent's flow stream (the datapath's timestamp). The session is
    re-opened, and the flow seen passing again, between trials.

bench/README.md explains the method. Results go to bench/results/fleet.json
(the --quick run to fleet.quick.json) and a markdown table to stdout;
progress to stderr. Everything started is stopped and removed on exit, on
error and on Ctrl-C or SIGTERM. Needs root, bpffs and kernel headers
(`make setup`).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc

from dataplane import certs
from dataplane.agent_server import socket_path
from dataplane.fleet_agent import channel_to
from dataplane.lab import Lab
from dataplane.v1 import agent_pb2, agent_pb2_grpc
from dataplane.v1 import controller_pb2 as pb
from dataplane.v1 import controller_pb2_grpc as pb_grpc
from loader.instance import Datapath, check_bpffs, check_privileges

RESULTS_DIR = ROOT / "bench" / "results"
CLI = ROOT / ".venv" / "bin" / "dataplane"
if not CLI.exists():
    CLI = Path(shutil.which("dataplane") or CLI)
RUN_DIR = Path("/run/dataplane")            # agent status sockets

TARGET_PROPAGATION_S = 1.0                  # 100 agents: push -> all applied
TARGET_REVOCATION_P99_S = 0.200             # revoke -> first dropped packet, p99

# (b)'s addresses: a client namespace and a server namespace on one veth.
CLIENT = "10.101.0.1"
SERVER_HOST = "10.101.0.2"                  # the host's own address
SERVER_APP = "10.101.0.3"                   # the endpoint the session may reach
APP_PORT = 5000
CLIENT_PORT = 40000
SESSION_ID = "bench-user"

SETTLE_S = 0.2                              # pause after each change (the agents' acks reach the store)


def log(msg: str) -> None:
    print(f"fleet: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, interval: float = 0.005, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def summary(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2), "mean_ms": round(statistics.fmean(ms), 2),
            "samples_ms": [round(v, 3) for v in ms]}


# --- cleanup ----------------------------------------------------------------------------

class Cleanup:
    """Undo steps, run last-in first-out; every step runs even when one fails."""

    def __init__(self):
        self._steps: list[tuple[str, object]] = []

    def push(self, what: str, fn) -> None:
        self._steps.append((what, fn))

    def run(self) -> list[str]:
        errors = []
        while self._steps:
            what, fn = self._steps.pop()
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - keep cleaning, report after
                errors.append(f"{what}: {e!r}")
        return errors


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=timeout)


def tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --- the controller ---------------------------------------------------------------------

class Controller:
    """`dataplane controller` on loopback with a fresh SQLite store."""

    def __init__(self, workdir: Path, pki: Path | None, cleanup: Cleanup, name: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.pki = pki
        self.log = workdir / f"controller-{name}.log"
        tls = ["--tls-dir", str(pki)] if pki else ["--insecure"]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(CLI), "controller", "--listen", self.address, "--store",
                 f"sqlite://{workdir / f'controller-{name}.db'}", "--name", name, *tls],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
        cleanup.push(f"controller {name}", lambda: stop_group(self.proc))
        self.channel = channel_to(self.address, certs.Credentials(pki, "admin-admin") if pki else None)
        cleanup.push(f"admin channel to {name}", self.channel.close)
        self.stub = pb_grpc.ControllerStub(self.channel)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited {self.proc.returncode}: {tail(self.log)}")
            try:
                return self.stub.FleetStatus(pb.FleetStatusRequest(), timeout=2)
            except grpc.RpcError:
                return None
        wait(ready, 30, 0.1, "the controller to answer")

    def revision(self) -> int:
        return self.stub.FleetStatus(pb.FleetStatusRequest(), timeout=10).revision


def agent_tls(pki: Path | None, host: str):
    return certs.Credentials(pki, f"agent-{host}") if pki else None


# --- (a) policy propagation ---------------------------------------------------------------

def host_name(i: int) -> str:
    return f"a{i:03d}"


def host_address(i: int, net: int) -> str:
    return str(ipaddress.ip_address(f"10.{net}.0.0") + 1 + i)


def propagation_inventory(n: int) -> str:
    lines = ["apiVersion: zt-dataplane/v1", "kind: Inventory", "hosts:"]
    lines += [f"  - {{name: {host_name(i)}, address: {host_address(i, 100)}}}" for i in range(n)]
    lines.append("endpoints:")
    lines += [f"  - {{name: svc-{i:03d}, host: {host_name(i)}, address: {host_address(i, 110)}, "
              f"labels: {{app: svc, tier: {'front' if i % 2 else 'back'}}}}}" for i in range(n)]
    return "\n".join(lines) + "\n"


def propagation_policy(port: int) -> str:
    """Front ends reach back ends on one TCP port (the one that changes),
    and every service reaches every other on 9100."""
    return ("apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n"
            "  - name: front-to-back\n    action: allow\n"
            "    from: [{workload: {tier: front}}]\n    to: [{workload: {tier: back}}]\n"
            f"    ports: [tcp/{port}]\n"
            "  - name: scrape\n    action: allow\n"
            "    from: [{workload: {app: svc}}]\n    to: [{workload: {app: svc}}]\n    ports: [tcp/9100]\n")


class AioAgents:
    """n lightweight agents as asyncio tasks in one thread of this process
    (grpc.aio): each speaks the agent's protocol on its own channel and mTLS
    identity (hello, then snapshot or deltas, each checked against its
    digest, acknowledged with Applied) without a datapath. One event loop
    instead of n threads: a thousand Python threads in one process starve
    each other and would measure the benchmark, not the controller."""

    def __init__(self, n: int, address: str, pki: Path | None, workdir: Path, cleanup: Cleanup):
        import asyncio

        from dataplane.fleet import HostView

        self._lock = threading.Lock()
        self.applied: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        self.views: list = [None] * n
        self.errors: dict[str, str] = {}
        self.loop = asyncio.new_event_loop()

        async def agent(i: int):
            host = host_name(i)
            tls = agent_tls(pki, host)
            if tls is None:
                channel = grpc.aio.insecure_channel(address)
            else:
                creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                                     certificate_chain=tls.cert)
                channel = grpc.aio.secure_channel(address, creds)
            out: asyncio.Queue = asyncio.Queue()
            await out.put(pb.AgentMessage(hello=pb.Hello(host=host, version="bench")))

            async def requests():
                while True:
                    m = await out.get()
                    if m is None:
                        return
                    yield m
            async with channel:
                call = pb_grpc.AgentSyncStub(channel).Sync(requests())
                try:
                    async for msg in call:
                        kind = msg.WhichOneof("msg")
                        view = self.views[i]
                        if kind == "in_sync":
                            rev = msg.in_sync.revision
                        elif kind == "snapshot":
                            view = HostView.from_msg(msg.snapshot)
                            rev = view.revision
                        else:
                            view = view.apply_delta(msg.delta)
                            if view.digest() != msg.delta.digest:
                                raise RuntimeError(f"{host}: digest mismatch after a delta")
                            rev = view.revision
                        self.views[i] = view
                        t = time.monotonic()
                        with self._lock:
                            self.applied[i].append((rev, t))
                        await out.put(pb.AgentMessage(applied=pb.Applied(revision=rev, digest=view.digest())))
                except (grpc.aio.AioRpcError, RuntimeError) as e:
                    self.errors[host] = str(e)[:200]
                finally:
                    await out.put(None)

        async def main():
            self.tasks = [asyncio.create_task(agent(i)) for i in range(n)]
            await asyncio.gather(*self.tasks, return_exceptions=True)

        self.thread = threading.Thread(target=lambda: self.loop.run_until_complete(main()), name="aio-agents",
                                       daemon=True)

        def stop():
            for t in getattr(self, "tasks", []):
                self.loop.call_soon_threadsafe(t.cancel)
            self.thread.join(timeout=30)
        cleanup.push(f"{n} aio agents", stop)
        self.thread.start()

    def revisions(self) -> list[int]:
        return [v.revision if v else 0 for v in self.views]

    def times_for(self, revision: int) -> list[float] | None:
        out = []
        with self._lock:
            for records in self.applied:
                t = next((t for r, t in records if r >= revision), None)
                if t is None:
                    return None
                out.append(t)
        return out


def bench_propagation(n: int, changes: int, workdir: Path, pki: Path | None, row: dict) -> None:
    """Fills row as it goes (samples in row["raw"]), so that an error or an
    interruption keeps what was measured."""
    cleanup = Cleanup()
    raw = row.setdefault("raw", {"push_to_all_applied": [], "push_to_first_applied": [], "push_call": []})
    try:
        log(f"(a) {n} agents: controller, inventory, agents connecting")
        ctl = Controller(workdir, pki, cleanup, f"prop{n}")
        ctl.stub.ApplyInventory(pb.ApplyInventoryRequest(text=propagation_inventory(n)), timeout=60)
        ctl.stub.ApplyPolicy(pb.ApplyPolicyRequest(text=propagation_policy(2000), comment="start"), timeout=60)
        t_connect = time.monotonic()
        agents = AioAgents(n, ctl.address, pki, workdir, cleanup)

        # Agents register when they connect (a commit each): wait until the
        # state stops moving and every agent enforces the latest revision.
        def quiet():
            rev = ctl.revision()
            if any(r != rev for r in agents.revisions()):
                return None
            time.sleep(1.0)
            return rev if ctl.revision() == rev and all(r == rev for r in agents.revisions()) else None
        wait(quiet, 300, 0.2, f"{n} agents to connect and apply")
        connect_s = time.monotonic() - t_connect
        row["connect_and_sync_s"] = round(connect_s, 2)
        log(f"(a) {n} agents connected and in sync after {connect_s:.1f} s; {changes} policy changes")

        for k in range(changes):
            text = propagation_policy(2001 + k)
            t0 = time.monotonic()
            r = ctl.stub.ApplyPolicy(pb.ApplyPolicyRequest(text=text, comment=f"change {k}"), timeout=60)
            t_ret = time.monotonic()
            times = wait(lambda rev=r.state_revision: agents.times_for(rev), 120, 0.002,
                         f"{n} agents to apply revision {r.state_revision}")
            raw["push_to_all_applied"].append(max(times) - t0)
            raw["push_to_first_applied"].append(min(times) - t0)
            raw["push_call"].append(t_ret - t0)
            _step(f"fleet: {n} agents, change {k + 1}/{changes}")
            if "entries_per_host" not in row:
                entries = [len(v.entries) for v in agents.views]
                row["entries_per_host"] = [min(entries), max(entries)]
            time.sleep(SETTLE_S)
        # Streams that broke (an aio agent does not reconnect).
        row["agent_errors"] = dict(agents.errors)
    finally:
        for e in cleanup.run():
            log(f"cleanup: {e}")


# --- (b) revocation to the first dropped packet ---------------------------------------------

SINK = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.02)
n, shown = 0, -1
print("ready", flush=True)
while True:
    try:
        s.recv(2048)
        n += 1
    except socket.timeout:
        pass
    if n != shown and (n - shown >= 20 or n < 20):
        print(n, flush=True)
        shown = n
"""

SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
dst = (sys.argv[3], int(sys.argv[4]))
print("sending", flush=True)
i = 0
while True:
    s.sendto(b"%d" % i, dst)
    i += 1
    time.sleep(0.001)
"""

REVOCATION_INVENTORY = f"""\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {{name: srv-host, address: {SERVER_HOST}}}
endpoints:
  - {{name: app-1, host: srv-host, address: {SERVER_APP}, labels: {{app: app}}}}
"""

REVOCATION_POLICY = f"""\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: staff-to-app
    action: allow
    from: [{{user: {{group: staff}}}}]
    to: [{{workload: {{app: app}}}}]
    ports: [udp/{APP_PORT}]
"""


class LineCounter:
    """The last integer a process printed on stdout (the sink's count)."""

    def __init__(self, proc: subprocess.Popen):
        self.value = -1
        self.first = ""
        self._ready = threading.Event()

        def read():
            for raw in proc.stdout:
                line = raw.decode(errors="replace").strip()
                if not self._ready.is_set():
                    self.first = line
                    self._ready.set()
                elif line.isdigit():
                    self.value = int(line)
            self._ready.set()
        threading.Thread(target=read, daemon=True).start()

    def wait_first(self, timeout: float) -> str:
        self._ready.wait(timeout)
        return self.first


class DropWatch:
    """Follows the agent's flow stream (Agent.GetFlows on its socket) in a
    thread; keeps the datapath timestamps of DROP events of the benchmark's
    flow, as CLOCK_MONOTONIC ns. The agent is the ring buffer's one reader;
    its flows carry the kernel's time converted to Unix time, converted
    back here."""

    def __init__(self, instance: str, cleanup: Cleanup):
        from dataplane.v1 import flow_pb2

        self._lock = threading.Lock()
        self.drops: list[tuple[int, str]] = []     # (monotonic ns, reason)
        self.error: BaseException | None = None
        self._channel = grpc.insecure_channel(f"unix:{socket_path(instance)}")
        stub = agent_pb2_grpc.AgentStub(self._channel)
        self._call = stub.GetFlows(flow_pb2.GetFlowsRequest(
            filter=["verdict=deny", f"source-ip={CLIENT}", f"destination-ip={SERVER_APP}", "protocol=udp",
                    f"destination-port={APP_PORT}"], follow=True, number=0,
            since=datetime.datetime.now(datetime.timezone.utc).isoformat()))
        self._thread = threading.Thread(target=self._run, name="flows", daemon=True)

        def stop():
            self._call.cancel()
            self._thread.join(timeout=5)
            self._channel.close()
        cleanup.push("flow stream", stop)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._call:
                if item.WhichOneof("item") != "flow":
                    continue
                mono = item.flow.time_unix_ns - (time.time_ns() - time.monotonic_ns())
                with self._lock:
                    self.drops.append((mono, item.flow.reason))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e

    def first_after(self, ts_ns: int) -> tuple[int, str] | None:
        with self._lock:
            return next((d for d in self.drops if d[0] >= ts_ns), None)

    def count(self) -> int:
        with self._lock:
            return len(self.drops)


def bench_revocation(trials: int, workdir: Path, pki: Path | None, row: dict) -> None:
    """Fills row as it goes, like bench_propagation."""
    cleanup = Cleanup()
    raw = row.setdefault("raw", {"revoke_to_first_drop": [], "revoke_call": []})
    reasons = row.setdefault("first_drop_reasons", {})
    instance = f"benchfleet_{os.getpid()}"
    try:
        lab = Lab(f"bf{os.getpid() % 10000}")
        cleanup.push("namespaces", lab.close)
        client_ns, server_ns = lab.ns("c"), lab.ns("s")
        _, server_if = lab.link(client_ns, server_ns, [f"{CLIENT}/24"], [f"{SERVER_HOST}/24", f"{SERVER_APP}/24"])

        log("(b) controller, inventory, policy, session; the agent compiles and attaches its datapath")
        ctl = Controller(workdir, pki, cleanup, "revoke")
        ctl.stub.ApplyInventory(pb.ApplyInventoryRequest(text=REVOCATION_INVENTORY), timeout=60)
        ctl.stub.ApplyPolicy(pb.ApplyPolicyRequest(text=REVOCATION_POLICY), timeout=60)
        session = pb.Session(id=SESSION_ID, user="bench", groups=["staff"], addresses=[CLIENT])
        ctl.stub.OpenSession(pb.OpenSessionRequest(session=session), timeout=60)

        state_dir = workdir / "agent-state"
        agent_log = workdir / "agent.log"
        tls = ["--tls-dir", str(pki)] if pki else ["--insecure"]

        def unload():
            # In a process of its own: detaching in a namespace goes through
            # pyroute2, which forks, and a fork of this multi-threaded
            # process (gRPC) can hang.
            dp = Datapath(instance)
            if os.path.isdir(dp.pin_dir) or os.path.exists(dp.state_path):
                out = subprocess.run([str(CLI), "--instance", instance, "bpf", "unload"], capture_output=True,
                                     text=True, timeout=120, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"bpf unload {instance}: {out.stderr.strip()}")
            shutil.rmtree(RUN_DIR / instance, ignore_errors=True)
        cleanup.push(f"instance {instance}", unload)
        with agent_log.open("w") as out:
            agent = subprocess.Popen(
                [str(CLI), "--instance", instance, "agent", "--controller", ctl.address, *tls, "--host", "srv-host",
                 "--interface", server_if, "--netns", server_ns, "--state-dir", str(state_dir)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
        cleanup.push("agent", lambda: stop_group(agent))

        status_channel = grpc.insecure_channel(f"unix:{socket_path(instance)}")
        cleanup.push("agent status channel", status_channel.close)
        agent_status = agent_pb2_grpc.AgentStub(status_channel)

        def agent_revision() -> int:
            """The revision the agent enforces, from its own status socket."""
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited {agent.returncode}: {tail(agent_log)}")
            try:
                return agent_status.Status(agent_pb2.AgentStatusRequest(), timeout=2).revision
            except grpc.RpcError:
                return 0

        wait(lambda: agent_revision() >= ctl.revision(), 180, 0.1, "the agent to apply the first state")
        drops = DropWatch(instance, cleanup)

        sink = lab.popen(server_ns, [sys.executable, "-u", "-c", SINK, SERVER_APP, str(APP_PORT)])
        received = LineCounter(sink)
        if received.wait_first(30) != "ready":
            raise RuntimeError(f"the sink did not start: {sink.stderr.read().decode()[-500:]}")
        sender = lab.popen(client_ns, [sys.executable, "-u", "-c", SENDER, CLIENT, str(CLIENT_PORT), SERVER_APP,
                                       str(APP_PORT)])
        if LineCounter(sender).wait_first(30) != "sending":
            raise RuntimeError("the sender did not start")

        def flowing(since: int, packets: int = 20) -> bool:
            return received.value >= since + packets

        start = received.value
        wait(lambda: flowing(start), 30, 0.01, "the flow to pass before the first revocation")
        log(f"(b) flow passing; {trials} revocations")

        for k in range(trials):
            if drops.error:
                raise drops.error
            t0 = time.monotonic_ns()
            r = ctl.stub.RevokeSession(pb.RevokeSessionRequest(id=SESSION_ID), timeout=60)
            t_ret = time.monotonic_ns()
            first_ts, reason = wait(lambda t=t0: drops.first_after(t), 30, 0.001, f"a dropped packet after revocation {k}")
            raw["revoke_to_first_drop"].append((first_ts - t0) / 1e9)
            raw["revoke_call"].append((t_ret - t0) / 1e9)
            _step(f"fleet: revocation {k + 1}/{trials}")
            reasons[reason] = reasons.get(reason, 0) + 1
            wait(lambda rev=r.state_revision: agent_revision() >= rev, 30, 0.01, "the agent to record the revocation")

            # Re-open; the flow must pass again (and stop dropping) before the next trial.
            opened = ctl.stub.OpenSession(pb.OpenSessionRequest(session=session), timeout=60)
            wait(lambda rev=opened.state_revision: agent_revision() >= rev, 30, 0.01,
                 "the agent to apply the re-opened session")
            mark = received.value
            wait(lambda since=mark: flowing(since), 30, 0.01, "the flow to pass again after re-opening")
            dropped = drops.count()
            time.sleep(0.05)
            if drops.count() != dropped:
                raise RuntimeError("the flow still drops after the session was re-opened")
        row.update({"packet_interval_ms": 1.0, "drop_events_of_flow": drops.count()})
    finally:
        for e in cleanup.run():
            log(f"cleanup: {e}")


# --- report ---------------------------------------------------------------------------------

def machine() -> dict:
    import common

    return {**common.machine(), "grpc": grpc.__version__}


def finish(row: dict, expected: int) -> None:
    """Replaces the raw samples by their summaries; a row with fewer
    samples than planned is marked partial."""
    raw = row.pop("raw", {})
    for key, values in raw.items():
        row[key] = summary(values) if values else None
    got = min((len(v) for v in raw.values()), default=0)
    if got < expected:
        row["partial"] = f"{got} of {expected} samples"


def _ms(s: dict | None, key: str) -> str:
    return f"{s[key]:.1f} ms" if s else "-"


def _line(label: str, agents: str, s: dict | None, note: str) -> str:
    return (f"| {label} | {agents} | {s['n'] if s else 0} | {_ms(s, 'p50_ms')} | {_ms(s, 'p99_ms')} | "
            f"{_ms(s, 'min_ms')} | {_ms(s, 'max_ms')} | {note} |")


def _notes(row: dict, target: str = "") -> str:
    return "; ".join(x for x in (target, f"error: {row['error']}" if row.get("error") else "",
                                 row.get("partial", "")) if x)


def markdown(report: dict) -> str:
    m = report["machine"]
    tls = "mutual TLS" if report["settings"]["tls"] else "plaintext (--insecure)"
    out = [(f"Fleet latencies: {m['cpu_model']}, {m['vcpus']} vCPUs, kernel {m['kernel']}, {m['date']}; "
            f"load average at start {(m['loadavg_start'] or '?').split(' ')[0]}, at end "
            f"{(report.get('loadavg_end') or '?').split(' ')[0]}. Controller: SQLite store, {tls}, loopback."),
           "",
           "| figure | agents | samples | p50 | p99 | min | max | target, notes |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["propagation"]:
        n = row["agents"]
        for key, label in (("push_to_all_applied", "push → all agents applied"),
                           ("push_to_first_applied", "push → first agent applied"),
                           ("push_call", "ApplyPolicy call")):
            s = row.get(key)
            target = ""
            if n >= 100 and key == "push_to_all_applied":
                met = s is not None and s["p99_ms"] < TARGET_PROPAGATION_S * 1000
                target = f"< 1 s at p99: {'met' if met else 'NOT met'}"
            out.append(_line(label, str(n), s, _notes(row, target) if key == "push_to_all_applied" else ""))
    rv = report.get("revocation")
    if rv is not None:
        for key, label in (("revoke_to_first_drop", "revoke → first dropped packet"),
                           ("revoke_call", "RevokeSession call")):
            s = rv.get(key)
            target = ""
            if key == "revoke_to_first_drop":
                met = s is not None and s["p99_ms"] < TARGET_REVOCATION_P99_S * 1000
                target = f"< 200 ms at p99: {'met' if met else 'NOT met'}"
            out.append(_line(label, "1 (real)", s, _notes(rv, target) if target else ""))
    out.append("")
    out.append("p99 is the nearest rank: with fewer than 100 samples it is the largest one.")
    return "\n".join(out)


def _on_term(signum, frame):
    raise KeyboardInterrupt


_progress = None


def _step(label: str) -> None:
    if _progress is not None:
        _progress.step(label)


def run(quick: bool, progress) -> list[dict]:
    """The suite's entry (bench/suite.py): rows in bench/common.py's schema."""
    import common

    global _progress
    sizes = [5, 20] if quick else [10, 100, 1000]
    changes = {n: (3 if quick else (5 if n >= 1000 else 8)) for n in sizes}
    trials = 5 if quick else 20
    progress.add(sum(changes.values()) + trials)
    _progress = progress
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        pki = workdir / "pki"
        certs.init(pki, ["localhost", "127.0.0.1"], [host_name(i) for i in range(max(sizes))] + ["srv-host"],
                   ["admin"])
        for n in sizes:
            row = {"agents": n, "changes": changes[n]}
            try:
                bench_propagation(n, changes[n], workdir, pki, row)
            except Exception as e:  # noqa: BLE001 - reported in the row
                log(f"(a) {n} agents failed:\n{traceback.format_exc()}")
                row["error"] = f"{type(e).__name__}: {e}"
            samples = [v * 1000 for v in row.get("raw", {}).get("push_to_all_applied", [])]
            r = common.measured("fleet", f"fleet_propagation_{n}",
                                f"policy change -> all {n} agents applied (mutual TLS, one controller)", "ms",
                                samples, "lower", {"agents": n, "changes": changes[n],
                                                   "connect_and_sync_s": row.get("connect_and_sync_s"),
                                                   "p99_ms": summary([v / 1000 for v in samples])["p99_ms"]
                                                   if samples else None,
                                                   "agent_errors": len(row.get("agent_errors", {}))},
                                error=row.get("error") if not samples else None)
            rows.append(r)
            if n == 100:
                rows.append(common.target_row("fleet", "target_propagation_100", "100 agents: slowest change",
                                              r, 1000.0, "ms", key="max"))
            if n == 1000:
                rows.append(common.target_row("fleet", "target_propagation_1000", "1000 agents: slowest change",
                                              r, 2000.0, "ms", key="max"))
        rv = {"trials": trials}
        try:
            bench_revocation(trials, workdir, pki, rv)
        except Exception as e:  # noqa: BLE001
            log(f"(b) failed:\n{traceback.format_exc()}")
            rv["error"] = f"{type(e).__name__}: {e}"
        samples = [v * 1000 for v in rv.get("raw", {}).get("revoke_to_first_drop", [])]
        r = common.measured("fleet", "fleet_revocation", "session revoked -> first dropped packet (real agent)",
                            "ms", samples, "lower", {"trials": trials, "first_drop_reasons": rv.get("first_drop_reasons")},
                            error=rv.get("error") if not samples else None)
        rows.append(r)
        rows.append(common.target_row("fleet", "target_revocation", "revocation: slowest of the trials (p99 bound)",
                                      r, 200.0, "ms", key="max"))
    finally:
        _progress = None
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 5 and 20 agents, 5 changes, 5 revocations (results to fleet.quick.json)")
    ap.add_argument("--agents", help="agent counts for (a), comma-separated (default 10,100)")
    ap.add_argument("--changes", type=int, help="policy changes per agent count (default 30)")
    ap.add_argument("--trials", type=int, help="revocations (default 30)")
    ap.add_argument("--insecure", action="store_true", help="plaintext gRPC instead of mutual TLS")
    ap.add_argument("--only", choices=["propagation", "revocation"], help="run one part")
    ap.add_argument("--out", type=Path, help="JSON output path")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in (args.agents or ("5,20" if args.quick else "10,100")).split(",") if x.strip()]
    except ValueError:
        ap.error("--agents: comma-separated integers")
    changes = args.changes or (5 if args.quick else 30)
    trials = args.trials or (5 if args.quick else 30)
    if min(sizes + [changes, trials]) < 1 or max(sizes) > 1000:
        ap.error("--agents (1-1000), --changes and --trials must be at least 1")
    out = args.out or RESULTS_DIR / ("fleet.quick.json" if args.quick else "fleet.json")

    check_privileges()
    check_bpffs()
    signal.signal(signal.SIGTERM, _on_term)

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    report = {"benchmark": "fleet", "format": 1, "machine": machine(),
              "settings": {"quick": args.quick, "agents": sizes, "changes": changes, "trials": trials,
                           "tls": not args.insecure, "store": "sqlite", "settle_s": SETTLE_S},
              "targets": {"propagation_100_agents_s": TARGET_PROPAGATION_S,
                          "revocation_p99_s": TARGET_REVOCATION_P99_S},
              "propagation": [], "revocation": None}
    interrupted = failed = False
    try:
        pki = None
        if not args.insecure:
            pki = workdir / "pki"
            hosts = [host_name(i) for i in range(max(sizes))] + ["srv-host"]
            certs.init(pki, ["localhost", "127.0.0.1"], hosts, ["admin"])
        if args.only in (None, "propagation"):
            for n in sizes:
                row = {"agents": n, "changes": changes}
                report["propagation"].append(row)
                try:
                    bench_propagation(n, changes, workdir, pki, row)
                except Exception as e:  # noqa: BLE001 - a failed row is reported, the run goes on
                    failed = True
                    log(f"(a) {n} agents failed:\n{traceback.format_exc()}")
                    row["error"] = f"{type(e).__name__}: {e}"
        if args.only in (None, "revocation"):
            report["revocation"] = {"trials": trials}
            try:
                bench_revocation(trials, workdir, pki, report["revocation"])
            except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
                failed = True
                log(f"(b) failed:\n{traceback.format_exc()}")
                report["revocation"]["error"] = f"{type(e).__name__}: {e}"
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured so far")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    for row in report["propagation"]:
        finish(row, changes)
    if report["revocation"] is not None:
        finish(report["revocation"], trials)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    if interrupted:
        report["interrupted"] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(markdown(report))
    print(f"\n(JSON: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
